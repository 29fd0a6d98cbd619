r"""The feedback loop's study on the testbed: more rounds and active selection, at one budget.

    python -m experiments.loop_study --workdir=runs/loop_study
    python -m experiments.loop_study --size=runlocal --workdir=/tmp/study --seeds=0
    python -m experiments.loop_study --rounds=1,3,5 --strategies=random,ensemble_disagreement \
      --seeds=0,1,2 --total_labels=3000 --sft=runs/sft

Every cell is a run of configs/loop.py with the same total label budget, reward-model steps
and policy iterations, split evenly over its rounds (the reward model continues from round
to round, so each cell trains it for the same number of steps): one round is today's
pipeline (label, train the reward model, run PPO), R rounds label a 1/R share each time from
the current policy's samples. One-round cells have no reward model to select with, so they
run once, as random selection. All cells share one SFT stage (`--sft`, or trained into
<workdir>/sft) and one set of held-out pairs (<workdir>/eval_pairs.jsonl) on which every
reward model is measured. Finished cells are reused and interrupted ones resume (rerun the
command until it completes); `--report_only` writes the report from the finished cells
without running any. Each cell holds its folder's lock while it runs (a second process on
it is refused), so two studies with overlapping seeds cannot train one cell side by side.

Writes to the workdir:
  loop_study.md    per cell, mean and standard deviation over seeds of the final gold reward
                   (and its gain over SFT), the final reward model's accuracy on the held-out
                   pairs, KL to SFT, labels used; then each multi-round cell against one
                   round, paired by seed: the difference in final gold and in reward-model
                   accuracy with its 95% t interval and Holm-corrected p (resolved or not),
                   and the labels at which its gold first reached the one-round run's final
                   gold (a share of the budget, per seed: did it need half the labels?)
  loop_study.json  the same, and every round of every run
  loop_study.png   reward-model accuracy and gold reward against labels used, per cell
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from rlhf_jax import config_utils, errors, utils
from rlhf_jax.sweeps import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# size -> (total labels, reward-model steps, policy iterations, held-out pairs)
SIZES = {
  "study": dict(total_labels=3000, reward_steps=300, rl_steps=30, eval_pairs=1000),
  "runlocal": dict(total_labels=240, reward_steps=40, rl_steps=6, eval_pairs=128),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined when it runs, so importing the module (the tests do,
  beside experiments.compare's own --workdir) defines none."""
  flags.DEFINE_string("workdir", "runs/loop_study", "Where the cells and report go.")
  flags.DEFINE_enum("size", "study", list(SIZES), "Budget preset (see SIZES).")
  flags.DEFINE_list("rounds", ["1", "3", "5"], "Round counts to compare.")
  flags.DEFINE_list(
    "strategies", ["random", "ensemble_disagreement"], "Selection strategies to compare."
  )
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (model and data) of every cell.")
  flags.DEFINE_integer("total_labels", None, "Labels per run; default: the size's.")
  flags.DEFINE_string("sft", "", "A finished SFT stage to share; default: train one.")
  flags.DEFINE_float(
    "candidates_per_label", 3.0, "Candidate pairs sampled per pair to label (each round)."
  )
  flags.DEFINE_bool("report_only", False, "Report the finished cells; run none.")


def cells(rounds: Sequence[int], strategies: Sequence[str]) -> list[tuple[int, str]]:
  """(rounds, strategy) cells: one-round cells once (random), the others per strategy."""
  out = []
  for r in rounds:
    for s in ["random"] if r == 1 else strategies:
      if (r, s) not in out:
        out.append((r, s))
  return out


def cell_name(rounds: int, strategy: str) -> str:
  return f"rounds={rounds},strategy={strategy}"


