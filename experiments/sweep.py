r"""Runs an ablation sweep (a grid of config values over seeds) and reports it with statistics.

  python -m experiments.sweep --config=configs/ppo.py --sweep=configs/sweeps/kl_coef.py \
    --workdir=runs/sweep_kl
  python -m experiments.sweep --config=configs/ppo.py:runlocal \
    --sweep=configs/sweeps/kl_coef.py:runlocal --workdir=/tmp/sweep --set=total_steps=10
  python -m experiments.sweep ... --executor=ray --address=auto --cpus_per_cell=8 --gpus_per_cell=1

--sweep=FILE[:ARG]  a Python file whose get_sweep(ARG) returns the cells (rlhf_jax.sweeps.hyper):
                    products and zips of config values, plus seeds. A cell may set `config`,
                    the config file it runs (a sweep over methods).
--set=KEY=VALUE     set on every cell (before the cell's own keys); VALUE is read as JSON when
                    it is (--set=total_steps=10, --set=optim.name=adam).
--executor          local (default; --parallel processes at a time) or ray (--address,
                    --cpus_per_cell, --gpus_per_cell per task).
--stages_dir        a stage store shared with other sweeps: the upstream stages live there
                    (default <workdir>/stages), so equal SFT/reward sections train once.
--metric            the metric the comparisons test (default gold_reward when the cells have
                    it); --metrics the columns of the table (default: every metric).
--baseline          the setting every other one is compared with ("kl.init_coef=0.05"); by
                    default every pair is compared (up to 10 settings).
--dry_run           print the stages and cells, check every config, run nothing.
--report_only       write the report of the cells finished so far, run nothing.

Upstream stages (SFT, the reward model) are trained once per distinct config of their section
and shared by the cells: a sweep over a PPO knob and seeds trains one SFT policy and one reward
model. A sweep that varies them sets their keys (`sft.seed`, `reward.seed`,
`reward.ensemble_size`). Finished stages and cells are reused and killed ones resume, so a
sweep is rerun until it completes; the report (<workdir>/sweep_report.md, .json and plots) is
written at the end of every run. Ctrl-C or SIGTERM stops the running jobs the same way
(they save a checkpoint and resume on the next run). Exit status: 0 when every cell
finished; 2 for bad input (here, or the only kind of failure of the failed cells); 1 when a
cell failed otherwise.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

from rlhf_jax import config_utils, errors
from rlhf_jax.sweeps import cli, report, runner

_CONFIG = flags.DEFINE_string("config", None, "Config file, FILE[:ARG], of cells without one.")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, FILE[:ARG], with get_sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder; default runs/sweep_<sweep name>.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE set on every cell's config.")
_METRIC = flags.DEFINE_string("metric", None, "Metric of the comparisons.")
_METRICS = flags.DEFINE_list("metrics", None, "Metrics in the table; default all.")
_BASELINE = flags.DEFINE_string("baseline", None, "Setting label compared with every other.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Confidence of intervals and tests.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Plan and check only.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Report the finished cells only.")


def default_workdir(sweep_spec: str) -> str:
  """runs/sweep_<stem>[_<arg>] for --sweep=configs/sweeps/<stem>.py[:<arg>]."""
  name = os.path.basename(config_utils.default_workdir(sweep_spec, "runs"))
  return os.path.join("runs", f"sweep_{name}")


def describe(plan: runner.Plan) -> str:
  """The stages and cells, one line each, with what is finished."""
  lines = [f"{len(plan.stages)} upstream stage(s), {len(plan.cells)} cell(s) in {plan.root}:"]
  for job in [*plan.stages, *plan.cells]:
    state = "finished" if runner.is_done(plan, job) else "to run"
    uses = f" (uses {', '.join(job.init.values())})" if job.init else ""
    lines.append(f"  {job.name}: {state}{uses}")
  return "\n".join(lines)


def sweep(workdir: str) -> int:
  """Plans, runs and reports the sweep; returns the exit status."""
  overrides = config_utils.parse_set_args(_SET.value)
  cells = runner.load_sweep(_SWEEP.value)
  plan = runner.plan(workdir, cells, _CONFIG.value, overrides, stages_dir=cli.stages_dir())
  labels = list(dict.fromkeys(report.setting_label(job.setting) for job in plan.cells))
  if _BASELINE.value is not None and _BASELINE.value not in labels:
    raise errors.ConfigError(
      f"--baseline={_BASELINE.value!r} is not a setting of this sweep; its settings: "
      + ", ".join(repr(label) for label in labels)
    )
  if _DRY_RUN.value:
    print(describe(plan))
    return 0
  executor = None if _REPORT_ONLY.value else cli.make_executor()  # Ray missing: before any write
  runner.write_plan(
    plan, {"config": _CONFIG.value, "sweep": _SWEEP.value, "set": overrides, "cells": cells}
  )
  logging.info("%s", describe(plan))
  outcomes = {} if executor is None else runner.run(plan, executor)
  records = runner.records(plan, outcomes)
  done = [r for r in records if r["status"] == "done"]
  if done:
    written = report.write(
      plan.root,
      records,
      metrics=_METRICS.value,
      metric=_METRIC.value,
      baseline=_BASELINE.value,
      confidence=_CONFIDENCE.value,
      title=f"Sweep {os.path.basename(_SWEEP.value)}",
    )
    with open(os.path.join(plan.root, "sweep_report.md"), encoding="utf-8") as f:
      print(f.read())
    print(f"Wrote {os.path.join(plan.root, 'sweep_report.md')}, .json and {written['plots']}")
  failed = [r for r in records if r["status"] != "done"]
  for r in failed:
    sys.stderr.write(f"Cell {r['name']} failed: {r['error']} (log: {r['log']})\n")
  if not failed:
    return 0
  if _REPORT_ONLY.value:
    return 0
  codes = {o.returncode for o in outcomes.values() if o.returncode != 0}
  return errors.EXIT_CODE if codes == {errors.EXIT_CODE} else 1


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", exitcode=errors.EXIT_CODE)
  workdir = _WORKDIR.value or default_workdir(_SWEEP.value)
  # SIGTERM unwinds like Ctrl-C: the running jobs get SIGTERM too (they checkpoint and stop).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    code = sweep(workdir)
  except errors.Error as error:
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  sys.exit(code)


if __name__ == "__main__":
  flags.mark_flag_as_required("sweep")
  app.run(main)
