"""One stage's watch: the monitor and the alert rules at every eval, with their files.

`evaluation.Evaluator` holds a `Watch` when the stage's config has a `monitor` section with
`enabled=True`. At each eval it calls `observe`, which

  - runs `Monitor.update` on the eval's samples and keeps the finite `monitor/...` metrics
    (an undefined one, e.g. a trend before there are enough evals, is left out of the line);
  - checks the alert rules on the eval line and those metrics; fired alerts are appended to
    `<workdir>/alerts.jsonl` and logged (a warning each; critical ones as errors);
  - "stop": `stopped` becomes the step; the trainer ends the stage there and exports the
    policy it has (the summary says why), and a rerun does not train on;
  - "keep_best": from the first eval on, the policy with the best criterion (`eval/...`,
    max or min) of any keep_best rule is exported to `<workdir>/best/`, a finished policy
    stage (`policy_init=<workdir>/best` starts from it); when a keep_best alert fires, the
    summary names that policy as the one to use;
  - writes the monitor's and the rules' state to `<workdir>/monitor/state_<step>.json`, so
    a resumed stage carries on with the state of its checkpoint's step (and drops the
    alerts of later steps): a resumed run's metrics and alerts equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from rlhf_jax import utils
from rlhf_jax.monitor import alerts as alerts_lib
from rlhf_jax.monitor.monitor import Monitor

STATE_DIR = "monitor"
BEST_DIR = "best"
KEEP_STATES = 20  # state files kept (the newest); a resume reads the one at or before its step
_STATE = re.compile(r"state_(\d+)\.json$")


def enabled(config: Any) -> bool:
  section = config.get("monitor") if hasattr(config, "get") else None
  return bool(section is not None and section.get("enabled", True))


class Watch:
  """The monitor and alert engine of a stage (see the module docstring).

  Args:
    section: the stage's `config.monitor`.
    workdir: the stage's folder.
    start_step: the step the stage starts (or resumes) from.
    primary: whether this process writes the files (process 0).
    export_best: f(dir, params, meta) writing a finished policy stage (`stages.export`).
    exporter: the stage's metric exporters (`rlhf_jax.exporters`), which get the alerts.
  """

  def __init__(
    self,
    section: Any,
    workdir: str,
    start_step: int,
    *,
    primary: bool = True,
    export_best: Callable[[str, Any, dict[str, Any]], None] | None = None,
    exporter: Any = None,
  ):
    self.exporter = exporter  # rlhf_jax.exporters: alerts to Prometheus / W&B / DogStatsD
    self.monitor = Monitor(section)
    self.engine = alerts_lib.AlertEngine.from_config(section.get("alerts"))
    self.workdir, self.primary = workdir, primary
    self.state_dir = os.path.join(workdir, STATE_DIR)
    self.alerts_path = os.path.join(workdir, alerts_lib.ALERTS_FILENAME)
    self.best_dir = os.path.join(workdir, BEST_DIR)
    self.export_best = export_best
    rules = self.engine.rules.values()
    self.criteria = [(r.criterion, r.mode) for r in rules if r.action == "keep_best"]
    self.stopped: int | None = None  # the step a "stop" alert ended the stage at
    self.best: dict[str, Any] | None = None  # {"step", "criterion", "mode", "value"}
    self.best_recommended = False  # a keep_best alert fired
    self.fired: list[dict[str, Any]] = []  # this stage's alerts so far (as dicts)
    if start_step > 0:
      self._restore(start_step)

  # ----------------------------------------------------------------- state
  def _state_path(self, step: int) -> str:
    return os.path.join(self.state_dir, f"state_{step:07d}.json")

  def _steps(self) -> list[int]:
    if not os.path.isdir(self.state_dir):
      return []
    return sorted(int(m.group(1)) for n in os.listdir(self.state_dir) if (m := _STATE.match(n)))

  def _restore(self, start_step: int) -> None:
    steps = [s for s in self._steps() if s <= start_step]
    if steps:
      with open(self._state_path(steps[-1])) as f:
        state = json.load(f)
      self.monitor.load_state_dict(state["monitor"])
      self.engine.load_state_dict(state["alerts"])
      self.stopped, self.best = state.get("stopped"), state.get("best")
      self.best_recommended = bool(state.get("best_recommended"))
      self.fired = list(state.get("fired", []))
    if self.primary:
      alerts_lib.drop_after(self.alerts_path, start_step)

  def _save(self, step: int) -> None:
    if not self.primary:
      return
    state = {
      "monitor": self.monitor.state_dict(),
      "alerts": self.engine.state_dict(),
      "stopped": self.stopped,
      "best": self.best,
      "best_recommended": self.best_recommended,
      "fired": self.fired,
    }
    os.makedirs(self.state_dir, exist_ok=True)
    utils.write_json_atomic(self._state_path(step), utils.jsonable(state))
    for old in self._steps()[:-KEEP_STATES]:
      os.remove(self._state_path(old))

  # ------------------------------------------------------------------ an eval
  def observe(self, step: int, line: Mapping[str, float], params=None, meta=None, **inputs):
    """The monitor metrics of one eval (`inputs`: Monitor.update's), its alerts handled.

    `line`: the eval's own metrics (rules may watch them; keep_best reads its criterion).
    `params`, `meta`: the evaluated policy and its export fields, for keep_best.
    Returns the finite monitor metrics and `monitor/alerts` (how many fired).
    """
    metrics = self.monitor.update(step, **inputs)
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    fired = self.engine.check(step, {**line, **finite})
    # An eval repeated at a step already watched (a stage resumed at its final or stopping
    # step re-evaluates it) has its alerts on record already.
    repeated = any(a["step"] == step for a in self.fired)
    for alert in [] if repeated else fired:
      log = logging.error if alert.severity == "critical" else logging.warning
      log("Alert %s at step %d: %s", alert.rule, step, alert.message)
    if self.primary and not repeated:
      alerts_lib.write(fired, self.alerts_path)
      if self.exporter is not None:
        self.exporter.alerts(fired)
    if not repeated:
      self.fired += [a.to_dict() for a in fired]
    if alerts_lib.keep_best_requests(fired):
      self.best_recommended = True
    if alerts_lib.should_stop(fired) and self.stopped is None:
      self.stopped = step
    self._keep_best(step, line, params, meta)
    self._save(step)
    return {**finite, "monitor/alerts": float(len(fired))}

  def _keep_best(self, step, line, params, meta) -> None:
    if not self.criteria or params is None or self.export_best is None:
      return
    criterion, mode = self.criteria[0]  # one best policy: the first keep_best rule's
    value = line.get(criterion)
    if value is None or not math.isfinite(value):
      return
    better = self.best is None or (
      value > self.best["value"] if mode == "max" else value < self.best["value"]
    )
    if better:
      self.best = {"step": step, "criterion": criterion, "mode": mode, "value": float(value)}
      self.export_best(self.best_dir, params, {**(meta or {}), "step": step, "best": self.best})

  def summary(self) -> dict[str, Any]:
    """What summary.json records of the watch."""
    return {
      "alerts": len(self.fired),
      "alert_rules_fired": sorted({a["rule"] for a in self.fired}),
      "stopped_by_alert_at": self.stopped,
      # "dir" relative to the workdir (the summary sits there), so a copied workdir holds.
      "best": {**self.best, "dir": BEST_DIR, "recommended": self.best_recommended}
      if self.best
      else None,
    }
