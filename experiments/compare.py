"""PPO, DPO, GRPO, RLOO and best-of-n on the testbed, each at several KL budgets and seeds.

    python -m experiments.compare                                  # runs/compare
    python -m experiments.compare --size=runlocal --workdir=/tmp/compare
    python -m experiments.compare --methods=ppo,best_of_n --seeds=0,1,2 --parallel=2
    python -m experiments.compare --executor=ray --address=auto --gpus_per_cell=1

A sweep over methods (rlhf_jax/sweeps): each method runs at each of its KL budgets (its KL
knob: PPO's fixed beta, DPO's beta, the GRPO and RLOO KL coefficients; best-of-n's n, all
from one run; evals more frequent than the configs' defaults, for the curves) and each seed
(--seeds; PPO's, DPO's, ... seed, the RL stage's randomness) into
<workdir>/cells/config=<method>+<knob>=<value>+seed=<s>. The methods' configs share their
`sft` and `reward` sections, so one SFT stage and one reward model are trained into
<workdir>/stages/ (or the store --stages_dir, shared with other sweeps) and shared by every
run: all methods start from the same policy and
optimise the same proxy (DPO learns from the very pairs the reward model was trained on).
Finished runs are reused and interrupted ones resume, so the command can be rerun until it
completes.

Writes to the workdir:
  comparison.md    the table: gold reward (and its gain over SFT), proxy reward, KL to SFT,
                   win rate vs SFT (judged by gold), the peak gold along the run (and at what
                   KL), wall time; with several seeds, each the mean ± the half-width of its
                   95% t interval over seeds
  comparison.json  the same rows, machine-readable
  reward_vs_kl.png gold and proxy reward against sqrt(KL) for every run of the first seed,
                   every eval point (Gao et al. 2022)
  sweep_report.md  the sweep's statistics: every metric per setting, and the paired
                   differences of gold reward between settings, resolved or not
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from rlhf_jax import config_utils, errors, metrics, plots, utils
from rlhf_jax.sweeps import cli, executors, runner
from rlhf_jax.sweeps import report as sweep_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (config, KL knob, its values at --size=full, at --size=runlocal, fixed overrides)
SWEEPS: dict[str, tuple[str, str | None, tuple, tuple, dict[str, Any]]] = {
  "ppo": (
    "configs/ppo.py",
    "kl.init_coef",
    (0.005, 0.05, 0.2),
    (0.01, 0.1),
    {"kl.controller": "fixed", "eval_every": 10},
  ),
  "dpo": ("configs/dpo.py", "beta", (0.1, 0.3, 1.0), (0.3,), {"eval_every": 50}),
  "grpo": ("configs/grpo.py", "kl.coef", (0.0, 0.04, 0.2), (0.04,), {"eval_every": 10}),
  "rloo": ("configs/rloo.py", "kl.coef", (0.0, 0.05, 0.2), (0.05,), {"eval_every": 10}),
  "best_of_n": ("configs/best_of_n.py", None, (None,), (None,), {}),
}
METHODS = tuple(SWEEPS)


@dataclasses.dataclass
class Run:
  """One run of the comparison: a method at one KL budget and one seed (a sweep cell)."""

  method: str
  config: str  # config spec, e.g. "configs/ppo.py:runlocal"
  knob: str | None
  value: Any
  overrides: dict[str, Any]
  seed: int = 0

  @property
  def label(self) -> str:
    return self.method if self.knob is None else f"{self.method} {self.knob}={self.value}"

  def cell(self) -> dict[str, Any]:
    """The sweep cell: its config file, the overrides, the knob's value and the seed."""
    cell = {"config": self.config, **self.overrides}
    if self.knob is not None:
      cell[self.knob] = self.value
    cell["seed"] = self.seed
    return cell


def plan(
  size: str = "full",
  methods: Sequence[str] = METHODS,
  overrides: dict[str, Any] | None = None,
  per_method: dict[str, dict[str, Any]] | None = None,
  values: dict[str, Sequence[Any]] | None = None,
  seeds: Sequence[int] = (0,),
) -> list[Run]:
  """The runs of a comparison: every method at each of its KL budgets, for each seed.

  Args:
    size: "full" or "runlocal" (the configs' runlocal variants and fewer budgets).
    methods: which of METHODS to run.
    overrides: dotted config keys set on every run (e.g. {"sft.total_steps": 100}).
    per_method: method -> dotted keys set on that method's runs.
    values: method -> KL-knob values replacing the default budgets.
    seeds: the seeds every method runs at each budget.
  """
  if size not in ("full", "runlocal"):
    raise ValueError(f"size={size!r}; expected 'full' or 'runlocal'.")
  if "seed" in (overrides or {}):
    raise ValueError("Set the seeds with --seeds, not --set=seed=...")
  runs = []
  for method in methods:
    if method not in SWEEPS:
      raise ValueError(f"Unknown method {method!r}; expected some of {', '.join(METHODS)}.")
    path, knob, full, local, fixed = SWEEPS[method]
    chosen = (values or {}).get(method, full if size == "full" else local)
    spec = os.path.join(REPO, path) + (":runlocal" if size == "runlocal" else "")
    extra = {**fixed, **(overrides or {}), **(per_method or {}).get(method, {})}
    for value in chosen:
      for seed in seeds:
        runs.append(Run(method, spec, knob, value, extra, seed))
  return runs


