"""Optional exporters of a run's metrics and alerts to the tools people watch (docs/exporters.md).

  prometheus   a /metrics endpoint (prometheus_client, extra `monitor`): a gauge per metric,
               the step, and alert counts; docs/grafana/rlhf_jax.json is a dashboard for it
  wandb        a Weights & Biases run (extra `wandb`): metrics, eval sample tables, alerts,
               the reward-vs-KL plot
  statsd       DogStatsD datagrams over UDP (no package): gauges, alert counts and events

Every exporter is off by default. A stage builds the ones its config switches on once, next
to its `MetricWriter`, and hands them what it writes:

  exporter = exporters.make(config.get("exporters"), workdir=workdir, stage=config.trainer,
                            run_config=config)
  ...
  writer.write(step, line); exporter.write(step, line)
  alerts_lib.write(fired, path); exporter.alerts(fired)
  ...
  exporter.close()

`make` checks the section first: a ConfigError names a bad field, or the pip extra an
exporter that is on needs. On processes other than JAX's process 0 it returns an exporter
that does nothing. A failing export (the network, W&B) is logged and never stops training.
Importing this package imports no optional package and no JAX: configs may call
`exporters_section()`.
"""

from rlhf_jax.exporters.base import Composite, Context, Exporter
from rlhf_jax.exporters.registry import (
  CONFIG_SPEC,
  REGISTRY,
  Kind,
  exporters_section,
  make,
  register,
  resolve,
  spec,
)

__all__ = [
  "CONFIG_SPEC",
  "REGISTRY",
  "Composite",
  "Context",
  "Exporter",
  "Kind",
  "exporters_section",
  "make",
  "register",
  "resolve",
  "spec",
]
