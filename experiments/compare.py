"""PPO, DPO, GRPO, RLOO and best-of-n on the testbed, each at several KL budgets.

    python -m experiments.compare                                  # runs/compare
    python -m experiments.compare --size=runlocal --workdir=/tmp/compare
    python -m experiments.compare --methods=ppo,best_of_n --set=seed=1

One SFT stage and one reward model (configs/ppo.py's sections) are trained
into <workdir>/sft and <workdir>/reward and shared by every run, so all
methods start from the same policy and optimise the same proxy (DPO learns
from the very pairs the reward model was trained on). Each method then runs
once per KL budget (its KL knob: PPO's fixed beta, DPO's beta, the GRPO and
RLOO KL coefficients; best-of-n's n, all from one run; evals made more
frequent than the configs' defaults, for the curves) into
<workdir>/<method>/<knob>=<value>. Finished runs are reused and interrupted
ones resume, so the command can be rerun until it completes.

Writes to the workdir:
  comparison.md    the table: gold reward (and its gain over SFT), proxy
                   reward, KL to SFT, win rate vs SFT (judged by gold), the
                   peak gold along the run (and at what KL), wall time
  comparison.json  the same rows, machine-readable
  reward_vs_kl.png gold and proxy reward against sqrt(KL) for every run,
                   every eval point (Gao et al. 2022)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from rlhf_jax import config_utils, errors, metrics, plots, utils

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
  method: str
  config: str  # config spec, e.g. "configs/ppo.py:runlocal"
  knob: str | None
  value: Any
  overrides: dict[str, Any]

  @property
  def label(self) -> str:
    return self.method if self.knob is None else f"{self.method} {self.knob}={self.value}"

  @property
  def subdir(self) -> str:
    return (
      self.method if self.knob is None else os.path.join(self.method, f"{self.knob}={self.value}")
    )


def plan(
  size: str = "full",
  methods: Sequence[str] = METHODS,
  overrides: dict[str, Any] | None = None,
  per_method: dict[str, dict[str, Any]] | None = None,
  values: dict[str, Sequence[Any]] | None = None,
) -> list[Run]:
  """The runs of a comparison: every method at each of its KL budgets.

  Args:
    size: "full" or "runlocal" (the configs' runlocal variants and fewer budgets).
    methods: which of METHODS to run.
    overrides: dotted config keys set on every run (e.g. {"seed": 1}).
    per_method: method -> dotted keys set on that method's runs.
    values: method -> KL-knob values replacing the default budgets.
  """
  if size not in ("full", "runlocal"):
    raise ValueError(f"size={size!r}; expected 'full' or 'runlocal'.")
  runs = []
  for method in methods:
    if method not in SWEEPS:
      raise ValueError(f"Unknown method {method!r}; expected some of {', '.join(METHODS)}.")
    path, knob, full, local, fixed = SWEEPS[method]
    chosen = (values or {}).get(method, full if size == "full" else local)
    spec = os.path.join(REPO, path) + (":runlocal" if size == "runlocal" else "")
    extra = {**fixed, **(overrides or {}), **(per_method or {}).get(method, {})}
    for value in chosen:
      runs.append(Run(method, spec, knob, value, extra))
  return runs


def _set(config, key: str, value: Any, source: str) -> None:
  """config[key] = value for a dotted key that must exist (ConfigDict checks the type)."""
  config_utils.check_key(config, key, source=source)
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def shared_stages_config(size: str, overrides: dict[str, Any]):
  """The config whose `sft` and `reward` sections make the stages every run shares."""
  spec = os.path.join(REPO, "configs/ppo.py") + (":runlocal" if size == "runlocal" else "")
  config = config_utils.load_config(spec)
  for key, value in overrides.items():
    if key.split(".")[0] in ("sft", "reward", "policy_init", "reward_init", "seed"):
      _set(config, key, value, source="--set")
  return config


def ensure_shared_stages(workdir: str, size: str, overrides: dict[str, Any]) -> tuple[str, str]:
  """One SFT and one reward stage for every run: <workdir>/sft, <workdir>/reward."""
  resolved = config_utils.resolve_upstream(shared_stages_config(size, overrides), workdir)
  return resolved.policy_init, resolved.reward_init


def run_config(run: Run, sft_dir: str = "", reward_dir: str = ""):
  """The config of one run: its method's config, the overrides and its KL-knob value."""
  config = config_utils.load_config(run.config)
  config.policy_init, config.reward_init = sft_dir, reward_dir
  for key, value in run.overrides.items():
    _set(config, key, value, source=f"the {run.method} overrides")
  if run.knob is not None:
    _set(config, run.knob, run.value, source=f"the {run.method} sweep")
  return config


def check(runs: Sequence[Run], size: str, shared: dict[str, Any]) -> None:
  """Every run's config and the shared stages' pass their declared checks, before any of
  them trains (a typo in one run's override must not cost the shared stages' training)."""
  config_utils.validate(shared_stages_config(size, shared))
  for run in runs:
    config_utils.validate(run_config(run))


def execute(run: Run, workdir: str, sft_dir: str, reward_dir: str) -> dict[str, Any]:
  """Runs (or reuses, or resumes) one run; returns its table row."""
  run_dir = os.path.join(workdir, run.subdir)
  summary_path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(summary_path):
    config = run_config(run, sft_dir, reward_dir)
    logging.info("compare: running %s into %s", run.label, run_dir)
    config_utils.run(config, run_dir)
  with open(summary_path) as f:
    summary = json.load(f)
  evals = [r for r in metrics.read_metrics(run_dir) if "eval/gold_reward" in r]
  peak = max(evals, key=lambda r: r["eval/gold_reward"])
  return {
    "method": run.method,
    "knob": run.knob or "n",
    "value": run.value if run.knob else summary.get("n"),
    "label": run.label,
    "workdir": run_dir,
    "sft_gold_reward": summary["sft_gold_reward"],
    "gold_reward": summary["gold_reward"],
    "gold_reward_gain": summary["gold_reward_gain"],
    "proxy_reward": summary["proxy_reward"],
    "kl_to_ref": summary["kl_to_ref"],
    "win_rate_vs_sft": summary["win_rate_vs_sft"],
    "peak_gold_reward": peak["eval/gold_reward"],
    "peak_gold_kl": peak["eval/kl_to_ref"],
    "wall_time_s": summary["wall_time_s"],
  }


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The comparison as a Markdown table."""
  head = (
    "| method | KL knob | gold reward (gain vs SFT) | proxy reward | KL to SFT | win rate vs SFT "
    "| peak gold (at KL) | wall time |\n"
    "|---|---|---|---|---|---|---|---|\n"
  )
  body = ""
  for r in rows:
    knob = f"{r['knob']}={r['value']}"
    body += (
      f"| {r['method']} | {knob} | {r['gold_reward']:+.2f} ({r['gold_reward_gain']:+.2f}) "
      f"| {r['proxy_reward']:+.2f} | {r['kl_to_ref']:.2f} | {r['win_rate_vs_sft']:.2f} "
      f"| {r['peak_gold_reward']:+.2f} ({r['peak_gold_kl']:.2f}) | {r['wall_time_s']:.0f} s |\n"
    )
  return head + body


def report(workdir: str, rows: Sequence[dict[str, Any]], note: str = "") -> None:
  """Writes comparison.md, comparison.json and reward_vs_kl.png into the workdir."""
  sft = rows[0]["sft_gold_reward"] if rows else float("nan")
  text = (
    f"# Comparison on the testbed\n\nSFT policy gold reward: {sft:+.2f}.{note}\n\n{table(rows)}"
  )
  with open(os.path.join(workdir, "comparison.md.tmp"), "w") as f:
    f.write(text)
  os.replace(os.path.join(workdir, "comparison.md.tmp"), os.path.join(workdir, "comparison.md"))
  utils.write_json_atomic(os.path.join(workdir, "comparison.json"), list(rows))
  curves = {
    r["label"]: [x for x in metrics.read_metrics(r["workdir"]) if "eval/gold_reward" in x]
    for r in rows
  }
  plots.reward_vs_kl(
    curves,
    os.path.join(workdir, "reward_vs_kl.png"),
    title="Gold and proxy reward against sqrt(KL to SFT): every eval point, in training order",
    styles=_styles(rows),
  )


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


def compare(workdir: str, runs: Sequence[Run], size: str, shared: dict[str, Any]) -> list[dict]:
  """Trains the shared stages, runs every run, writes the report; returns the table rows."""
  check(runs, size, shared)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  sft_dir, reward_dir = ensure_shared_stages(workdir, size, shared)
  rows = [execute(run, workdir, sft_dir, reward_dir) for run in runs]
  report(workdir, rows)
  logging.info(
    "compare: %d runs in %.0f s\n%s", len(rows), time.perf_counter() - start, table(rows)
  )
  return rows


# ------------------------------------------------------------------------ CLI

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Folder of the comparison.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "runlocal"], "Config sizes.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Some of {', '.join(METHODS)}.")
_SET = flags.DEFINE_multi_string(
  "set", [], "key=value set on every run's config (and the shared stages' for sft.*, reward.*)."
)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set={item!r}: expected key=value.")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def main(argv: list[str]) -> None:
  del argv
  shared = _parse_set(_SET.value)
  try:
    runs = plan(_SIZE.value, _METHODS.value, overrides=shared)
  except ValueError as error:  # an unknown method, size or --set key
    sys.stderr.write(f"FATAL config error: {error}\n")
    sys.exit(errors.EXIT_CODE)
  config_utils.enable_compilation_cache(config_utils.compilation_cache_dir())
  try:
    rows = compare(_WORKDIR.value, runs, _SIZE.value, shared)
  except errors.Error as error:  # bad input, reported as the launcher reports it
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  print(table(rows))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'comparison.md')} and reward_vs_kl.png")


if __name__ == "__main__":
  app.run(main)
