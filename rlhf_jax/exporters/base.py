"""What every exporter shares: the `Exporter` interface, the `Composite` of several, the
context a run gives them, and the helpers that turn a metrics line and alerts into plain data.

Nothing here imports an optional package (or JAX): each exporter imports its own client
library when it is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

# The namespace of every exported metric: `rlhf_jax_<metric>` (Prometheus),
# `rlhf_jax.<metric>` (StatsD).
NAMESPACE = "rlhf_jax"

# A failing export is logged at most this often (seconds) per exporter: a monitoring
# outage must not flood the training log, nor stop the run.
WARN_EVERY_S = 60


@dataclasses.dataclass(frozen=True)
class Context:
  """The run an exporter reports on.

  workdir: the stage's folder (samples, plots and the W&B run directory are found there).
  stage: the trainer's name (`config.trainer`), the `stage` label.
  run_config: the stage's config as a plain dict (W&B shows it with the run).
  """

  workdir: str
  stage: str
  run_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def run(self) -> str:
    """The run's name: the workdir's basename (the `run` label)."""
    return os.path.basename(os.path.normpath(os.path.abspath(self.workdir)))


class Exporter:
  """Receives every metrics line and every alert of a run; does nothing by default.

  write(step, line)  one metrics line, the dict `MetricWriter.write` got (numpy/JAX scalars
                     allowed; values that are not numbers are left out).
  alerts(alerts)     fired alerts: `monitor.Alert`s or their dicts (`Alert.to_dict()`).
  close()            stops servers and finishes runs; safe to call twice.
  """

  name = "exporter"

  def write(self, step: int, line: Mapping[str, Any]) -> None:
    del step, line

  def alerts(self, alerts: Iterable[Any]) -> None:
    del alerts

  def close(self) -> None:
    pass

  def __enter__(self) -> Exporter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class Composite(Exporter):
  """Several exporters as one: each call goes to each of them, in order.

  An exporter whose `write` or `alerts` raises (a network outage, a full disk) is logged as
  a warning (at most every WARN_EVERY_S seconds per exporter) and the others still run:
  exporting never stops training. `close` closes every one and then raises the first error.
  With no exporters (all off, or not the primary process) every call does nothing.
  """

  name = "composite"

  def __init__(self, exporters: Sequence[Exporter] = ()):
    self.exporters = list(exporters)

  @property
  def names(self) -> list[str]:
    return [e.name for e in self.exporters]

  def __bool__(self) -> bool:
    return bool(self.exporters)

  def _each(self, what: str, call) -> None:
    for exporter in self.exporters:
      try:
        call(exporter)
      except Exception as error:  # an export failing must not stop training
        logging.log_every_n_seconds(
          logging.WARNING,
          "Exporter %s: %s failed (%s: %s); training goes on.",
          WARN_EVERY_S,
          exporter.name,
          what,
          type(error).__name__,
          error,
        )

  def write(self, step: int, line: Mapping[str, Any]) -> None:
    step = int(step)
    self._each("write", lambda e: e.write(step, line))

  def alerts(self, alerts: Iterable[Any]) -> None:
    alerts = list(alerts)
    if alerts:
      self._each("alerts", lambda e: e.alerts(alerts))

  def close(self) -> None:
    first = None
    for exporter in self.exporters:
      try:
        exporter.close()
      except Exception as error:
        first = first or error
    self.exporters = []
    if first is not None:
      raise first


# ----------------------------------------------------------------------------------- helpers


def _scalar(value: Any) -> float | None:
  """A number (Python, numpy or JAX scalar, or a one-element array) as a float; else None."""
  if isinstance(value, bool | int | float) and not isinstance(value, np.generic):
    return float(value)
  if value is None or isinstance(value, str | bytes):
    return None
  try:
    array = np.asarray(value)  # also fetches a jax.Array
  except Exception:
    return None
  if array.size != 1 or array.dtype.kind in "OSUMm":
    return None
  try:
    return float(array.reshape(()))
  except (TypeError, ValueError):
    return None


def numeric(line: Mapping[str, Any]) -> dict[str, float]:
  """The line's numeric metrics as floats (bools as 0/1, non-finite values kept); other
  values (strings, None, arrays) are left out."""
  out = {}
  for key, value in line.items():
    number = _scalar(value)
    if number is not None:
      out[str(key)] = number
  return out


def alert_dict(alert: Any) -> dict[str, Any]:
  """An alert (a `monitor.Alert` or its dict) as a dict with at least rule, severity,
  step, metric, value and message."""
  d = dict(alert.to_dict() if hasattr(alert, "to_dict") else alert)
  value = d.get("value")
  d["value"] = math.nan if value is None else float(value)
  d.setdefault("severity", "warning")
  d.setdefault("rule", "unknown")
  d.setdefault("message", "")
  d["step"] = int(d.get("step", 0))
  return d


def sanitize(name: str, separator: str = "_") -> str:
  """A metric name's characters outside [A-Za-z0-9_] as `separator`, runs of separators
  collapsed: "eval/gold_reward" -> "eval_gold_reward" (or "eval.gold_reward" for ".")."""
  out = re.sub(r"[^A-Za-z0-9_]+", separator, name).strip(separator + "_")
  if separator != "_":
    out = re.sub(re.escape(separator) + "+", separator, out)
  return out or "unnamed"


class Names:
  """A line's metric keys as an exporter's names, each name kept by the first key that took
  it: a later key whose name is taken ("eval/x" beside "eval_x"), or reserved, is left out
  with one warning per key.

  Args:
    exporter: its name, for the warning.
    name_of: key -> the exporter's metric name.
    reserved: names no key may take (the exporter's own series).
  """

  def __init__(self, exporter: str, name_of, reserved: Iterable[str] = ()):
    self.exporter = exporter
    self.name_of = name_of
    self.reserved = frozenset(reserved)
    self._owner: dict[str, str] = {}  # name -> the key that took it
    self._skipped: set[str] = set()

  def items(self, line: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(name, key, value) of the line's numeric metrics whose names are theirs."""
    out = []
    for key, value in numeric(line).items():
      name = self.name_of(key)
      owner = None if name in self.reserved else self._owner.setdefault(name, key)
      if owner == key:
        out.append((name, key, value))
      elif key not in self._skipped:  # warned once per key
        self._skipped.add(key)
        logging.warning(
          "%s: metric %r is not exported: its name %s is taken%s.",
          self.exporter,
          key,
          name,
          "" if owner is None else f" by {owner!r}",
        )
    return out


def known_rules(run_config: Mapping[str, Any]) -> dict[str, str]:
  """rule -> severity of the enabled alert rules in the run's `monitor.alerts` section (empty
  when the stage has no monitor, or it is off): counters start at 0 for these, so a rate over
  a rule's first alert is right."""
  try:
    section = run_config.get("monitor") or {}
    if not section.get("enabled", True):
      return {}
    rules = section.get("alerts") or {}
    return {
      str(name): str(rule.get("severity", "warning"))
      for name, rule in rules.items()
      if rule.get("enabled", True)
    }
  except AttributeError:  # not the monitor section's shape: nothing to pre-create
    return {}