def row(run: Run, record: dict[str, Any]) -> dict[str, Any]:
  """One finished run's table row: its summary's numbers and the peak gold along the run."""
  m = record["metrics"]
  peak = max(record["curve"], key=lambda r: r["gold_reward"])
  return {
    "method": run.method,
    "knob": run.knob or "n",
    "value": run.value if run.knob else int(m["n"]),
    "label": run.label,
    "seed": run.seed,
    "workdir": record["workdir"],
    "sft_gold_reward": m["sft_gold_reward"],
    "gold_reward": m["gold_reward"],
    "gold_reward_gain": m["gold_reward_gain"],
    "proxy_reward": m["proxy_reward"],
    "kl_to_ref": m["kl_to_ref"],
    "win_rate_vs_sft": m["win_rate_vs_sft"],
    "peak_gold_reward": peak["gold_reward"],
    "peak_gold_kl": peak["kl_to_ref"],
    "wall_time_s": m["wall_time_s"],
  }


COLUMNS = (
  "sft_gold_reward", "gold_reward", "gold_reward_gain", "proxy_reward", "kl_to_ref",
  "win_rate_vs_sft", "peak_gold_reward", "peak_gold_kl", "wall_time_s",
)  # fmt: skip


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows of one method and budget over seeds: each column's mean, with its t interval
  under `<column>_ci` ([low, high]; NaN for one seed), in the runs' order."""
  keys = ("method", "knob", "value", "label")
  cells = [
    {
      "status": "done",
      "name": r["workdir"],
      "setting": {k: r[k] for k in keys},
      "seeds": {"seed": r["seed"]},
      "metrics": {column: r[column] for column in COLUMNS},
    }
    for r in rows
  ]
  out = []
  for summary in sweep_report.aggregate(cells, metrics=COLUMNS):
    merged = dict(summary["setting"])
    merged["seeds"] = [s["seed"] for s in summary["seeds"]]
    merged["workdirs"] = summary["names"]
    for column, s in summary["metrics"].items():
      merged[column] = s["mean"]
      merged[f"{column}_ci"] = [s["low"], s["high"]]
    out.append(merged)
  return out


def _pm(r: dict[str, Any], column: str, fmt: str) -> str:
  text = format(r[column], fmt)
  low, high = r.get(f"{column}_ci", (float("nan"), float("nan")))
  if low == low and high == high:  # not NaN: several seeds
    text += f" ± {format((high - low) / 2, fmt.lstrip('+'))}"
  return text


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The comparison as a Markdown table (rows of `aggregate`)."""
  head = (
    "| method | KL knob | seeds | gold reward (gain vs SFT) | proxy reward | KL to SFT "
    "| win rate vs SFT | peak gold (at KL) | wall time |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
  )
  body = ""
  for r in rows:
    knob = f"{r['knob']}={r['value']}"
    body += (
      f"| {r['method']} | {knob} | {len(r['seeds'])} "
      f"| {_pm(r, 'gold_reward', '+.2f')} ({_pm(r, 'gold_reward_gain', '+.2f')}) "
      f"| {_pm(r, 'proxy_reward', '+.2f')} | {_pm(r, 'kl_to_ref', '.2f')} "
      f"| {_pm(r, 'win_rate_vs_sft', '.2f')} "
      f"| {r['peak_gold_reward']:+.2f} ({r['peak_gold_kl']:.2f}) | {r['wall_time_s']:.0f} s |\n"
    )
  return head + body


def report(workdir: str, rows: Sequence[dict[str, Any]], records, note: str = "") -> None:
  """Writes comparison.md, comparison.json, reward_vs_kl.png and the sweep's report."""
  sft = rows[0]["sft_gold_reward"] if rows else float("nan")
  seeds = sorted({s for r in rows for s in r["seeds"]})
  intervals = " Each figure is the mean over seeds ± the half-width of its 95% t interval."
  text = (
    f"# Comparison on the testbed\n\nSFT policy gold reward: {sft:+.2f}. Seeds: "
    f"{', '.join(map(str, seeds))}.{intervals if len(seeds) > 1 else ''}{note}\n\n{table(rows)}"
  )
  with utils.atomic_open(os.path.join(workdir, "comparison.md")) as f:
    f.write(text)
  utils.write_json_atomic(os.path.join(workdir, "comparison.json"), utils.jsonable(list(rows)))
  first = {r["label"]: r["workdirs"][0] for r in rows}
  curves = {label: _eval_lines(path) for label, path in first.items()}
  plots.reward_vs_kl(
    curves,
    os.path.join(workdir, "reward_vs_kl.png"),
    title=f"Gold and proxy reward against sqrt(KL to SFT): every eval point (seed {seeds[0]})",
    styles=_styles(rows),
  )
  sweep_report.write(workdir, records, metric="gold_reward", title="Comparison: the sweep")


