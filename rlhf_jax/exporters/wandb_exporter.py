"""Weights & Biases: a run's metrics, eval samples, alerts and reward-vs-KL plot in a W&B run.

`wandb.init(project, entity, name=<the workdir's basename>, job_type=<the trainer>,
config=<the stage's config>, dir=<workdir>, mode)`; then

  write(step, line)  `run.log(line, step=step)` with the numeric metrics, plus, on an eval
                     line (`eval/...` keys) whose step's samples file
                     `<workdir>/samples/step_NNNNNNN.jsonl` exists (an RL stage's), its rows
                     as the table `eval/samples`;
  alerts(alerts)     every alert so far as the table `alerts/table` and the count of this
                     call's as `alerts/fired`, at the alerts' step; in online mode each one
                     is also a W&B alert (`run.alert`: e-mail/Slack as set up in W&B);
  close()            the reward-vs-KL plot (`<workdir>/reward_vs_kl.png` when the run has
                     one, else drawn from the eval lines written, `plots.reward_vs_kl`),
                     the alert count in the summary, then `run.finish()`.

The W&B run's id is kept in `<workdir>/wandb/rlhf_jax_run_id`, so a resumed stage logs to
the same run (online mode resumes it; W&B drops a re-logged step below the run's last one
with a warning). Offline runs (`mode="offline"`, the default) are written under
`<workdir>/wandb/` and uploaded later with `wandb sync <workdir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from rlhf_jax.exporters import base

MODES = ("online", "offline", "disabled")
RUN_ID_FILE = os.path.join("wandb", "rlhf_jax_run_id")
SAMPLES_KEY = "eval/samples"
ALERT_COLUMNS = ("step", "rule", "severity", "metric", "value", "threshold", "action", "message")
PLOT_FILE = "reward_vs_kl.png"
CURVE_KEYS = ("eval/sqrt_kl", "eval/gold_reward", "eval/proxy_reward")


def samples_path(workdir: str, step: int) -> str:
  """The eval samples file of `step` (written by `evaluation.Evaluator.report`)."""
  return os.path.join(workdir, "samples", f"step_{int(step):07d}.jsonl")


def read_samples(path: str) -> tuple[list[str], list[list[Any]]]:
  """(columns, rows) of a samples file: the columns in first-seen order over its records."""
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  columns: list[str] = []
  for record in records:
    columns += [key for key in record if key not in columns]
  return columns, [[record.get(c) for c in columns] for record in records]


class WandbExporter(base.Exporter):
  """Logs the run to W&B (see the module docstring).

  Args:
    context: the run (`base.Context`).
    project, entity: the W&B project and entity ("" = the account's default entity).
    mode: "online", "offline" or "disabled".
  """

  name = "wandb"

  def __init__(
    self, context: base.Context, *, project: str, entity: str = "", mode: str = "offline"
  ):
    import wandb

    self.context, self.mode = context, mode
    self._wandb = wandb
    self._alert_rows: list[list[Any]] = []
    self._curve: list[dict[str, float]] = []
    self._logged_samples: set[int] = set()
    self._last_step: int | None = None
    workdir = context.workdir
    os.makedirs(os.path.join(workdir, "wandb"), exist_ok=True)
    kwargs: dict[str, Any] = dict(
      project=project,
      entity=entity or None,
      name=context.run,
      job_type=context.stage,
      config=dict(context.run_config),
      dir=workdir,
      mode=mode,
      id=self._run_id(),
      reinit="create_new",  # several stages in one process: one W&B run each
    )
    if mode == "online":
      kwargs["resume"] = "allow"
    self.run = wandb.init(**kwargs)
    logging.info("W&B run %s (%s) of stage %s in %s", self.run.id, mode, context.stage, workdir)

  def _run_id(self) -> str:
    path = os.path.join(self.context.workdir, RUN_ID_FILE)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        run_id = f.read().strip()
      if run_id:
        return run_id
    # W&B's own id format: 8 lowercase letters and digits.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open(path, "w", encoding="utf-8") as f:
      f.write(run_id + "\n")
    return run_id

  def write(self, step: int, line: Mapping[str, Any]) -> None:
    step = int(step)
    data: dict[str, Any] = base.numeric(line)
    path = samples_path(self.context.workdir, step)
    is_eval = any(key.startswith("eval/") for key in data)  # the eval wrote the step's file
    if is_eval and step not in self._logged_samples and os.path.exists(path):
      columns, rows = read_samples(path)
      if rows:
        data[SAMPLES_KEY] = self._wandb.Table(columns=columns, data=rows)
      self._logged_samples.add(step)
    if all(key in data for key in CURVE_KEYS):
      self._curve.append({"step": step, **{key: data[key] for key in CURVE_KEYS}})
    self.run.log(data, step=step)
    self._last_step = step

  def alerts(self, alerts: Iterable[Any]) -> None:
    fired = [base.alert_dict(a) for a in alerts]
    if not fired:
      return
    self._alert_rows += [[a.get(c) for c in ALERT_COLUMNS] for a in fired]
    table = self._wandb.Table(columns=list(ALERT_COLUMNS), data=self._alert_rows)
    step = max(a["step"] for a in fired)
    self.run.log({"alerts/table": table, "alerts/fired": len(fired)}, step=step)
    self._last_step = max(step, self._last_step or 0)
    if self.mode != "online":
      return
    levels = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}
    for a in fired:
      level = getattr(self._wandb.AlertLevel, levels.get(a["severity"], "WARN"))
      title = f"{a['rule']} ({a['severity']}) in {self.context.run}/{self.context.stage}"
      self.run.alert(title=title, text=a["message"] or title, level=level)

  def _plot(self, run) -> str | None:
    """The reward-vs-KL plot: the workdir's, else one drawn from the eval lines logged."""
    path = os.path.join(self.context.workdir, PLOT_FILE)
    if os.path.exists(path):
      return path
    if len(self._curve) < 2:
      return None
    from rlhf_jax import plots  # matplotlib: only when there is a curve to draw

    path = os.path.join(run.dir, PLOT_FILE)
    plots.reward_vs_kl({self.context.run: self._curve}, path, title=self.context.run)
    return path

  def close(self) -> None:
    run, self.run = getattr(self, "run", None), None
    if run is None:
      return
    try:
      plot = self._plot(run)
      if plot is not None:
        data = {"reward_vs_kl": self._wandb.Image(plot)}
        run.log(data, **({} if self._last_step is None else {"step": self._last_step}))
      run.summary["alerts"] = len(self._alert_rows)
    finally:
      run.finish()
