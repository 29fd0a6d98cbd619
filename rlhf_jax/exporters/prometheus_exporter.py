"""A Prometheus scrape endpoint for a run, served by the official client (`prometheus_client`).

`GET http://<host>:<port>/metrics` shows, labelled `run` (the workdir's basename) and
`stage` (the trainer):

  rlhf_jax_<metric>        a gauge per numeric metric, its name sanitised
                           ("eval/gold_reward" -> rlhf_jax_eval_gold_reward), holding the
                           value of the latest line that had it (eval metrics stay between
                           evals; NaN is exported as NaN)
  rlhf_jax_step            the step of the latest line
  rlhf_jax_write_timestamp_seconds
                           when that line was written (Unix time): a stalled run's age
  rlhf_jax_alerts_total    a counter per alert rule and severity (labels `rule`,
                           `severity`); the enabled rules of the run's `monitor.alerts`
                           start at 0, so `increase()` sees their first alert

The server runs on a daemon thread with its own registry (not the client's global one), so
several stages in one process each serve their own figures; `close()` stops it and frees the
port. Port 0 takes a free port, logged and kept in `exporter.port` / `exporter.url`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax.exporters import base

STEP = f"{base.NAMESPACE}_step"
WRITE_TIME = f"{base.NAMESPACE}_write_timestamp_seconds"
ALERTS = f"{base.NAMESPACE}_alerts"  # a counter: exposed as rlhf_jax_alerts_total
# Names a line's metric may not take (they would clash with the ones above).
RESERVED = frozenset({STEP, WRITE_TIME, ALERTS, ALERTS + "_total", ALERTS + "_created"})
LABELS = ("run", "stage")


def metric_name(key: str) -> str:
  """The Prometheus name of a line's metric: "eval/gold_reward" -> rlhf_jax_eval_gold_reward."""
  return f"{base.NAMESPACE}_{base.sanitize(key)}"


class _Collector:
  """Builds the metric families from the exporter's latest values at each scrape."""

  def __init__(self, exporter: PrometheusExporter):
    self.exporter = exporter

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    e = self.exporter
    with e._lock:
      values, step, written = dict(e._values), e._step, e._written
      alerts = dict(e._alerts)
    labels = [e.context.run, e.context.stage]
    if step is not None:
      family = GaugeMetricFamily(STEP, "The step of the latest metrics line.", labels=LABELS)
      family.add_metric(labels, step)
      yield family
      family = GaugeMetricFamily(
        WRITE_TIME, "When the latest metrics line was written (Unix time).", labels=LABELS
      )
      family.add_metric(labels, written)
      yield family
    for name, (key, value) in sorted(values.items()):
      family = GaugeMetricFamily(name, f"{key}: its latest value.", labels=LABELS)
      family.add_metric(labels, value)
      yield family
    family = CounterMetricFamily(
      ALERTS, "Alerts fired by the monitor's rules.", labels=(*LABELS, "rule", "severity")
    )
    for (rule, severity), count in sorted(alerts.items()):
      family.add_metric([*labels, rule, severity], count)
    yield family


class PrometheusExporter(base.Exporter):
  """Serves the run's latest metrics and its alert counts for Prometheus to scrape.

  Args:
    context: the run (`base.Context`).
    host: the address to listen on ("127.0.0.1": this machine only; "0.0.0.0": all).
    port: the port; 0 takes a free one.
    key: the config key, for errors ("config.exporters.prometheus").
  """

  name = "prometheus"

  def __init__(
    self,
    context: base.Context,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    key: str = "config.exporters.prometheus",
  ):
    from prometheus_client import CollectorRegistry, start_http_server

    self.context = context
    self._lock = threading.Lock()
    self._values: dict[str, tuple[str, float]] = {}  # name -> (the line's key, value)
    self._step: int | None = None
    self._written = 0.0
    rules = base.known_rules(context.run_config)
    self._alerts: dict[tuple[str, str], float] = {(r, s): 0.0 for r, s in rules.items()}
    self._names = base.Names("Prometheus", metric_name, RESERVED)
    self.registry = CollectorRegistry(auto_describe=False)
    self.registry.register(_Collector(self))
    try:
      self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
    except OSError as error:
      raise cs.ConfigError(
        f"{key}.port={port}: cannot serve metrics on {host}:{port} ({error.strerror or error}); "
        f"choose a free port ({key}.port=0 takes one) or check {key}.host."
      ) from None
    self.host = host
    self.port = int(self._server.server_port)
    shown = f"[{host}]" if ":" in host else host
    self.url = f"http://{shown}:{self.port}/metrics"
    logging.info(
      "Prometheus metrics of run %s (stage %s) at %s", context.run, context.stage, self.url
    )

  def write(self, step: int, line: Mapping[str, Any]) -> None:
    values = {name: (key, value) for name, key, value in self._names.items(line)}
    with self._lock:
      self._values.update(values)
      self._step = int(step)
      self._written = time.time()

  def alerts(self, alerts: Iterable[Any]) -> None:
    with self._lock:
      for alert in map(base.alert_dict, alerts):
        label = (str(alert["rule"]), str(alert["severity"]))
        self._alerts[label] = self._alerts.get(label, 0.0) + 1.0

  def close(self) -> None:
    server, self._server = getattr(self, "_server", None), None
    if server is None:
      return
    server.shutdown()  # stops serve_forever
    server.server_close()  # frees the port
    self._thread.join(timeout=10)