def _eval_lines(workdir: str) -> list[dict[str, Any]]:
  return [x for x in metrics.read_metrics(workdir) if "eval/gold_reward" in x]


def _styles(rows) -> dict[str, dict[str, Any]]:
  """One colour per method; the KL budgets of a method differ by line style."""
  colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3", "k"), strict=True))
  dashes = ("-", "--", ":", "-.")
  seen: dict[str, int] = {}
  styles = {}
  for r in rows:
    index = seen.setdefault(r["method"], 0)
    seen[r["method"]] += 1
    styles[r["label"]] = {"color": colors.get(r["method"]), "ls": dashes[index % len(dashes)]}
  return styles


def compare(
  workdir: str, runs: Sequence[Run], executor=None, stages_dir: str = ""
) -> list[dict[str, Any]]:
  """Plans the sweep (every config checked first), trains the shared stages, runs every run,
  writes the report; returns the aggregated rows.

  Raises:
    ConfigError: a bad key or value in any run, before anything trains.
    SweepFailed: some runs failed (the report of the others is written first).
  """
  start = time.perf_counter()
  sweep_plan = runner.plan(workdir, [r.cell() for r in runs], None, stages_dir=stages_dir)
  runner.write_plan(sweep_plan, {"compare": [dataclasses.asdict(r) for r in runs]})
  outcomes = runner.run(sweep_plan, executor or executors.LocalExecutor())
  records = runner.records(sweep_plan, outcomes)
  done = [(run, rec) for run, rec in zip(runs, records, strict=True) if rec["status"] == "done"]
  rows = aggregate([row(run, rec) for run, rec in done])
  if rows:
    report(workdir, rows, records)
  logging.info(
    "compare: %d runs in %.0f s\n%s", len(done), time.perf_counter() - start, table(rows)
  )
  failed = [rec for rec in records if rec["status"] != "done"]
  if failed:
    raise SweepFailed(failed, outcomes)
  return rows


class SweepFailed(Exception):
  """Some runs of a comparison failed; `records` are theirs, `outcomes` every job's."""

  def __init__(self, records, outcomes):
    super().__init__(f"{len(records)} run(s) failed")
    self.records = records
    self.outcomes = outcomes


# ------------------------------------------------------------------------ CLI

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Folder of the comparison.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "runlocal"], "Config sizes.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Some of {', '.join(METHODS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of every method and budget.")
_SET = flags.DEFINE_multi_string(
  "set", [], "key=value set on every run's config (sft.*, reward.*: the shared stages')."
)


def main(argv: list[str]) -> None:
  del argv
  try:
    shared = config_utils.parse_set_args(_SET.value)
    seeds = [int(s) for s in _SEEDS.value]
    runs = plan(_SIZE.value, _METHODS.value, overrides=shared, seeds=seeds)
  except ValueError as error:  # an unknown method or size, a bad --set or --seeds
    sys.stderr.write(f"FATAL config error: {error}\n")
    sys.exit(errors.EXIT_CODE)
  try:
    rows = compare(_WORKDIR.value, runs, cli.make_executor(), cli.stages_dir())
  except errors.Error as error:  # bad input, reported as the launcher reports it
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  except SweepFailed as failure:
    for r in failure.records:
      sys.stderr.write(f"Run {r['name']} failed: {r['error']} (log: {r['log']})\n")
    codes = {o.returncode for o in failure.outcomes.values() if o.returncode}
    sys.exit(errors.EXIT_CODE if codes == {errors.EXIT_CODE} else 1)
  print(table(rows))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'comparison.md')} and reward_vs_kl.png")


if __name__ == "__main__":
  app.run(main)
