"""Reward-hacking and drift monitoring of RL runs, with alert rules (docs/monitoring.md).

  detectors     pure NumPy detectors (proxy-judge gap, ensemble disagreement, reward-length
                correlation, repetition, KL spikes, entropy collapse, token drift)
  Monitor       applies them once per eval step against the step-0 reference; JSON state
  AlertEngine   threshold and trend rules over any metrics; alerts.jsonl
  monitor_section, CONFIG_SPEC   the `config.monitor` section and its checks

A trainer, at each eval step (process 0):

  mon = Monitor(config.monitor); engine = AlertEngine.from_config(config.monitor.alerts)
  line = mon.update(step, prompts=..., responses=..., proxy=..., judge=..., lengths=..., kl=...)
  fired = engine.check(step, {**eval_line, **line})
  write_alerts(fired, os.path.join(workdir, ALERTS_FILENAME))
  if should_stop(fired): ...

This package imports no JAX.
"""

from rlhf_jax.monitor import detectors
from rlhf_jax.monitor.alerts import (
  ACTIONS,
  ALERTS_FILENAME,
  ALERTS_SPEC,
  KINDS,
  OPS,
  RULE_SPEC,
  SEVERITIES,
  Alert,
  AlertEngine,
  Rule,
  default_rules,
  drop_after,
  keep_best_requests,
  rule_config,
  rules_from_config,
  should_stop,
)
from rlhf_jax.monitor.alerts import read as read_alerts
from rlhf_jax.monitor.alerts import write as write_alerts
from rlhf_jax.monitor.config import CONFIG_SPEC, DEFAULTS, monitor_section
from rlhf_jax.monitor.monitor import METRIC_NAMES, Monitor

__all__ = [
  "ACTIONS",
  "ALERTS_FILENAME",
  "ALERTS_SPEC",
  "CONFIG_SPEC",
  "DEFAULTS",
  "KINDS",
  "METRIC_NAMES",
  "OPS",
  "RULE_SPEC",
  "SEVERITIES",
  "Alert",
  "AlertEngine",
  "Monitor",
  "Rule",
  "default_rules",
  "detectors",
  "drop_after",
  "keep_best_requests",
  "monitor_section",
  "read_alerts",
  "rule_config",
  "rules_from_config",
  "should_stop",
  "write_alerts",
]