def cell_config(
  size: str, rounds: int, strategy: str, seed: int, total: int, sft: str, evals,
  candidates_per_label: float = 3.0,
):  # fmt: skip
  """configs/loop.py for one cell: the budget, reward steps and policy iterations split
  evenly over the rounds; `candidates_per_label` candidate pairs sampled per pair bought."""
  preset = SIZES[size]
  spec = "configs/loop.py:runlocal" if size == "runlocal" else "configs/loop.py"
  config = config_utils.load_config(os.path.join(REPO, f"{spec}"))
  per_round = -(-total // rounds)
  k = config.candidates.responses_per_prompt
  pairs_per_prompt = k * (k - 1) // 2
  prompts = math.ceil(per_round * candidates_per_label / pairs_per_prompt)
  shards = 2  # sample batches split evenly over up to 2 devices
  config.update(
    seed=seed, rounds=rounds, strategy=strategy, labels_per_round=per_round,
    total_labels=total, policy_init=sft, eval_files=tuple(evals),
    num_eval_pairs=preset["eval_pairs"],
  )  # fmt: skip
  config.data.seed = seed
  config.candidates.prompts_per_round = prompts
  config.candidates.sample_batch = min(
    config.candidates.sample_batch, -(-prompts // shards) * shards
  )
  config.reward.total_steps = max(2, -(-preset["reward_steps"] // rounds))
  config.reward.optim.warmup_steps = min(
    config.reward.optim.warmup_steps, config.reward.total_steps - 1
  )
  config.reward.eval_every = config.reward.checkpoint_every = config.reward.total_steps
  # The policy stages run their whole length: no alert may stop one early (the monitor's
  # "stop" rules would make cells differ by more than their rounds and selection).
  if "monitor" in config.rl:
    config.rl.monitor.enabled = False
  config.rl.total_steps = max(1, -(-preset["rl_steps"] // rounds))
  config.rl.eval_every = config.rl.checkpoint_every = config.rl.total_steps
  config.rl.log_every = min(config.rl.log_every, config.rl.total_steps)
  return config


def summarize(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
  """Per cell: mean and std over seeds of the final figures (from each run's loop.json)."""
  rows = []
  for name, by_seed in results.items():
    finals = [runs["rounds"][-1] for runs in by_seed.values()]
    row: dict[str, Any] = {"cell": name, "seeds": sorted(by_seed)}
    for key, get in (
      ("gold_reward", lambda r: r["policy"]["gold_reward"]),
      ("gold_gain", lambda r: r["policy"]["gold_reward_gain"]),
      ("rm_accuracy", lambda r: r["reward_eval_accuracy"]),
      ("kl_to_sft", lambda r: r["policy"]["kl_to_ref"]),
      ("labels", lambda r: r["labels_total"]),
      ("gate_precision", lambda r: (r["gate_testbed"] or {}).get("precision")),
      ("gate_recall", lambda r: (r["gate_testbed"] or {}).get("recall")),
    ):
      values = np.asarray([get(f) for f in finals], np.float64)  # None (no flag): NaN
      values = values[np.isfinite(values)]
      row[key] = float(values.mean()) if len(values) else float("nan")
      row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    rows.append(row)
  return rows


BASELINE = "rounds=1,strategy=random"


def labels_to_reach(run: dict[str, Any], target: float) -> float | None:
  """The labels at which a run's gold reward first reached `target`: linear between its
  points (0 labels at the SFT policy's gold, then each round's labels and policy gold);
  None when it never did."""
  first = run["rounds"][0]["policy"]
  points = [(0.0, first["gold_reward"] - first["gold_reward_gain"])]
  points += [(float(r["labels_total"]), r["policy"]["gold_reward"]) for r in run["rounds"]]
  if points[0][1] >= target:
    return 0.0
  for (n0, g0), (n1, g1) in itertools.pairwise(points):
    if g1 >= target:
      return n0 + (n1 - n0) * (target - g0) / (g1 - g0)
  return None


def against_one_round(
  results: dict[str, dict[int, dict[str, Any]]], confidence: float = 0.95
) -> list[dict[str, Any]]:
  """Each other cell against the one-round cell, paired by seed.

  For the final gold reward and the final reward model's accuracy: the mean difference
  (cell - one round) over the shared seeds, its t interval, p and Holm's p over the family
  of both metrics' comparisons (`stats.paired_difference`, `stats.holm`). And per seed, the
  share of the one-round run's labels at which the cell's gold first reached that run's
  final gold (`labels_to_reach`; None: never). Only seeds both cells ran are compared.
  Empty without a one-round cell.
  """
  if BASELINE not in results:
    return []
  finals = {
    "gold": lambda run: run["rounds"][-1]["policy"]["gold_reward"],
    "rm_accuracy": lambda run: run["rounds"][-1]["reward_eval_accuracy"],
  }
  base = results[BASELINE]
  rows = {name: {"cell": name} for name in results if name != BASELINE}
  for name, row in rows.items():
    shared = [seed for seed in results[name] if seed in base]  # pairs only, never unmatched
    for metric, get in finals.items():
      row[metric] = stats.paired_difference(
        {seed: get(results[name][seed]) for seed in shared},
        {seed: get(base[seed]) for seed in shared},
        confidence,
      )
  # Holm over the whole family: 2 metrics x (cells - 1) tests of "differs from one round".
  family = [rows[name][metric] for name in rows for metric in finals]
  alpha = 1.0 - confidence
  for test, p in zip(family, stats.holm([t["p_value"] for t in family]), strict=True):
    test["p_holm"], test["resolved_holm"] = p, bool(p < alpha)
  for name, row in rows.items():
    shares = {}
    for seed, run in results[name].items():
      if seed in base:
        target = finals["gold"](base[seed])
        reached = labels_to_reach(run, target)
        budget = base[seed]["rounds"][-1]["labels_total"]
        shares[seed] = None if reached is None else reached / budget
    row["labels_share_to_reach_one_round_gold"] = shares
  return list(rows.values())


def _diff(test: dict[str, Any]) -> str:
  if not math.isfinite(test["mean"]):
    return "no seed in common"
  if not math.isfinite(test["low"]):
    return f"{test['mean']:+.3f} (one seed, no interval)"
  mark = "resolved" if test["resolved_holm"] else "not resolved"
  return (
    f"{test['mean']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}], "
    f"p {test['p_holm']:.2f} ({mark})"
  )


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| cell | gold - one round | RM accuracy - one round | share of the labels at which "
    "gold reached one round's, per seed |",
    "|---|---|---|---|",
  ]
  for r in rows:
    shares = r["labels_share_to_reach_one_round_gold"]
    reached = ", ".join(
      f"{seed}: " + ("never" if v is None else f"{v:.2f}") for seed, v in sorted(shares.items())
    )
    lines.append(f"| {r['cell']} | {_diff(r['gold'])} | {_diff(r['rm_accuracy'])} | {reached} |")
  return "\n".join(lines)


def _cell(value: float, std: float, digits: int = 3) -> str:
  if math.isnan(std):
    return f"{value:.{digits}f}"
  return f"{value:.{digits}f} +- {std:.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| cell | seeds | labels | RM accuracy | gold reward | gold gain | KL to SFT | gate "
    "precision / recall |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['cell']} | {len(r['seeds'])} | {r['labels']:.0f} | "
      f"{_cell(r['rm_accuracy'], r['rm_accuracy_std'])} | "
      f"{_cell(r['gold_reward'], r['gold_reward_std'])} | "
      f"{_cell(r['gold_gain'], r['gold_gain_std'])} | "
      f"{_cell(r['kl_to_sft'], r['kl_to_sft_std'], 2)} | "
      f"{r['gate_precision']:.2f} / {r['gate_recall']:.2f} |"
    )
  return "\n".join(lines)


def plot(results: dict[str, dict[int, dict[str, Any]]], path: str) -> None:
  """Reward-model accuracy and gold reward against labels used, a line per cell (mean over
  seeds at each round, bars: one standard deviation)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, by_seed in results.items():
    runs = list(by_seed.values())
    count = min(len(r["rounds"]) for r in runs)
    labels = [np.mean([r["rounds"][k]["labels_total"] for r in runs]) for k in range(count)]
    for ax, get in (
      (axes[0], lambda x: x["reward_eval_accuracy"]),
      (axes[1], lambda x: x["policy"]["gold_reward"]),
    ):
      values = np.asarray([[get(r["rounds"][k]) for k in range(count)] for r in runs], float)
      std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(count)
      ax.errorbar(labels, values.mean(axis=0), yerr=std, marker="o", capsize=3, label=name)
  axes[0].set(xlabel="labels used", ylabel="reward-model accuracy (held-out pairs)")
  axes[1].set(xlabel="labels used", ylabel="gold reward of the policy")
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(workdir: str, results, note: str = "") -> str:
  """Writes loop_study.md/.json/.png into `workdir`; returns the Markdown tables."""
  rows = summarize(results)
  versus = against_one_round(results)
  text = table(rows) + "\n\n+- is the standard deviation over seeds."
  if versus:
    text += (
      "\n\nAgainst one round, paired by seed (95% t intervals; p Holm-corrected over the "
      "table's tests):\n\n" + comparison_table(versus)
    )
  with utils.atomic_open(os.path.join(workdir, "loop_study.md")) as f:
    f.write(f"# The feedback loop at one label budget\n\n{note}\n\n{text}\n")
  utils.write_json_atomic(
    os.path.join(workdir, "loop_study.json"),
    {"rows": rows, "against_one_round": versus, "runs": results, "note": note},
  )
  plot(results, os.path.join(workdir, "loop_study.png"))
  return text


def ensure_sft(workdir: str, size: str) -> str:
  from rlhf_jax import stages

  path = FLAGS.sft or os.path.join(workdir, "sft")
  if not stages.is_complete(path):
    spec = "configs/sft.py:runlocal" if size == "runlocal" else "configs/sft.py"
    config_utils.run(config_utils.load_config(os.path.join(REPO, spec)), path)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from rlhf_jax.trainers import loop

  workdir, size = FLAGS.workdir, FLAGS.size
  total = FLAGS.total_labels or SIZES[size]["total_labels"]
  try:
    rounds = [int(r) for r in FLAGS.rounds]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as error:
    sys.stderr.write(f"FATAL flag error: --rounds and --seeds take integers: {error}\n")
    sys.exit(errors.EXIT_CODE)
  grid = cells(rounds, FLAGS.strategies)
  results: dict[str, dict[int, dict[str, Any]]] = {}
  missing = []
  try:
    if not FLAGS.report_only:
      os.makedirs(workdir, exist_ok=True)
      sft = ensure_sft(workdir, size)
      per_label = FLAGS.candidates_per_label
      first = cell_config(size, grid[0][0], grid[0][1], seeds[0], total, sft, (), per_label)
      first.eval_files = ()
      evals = loop.Loop(first, workdir).eval_files()  # one held-out set for every cell
    for seed in seeds:
      for r, strategy in grid:
        cell_dir = os.path.join(workdir, cell_name(r, strategy), f"seed={seed}")
        done = os.path.join(cell_dir, "loop.json")
        if not os.path.exists(done):
          if FLAGS.report_only:
            missing.append(os.path.relpath(cell_dir, workdir))
            continue
          config = cell_config(size, r, strategy, seed, total, sft, evals, per_label)
          logging.info("Cell %s seed %d", cell_name(r, strategy), seed)
          config_utils.run(config, cell_dir)
        results.setdefault(cell_name(r, strategy), {})[seed] = utils.read_json(done)
  except errors.Error as error:
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  if not results:
    sys.stderr.write(f"FATAL no finished cell in {workdir} to report.\n")
    sys.exit(errors.EXIT_CODE)
  note = (
    f"size={size}: {total} labels per run (plus the panel's anchor pairs), "
    f"{SIZES[size]['reward_steps']} reward-model steps and {SIZES[size]['rl_steps']} PPO "
    f"iterations split over the rounds; seeds {seeds}"
    + ("." if FLAGS.report_only else f"; SFT {sft}.")
    + (f" Not finished, left out: {', '.join(missing)}." if missing else "")
  )
  print(report(workdir, results, note))
  print(f"\nWrote {os.path.join(workdir, 'loop_study.md')} and loop_study.json/.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
