"""Did the alerts fire before gold peaked? The alert study over finished RL runs.

    python -m experiments.alert_report --compare=runs/compare
    python -m experiments.alert_report --runs=runs/ppo_weak_kl,runs/ppo --out=alerts.md

Reads each run's metrics.jsonl (the eval line: `eval/gold_reward`, the judge's score, at
every eval) and alerts.jsonl (rlhf_jax/monitor: the alert rules fired at evals). A run
over-optimises when its final gold is more than `--drop` below its peak; the others are
well penalised (or still climbing). Per run: the gold peak (step, value), the final gold,
the first alert of severity warning or critical (step, rule), and the lead time, how many
steps before the peak it fired (negative: after). Summary: on the over-optimising runs, how
many had such an alert by the peak and the mean lead; on the others, how many stayed quiet.

  --compare=DIR    every run of an experiments.compare workdir (its cells/)
  --runs=A,B       run workdirs
  --drop=0.1       gold units below the peak that make a run over-optimising
  --out=FILE       the Markdown table (and FILE's .json beside it); default: print only
  --replay         judge the rules, not the run: replay the default rules over each run's
                   eval lines (their monitor metrics) instead of reading alerts.jsonl
  --rule=N.F=V     with --replay, change a rule first (--rule=length_growth.value=0.08,
                   --rule=kl_spike.enabled=false): calibrate thresholds on finished runs
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from rlhf_jax import config_utils, errors, metrics, utils
from rlhf_jax.monitor import alerts as alerts_lib

SEVERE = ("warning", "critical")
FLAGS = flags.FLAGS


def run_dirs(compare_dir: str) -> list[str]:
  """The run workdirs of an experiments.compare folder (its cells/, the sweep's runs, when it
  has one): those with a metrics.jsonl."""
  cells = os.path.join(compare_dir, "cells")
  out = []
  for root, _, files in sorted(os.walk(cells if os.path.isdir(cells) else compare_dir)):
    if "metrics.jsonl" in files and os.path.basename(root) not in ("sft", "reward"):
      out.append(root)
  return sorted(out)


def replay(workdir: str, rules: Any = None) -> list[alerts_lib.Alert]:
  """The alerts `rules` (a `config.monitor.alerts` section; None: the defaults) would have
  raised on the run's eval lines: its monitor metrics replayed through a fresh AlertEngine.

  A run that an earlier rule stopped has no evals past that point, so none are replayed.
  """
  engine = alerts_lib.AlertEngine.from_config(rules)
  fired = []
  for line in metrics.read_metrics(workdir):
    if "eval/gold_reward" in line:
      fired += engine.check(line["step"], line)
  return fired


def rules_with(overrides: Sequence[str]) -> Any:
  """The default rules with `NAME.FIELD=VALUE` overrides (`length_growth.value=0.08`)."""
  rules = alerts_lib.default_rules()
  for key, value in config_utils.parse_set_args(overrides, flag="--rule").items():
    config_utils.set_key(rules, key, value, source="--rule")
  return rules


def analyse(workdir: str, drop: float = 0.1, rules: Any = None, live: bool = True) -> dict:
  """One run's row (see the module docstring): the alerts it raised (`live`), or those that
  `rules` raise when its eval lines are replayed (`live=False`)."""
  evals = [r for r in metrics.read_metrics(workdir) if "eval/gold_reward" in r]
  if not evals:
    raise errors.DataError(os.path.join(workdir, "metrics.jsonl"), 0, "no eval line")
  peak = max(evals, key=lambda r: r["eval/gold_reward"])
  final = evals[-1]
  raised = alerts_lib.read(workdir) if live else replay(workdir, rules)
  fired = [a for a in raised if a.severity in SEVERE]
  first = min(fired, key=lambda a: a.step) if fired else None
  over = final["eval/gold_reward"] < peak["eval/gold_reward"] - drop
  return {
    "run": workdir,
    "peak_step": peak["step"],
    "peak_gold": peak["eval/gold_reward"],
    "final_step": final["step"],
    "final_gold": final["eval/gold_reward"],
    "over_optimising": over,
    "first_alert_step": first.step if first else None,
    "first_alert_rule": first.rule if first else None,
    "lead_steps": (peak["step"] - first.step) if first else None,
    "alerts": len(fired),
    "rules": sorted({a.rule for a in fired}),
  }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  over = [r for r in rows if r["over_optimising"]]
  calm = [r for r in rows if not r["over_optimising"]]
  caught = [r for r in over if r["lead_steps"] is not None and r["lead_steps"] >= 0]
  leads = [r["lead_steps"] for r in caught]
  return {
    "over_optimising_runs": len(over),
    "caught_by_the_peak": len(caught),
    "mean_lead_steps": sum(leads) / len(leads) if leads else math.nan,
    "other_runs": len(calm),
    "quiet": sum(r["alerts"] == 0 for r in calm),
  }


def table(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| run | gold peak (step) | final gold (step) | over-optimising | first alert (step) | "
    "lead before the peak | warnings |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    first = f"{r['first_alert_rule']} ({r['first_alert_step']})" if r["first_alert_rule"] else "-"
    lead = "-" if r["lead_steps"] is None else f"{r['lead_steps']} steps"
    lines.append(
      f"| {os.path.basename(os.path.dirname(r['run']))}/{os.path.basename(r['run'])} | "
      f"{r['peak_gold']:+.2f} ({r['peak_step']}) | {r['final_gold']:+.2f} ({r['final_step']}) | "
      f"{'yes' if r['over_optimising'] else 'no'} | {first} | {lead} | {r['alerts']} |"
    )
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("compare", "", "An experiments.compare workdir.")
  flags.DEFINE_list("runs", [], "Run workdirs.")
  flags.DEFINE_float("drop", 0.1, "Gold below the peak that makes a run over-optimising.")
  flags.DEFINE_string("out", "", "Markdown output (and .json beside it).")
  flags.DEFINE_bool("replay", False, "Replay the rules over the eval lines (not alerts.jsonl).")
  flags.DEFINE_multi_string("rule", [], "With --replay: NAME.FIELD=VALUE on a default rule.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  dirs = list(FLAGS.runs) + (run_dirs(FLAGS.compare) if FLAGS.compare else [])
  try:
    if not dirs:
      raise errors.ConfigError("no runs: pass --compare=DIR or --runs=A,B")
    if FLAGS.rule and not FLAGS.replay:
      raise errors.ConfigError("--rule changes the replayed rules: pass --replay too")
    rules = rules_with(FLAGS.rule) if FLAGS.replay else None
    rows = [analyse(d, FLAGS.drop, rules, live=not FLAGS.replay) for d in dirs]
  except (errors.Error, OSError) as error:
    lines = error.lines() if isinstance(error, errors.Error) else [f"FATAL data error: {error}"]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.exit(errors.EXIT_CODE)
  summary = summarize(rows)
  text = f"{table(rows)}\n\n{json.dumps(utils.jsonable(summary))}"
  print(text)
  if FLAGS.out:
    with utils.atomic_open(FLAGS.out) as f:
      f.write(text + "\n")
    utils.write_json_atomic(
      os.path.splitext(FLAGS.out)[0] + ".json", utils.jsonable({"rows": rows, **summary})
    )


if __name__ == "__main__":
  define_flags()
  app.run(main)
