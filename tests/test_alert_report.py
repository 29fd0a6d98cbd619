"""experiments/alert_report.py on made-up runs: peaks, alerts, lead times."""

import json
import os
import subprocess
import sys

from experiments import alert_report
from rlhf_jax.monitor import alerts as alerts_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(directory, golds, alerts=()):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    for i, gold in enumerate(golds):
      f.write(json.dumps({"step": 10 * i, "eval/gold_reward": gold}) + "\n")
  alerts_lib.write(
    [
      alerts_lib.Alert(
        step=step,
        rule=rule,
        metric="m",
        value=1.0,
        threshold=0.5,
        severity=severity,
        action="log",
        message="",
      )
      for step, rule, severity in alerts
    ],
    os.path.join(directory, alerts_lib.ALERTS_FILENAME),
  )
  return str(directory)


def test_lead_times_and_quiet_runs(tmp_path):
  hacked = _run(tmp_path / "ppo" / "kl=0.005", [0.0, 0.6, 0.9, 0.5, 0.2],
                [(10, "reward_length_corr", "info"), (20, "proxy_gold_gap_rising", "warning"),
                 (30, "gold_falling", "warning")])  # fmt: skip
  late = _run(tmp_path / "dpo" / "beta=0.1", [0.0, 0.8, 0.3], [(20, "gold_falling", "warning")])
  calm = _run(tmp_path / "ppo" / "kl=0.2", [0.0, 0.3, 0.5, 0.55], [(30, "prompt_drift", "info")])
  rows = [alert_report.analyse(d) for d in (hacked, late, calm)]
  assert [r["over_optimising"] for r in rows] == [True, True, False]
  assert rows[0]["peak_step"] == 20 and rows[0]["first_alert_rule"] == "proxy_gold_gap_rising"
  assert rows[0]["lead_steps"] == 0  # an info alert does not count; the warning came at the peak
  assert rows[1]["lead_steps"] == -10  # after the peak
  assert rows[2]["alerts"] == 0 and rows[2]["lead_steps"] is None
  summary = alert_report.summarize(rows)
  assert summary == {
    "over_optimising_runs": 2, "caught_by_the_peak": 1, "mean_lead_steps": 0.0,
    "other_runs": 1, "quiet": 1,
  }  # fmt: skip
  assert "| ppo/kl=0.005 | +0.90 (20) | +0.20 (40) | yes | proxy_gold_gap_rising (20) |" in (
    alert_report.table(rows)
  )
  assert sorted(alert_report.run_dirs(str(tmp_path))) == sorted([hacked, late, calm])


def test_cli_writes_the_table_and_refuses_no_runs(tmp_path):
  _run(tmp_path / "c" / "ppo", [0.0, 1.0, 0.5], [(10, "gold_falling", "warning")])
  out = tmp_path / "alerts.md"
  cmd = [sys.executable, "-m", "experiments.alert_report", f"--compare={tmp_path / 'c'}",
         f"--out={out}"]  # fmt: skip
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "gold_falling (10)" in out.read_text()
  assert json.loads((tmp_path / "alerts.json").read_text())["caught_by_the_peak"] == 1
  done = subprocess.run([sys.executable, "-m", "experiments.alert_report"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
  assert done.returncode == 2 and done.stderr.strip().startswith("FATAL config error: no runs")
  assert "Traceback" not in done.stderr


def test_replay_judges_the_rules_on_the_eval_lines(tmp_path):
  """--replay reads the monitor metrics in metrics.jsonl, not alerts.jsonl; --rule moves a
  threshold: a length trend of 0.06 fires the default rule (0.08) only once lowered."""
  run = tmp_path / "run"
  os.makedirs(run)
  lines = [
    {"step": 10 * i, "eval/gold_reward": g, "monitor/length_trend": t, "monitor/entropy_ratio": e}
    for i, (g, t, e) in enumerate([(0.0, 0.0, 1.0), (0.5, 0.06, 0.6), (0.9, 0.06, 0.5),
                                   (0.4, 0.06, 0.35), (0.2, 0.0, 0.3)])
  ]  # fmt: skip
  with open(run / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  fired = alert_report.replay(str(run))
  assert [(a.rule, a.step) for a in fired] == [("entropy_collapse", 40)]  # 0.35 and 0.3 < 0.4
  lowered = alert_report.rules_with(["length_growth.value=0.05"])
  row = alert_report.analyse(str(run), rules=lowered, live=False)
  assert (row["first_alert_rule"], row["first_alert_step"], row["lead_steps"]) == (
    "length_growth",
    20,
    0,
  )
  assert row["over_optimising"] and row["rules"] == ["entropy_collapse", "length_growth"]
  cmd = [sys.executable, "-m", "experiments.alert_report", f"--runs={run}", "--rule=x.value=1"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "pass --replay too" in done.stderr
  done = subprocess.run([*cmd, "--replay"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "config.x" in done.stderr.replace("config.monitor.alerts", "")
