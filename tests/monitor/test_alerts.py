"""Alert rules and their engine: threshold, trend, for_evals, NaN, config checks, alerts.jsonl."""

import json
import math

import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import monitor
from tests.monitor import synthetic

NAN = float("nan")


def _fires(engine, values, metric="m"):
  """The steps (0, 1, ...) at which the engine fires for this series of one metric."""
  steps = []
  for step, value in enumerate(values):
    if engine.check(step, {metric: value}):
      steps.append(step)
  return steps


def test_threshold_rules_both_ways():
  above = monitor.AlertEngine([monitor.Rule("hi", "m", ">", 1.0)])
  assert _fires(above, [0.5, 1.0, 1.5, 0.9, 2.0]) == [2, 4]
  below = monitor.AlertEngine([monitor.Rule("lo", "m", "<", 0.5, severity="critical")])
  assert _fires(below, [1.0, 0.4, 0.6]) == [1]
  [alert] = below.check(7, {"m": 0.1, "other": 3.0})
  assert (alert.step, alert.rule, alert.metric, alert.value, alert.threshold) == (
    7, "lo", "m", 0.1, 0.5
  )  # fmt: skip
  assert alert.severity == "critical" and alert.action == "log"
  assert alert.message.startswith("step 7: lo (critical): m = 0.1 < 0.5")


def test_trend_rules_need_a_full_window_of_evaluations():
  rule = monitor.Rule("rising", "m", ">", 0.05, kind="trend", window=3)
  engine = monitor.AlertEngine([rule])
  # Slope 0.1 per eval: fires from the third value on, once three exist.
  assert _fires(engine, [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3]) == [2, 3]
  engine = monitor.AlertEngine([rule])
  [alert] = [a for s, v in enumerate([1.0, 3.0, 5.0]) for a in engine.check(s, {"m": v})]
  assert alert.value == pytest.approx(2.0) and alert.kind == "trend"
  assert "m trend over 3 evals = 2 > 0.05" in alert.message
  falling = monitor.AlertEngine([monitor.Rule("f", "m", "<", -0.5, kind="trend", window=2)])
  assert _fires(falling, [3.0, 2.0, 1.8, 1.0]) == [1, 3]


def test_for_evals_needs_consecutive_evaluations():
  engine = monitor.AlertEngine([monitor.Rule("r", "m", ">", 1.0, for_evals=3)])
  assert _fires(engine, [2, 2, 0, 2, 2, 2, 2, 0, 2]) == [5, 6]
  engine = monitor.AlertEngine([monitor.Rule("r", "m", ">", 1.0, for_evals=2)])
  alerts = [a for s in range(3) for a in engine.check(s, {"m": 5.0})]
  assert [a.held_for for a in alerts] == [2, 2]  # capped at what the rule keeps
  assert "for 2 evals" in alerts[0].message


def test_a_missing_or_nan_metric_never_fires_nor_counts():
  engine = monitor.AlertEngine([monitor.Rule("r", "m", ">", 1.0, for_evals=2)])
  assert _fires(engine, [2.0, NAN, 2.0, None, 2.0, "x", 2.0, 2.0]) == [7]
  assert engine.check(8, {}) == []
  # NaN is neither > nor < anything; a NaN inside a trend window blocks the trend.
  assert _fires(monitor.AlertEngine([monitor.Rule("r", "m", "<", 1.0)]), [NAN, NAN]) == []
  trend = monitor.AlertEngine([monitor.Rule("t", "m", ">", 0.0, kind="trend", window=3)])
  assert _fires(trend, [0.0, 1.0, NAN, 3.0, 4.0, 5.0]) == [5]


def test_disabled_rules_and_duplicates():
  engine = monitor.AlertEngine([monitor.Rule("r", "m", ">", 0.0, enabled=False)])
  assert engine.rules == {} and engine.check(0, {"m": 1.0}) == []
  with pytest.raises(cs.ConfigError, match="Two alert rules are named 'r'"):
    monitor.AlertEngine([monitor.Rule("r", "m", ">", 0.0), monitor.Rule("r", "n", "<", 0.0)])


@pytest.mark.parametrize(
  ("field", "value", "error"),
  [
    ("op", "=>", r"^config.monitor.alerts.kl_spike.op='=>': expected one of '>', '<'"),
    ("kind", "slope", r"^config.monitor.alerts.kl_spike.kind='slope': expected one of"),
    ("severity", "warn", r"kl_spike.severity='warn': .* \(did you mean 'warning'\?\)"),
    ("action", "halt", r"^config.monitor.alerts.kl_spike.action='halt': expected one of"),
    ("for_evals", 0, r"^config.monitor.alerts.kl_spike.for_evals=0: must be an int >= 1"),
    ("metric", "", r"^config.monitor.alerts.kl_spike.metric='': must not be empty"),
    ("threshold", 2.0, r"^config.monitor.alerts.kl_spike.threshold is not a known field"),
  ],
)
def test_a_bad_rule_is_refused_naming_its_key(field, value, error):
  section = monitor.monitor_section()
  section.alerts.kl_spike[field] = value  # "threshold": a new, unknown field
  with pytest.raises(cs.ConfigError, match=error):
    monitor.AlertEngine.from_config(section.alerts)
  with pytest.raises(cs.ConfigError, match=error):
    monitor.CONFIG_SPEC.validate(section, "config.monitor")


def test_cross_field_rule_checks():
  alerts = monitor.default_rules()
  alerts.gold_falling.window = 1
  with pytest.raises(cs.ConfigError, match=r"gold_falling.window=1: a trend rule needs"):
    monitor.rules_from_config(alerts)
  alerts = monitor.default_rules()
  alerts.gold_falling.criterion = ""
  with pytest.raises(cs.ConfigError, match=r"gold_falling.criterion='': a keep_best rule"):
    monitor.rules_from_config(alerts)
  alerts = monitor.default_rules()
  del alerts.kl_spike["value"]
  with pytest.raises(cs.ConfigError, match=r"kl_spike lacks the field .*kl_spike.value"):
    monitor.rules_from_config(alerts)
  with pytest.raises(cs.ConfigError, match=r"^alerts.x.op='>=': expected one of"):
    monitor.Rule("x", "m", ">=", 1.0)
  with pytest.raises(cs.ConfigError, match="unknown field"):
    monitor.rule_config("m", ">", 1.0, treshold=2)


def test_rules_from_config_with_a_rule_added_and_one_switched_off():
  alerts = monitor.default_rules()
  alerts.no_eos = monitor.rule_config("eval/frac_no_eos", ">", 0.2, why="no EOS")
  alerts.kl_spike.enabled = False
  rules = {r.name: r for r in monitor.rules_from_config(alerts)}
  assert "kl_spike" not in rules and rules["no_eos"].metric == "eval/frac_no_eos"
  assert rules["no_eos"].for_evals == 1 and rules["no_eos"].severity == "warning"
  engine = monitor.AlertEngine(rules.values())
  [alert] = engine.check(10, {"eval/frac_no_eos": 0.5, "monitor/kl_spike_ratio": 100.0})
  assert alert.rule == "no_eos" and alert.message.endswith(": no EOS")


def test_alerts_jsonl_is_appended_and_read_back(tmp_path):
  engine = monitor.AlertEngine(
    [
      monitor.Rule("stop_me", "m", ">", 1.0, action="stop", severity="critical"),
      monitor.Rule("best", "m", ">", 0.5, action="keep_best", criterion="eval/gold_reward"),
    ]
  )
  first, second = engine.check(10, {"m": 2.0}), engine.check(20, {"m": 0.7})
  assert monitor.should_stop(first) and not monitor.should_stop(second)
  assert monitor.keep_best_requests(first + second) == [("eval/gold_reward", "max")]
  monitor.write_alerts(first, str(tmp_path))  # a workdir: its alerts.jsonl
  path = tmp_path / monitor.ALERTS_FILENAME
  monitor.write_alerts(second, str(path))
  monitor.write_alerts([], str(tmp_path / "none.jsonl"))
  assert not (tmp_path / "none.jsonl").exists()
  lines = path.read_text().splitlines()
  assert len(lines) == 3 and all(json.loads(line)["metric"] == "m" for line in lines)
  assert monitor.read_alerts(str(tmp_path)) == first + second
  # A line cut off by a kill is left out; a resume from step 10 drops the later alerts.
  with open(path, "a") as f:
    f.write('{"step": 30, "rule"')
  assert len(monitor.read_alerts(str(path))) == 3
  monitor.drop_after(str(path), 10)
  assert [a.step for a in monitor.read_alerts(str(path))] == [10, 10]
  assert monitor.read_alerts(str(tmp_path / "missing.jsonl")) == []


def test_engine_state_round_trip_and_a_repeated_eval():
  rules = monitor.rules_from_config(monitor.default_rules())
  outputs = synthetic.run(monitor.Monitor(), "overopt")
  first = monitor.AlertEngine(rules)
  for t in range(6):
    first.check(10 * t, outputs[t])
  state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
  second = monitor.AlertEngine(rules)
  second.load_state_dict(state)
  for t in range(6, 12):
    assert first.check(10 * t, outputs[t]) == second.check(10 * t, outputs[t])
  # An engine whose state is newer than the checkpoint a run resumes from sees evals again:
  # they replace their entries instead of counting twice.
  third = monitor.AlertEngine(rules)
  third.load_state_dict(state)
  for t in range(3, 6):
    third.check(10 * t, outputs[t])
  assert third.state_dict() == state
  with pytest.raises(ValueError, match="version"):
    second.load_state_dict({})


def test_default_rules_fire_on_over_optimisation_and_stay_quiet_on_a_benign_run():
  fired = {}
  for kind in ("overopt", "benign"):
    engine = monitor.AlertEngine.from_config(monitor.default_rules())
    outputs = synthetic.run(monitor.Monitor(), kind)
    fired[kind] = [a for t, out in enumerate(outputs) for a in engine.check(10 * t, out)]
  assert fired["benign"] == []
  names = {a.rule for a in fired["overopt"]}
  assert names == set(monitor.default_rules()) - {"prompt_drift"}
  first = {a.rule: a.step for a in reversed(fired["overopt"])}
  assert first["gold_falling"] == first["kl_spike"] == 90  # the judge's fall, the KL jump
  assert monitor.should_stop(fired["overopt"])  # entropy collapse
  assert not any(math.isnan(a.value) for a in fired["overopt"])
  assert monitor.keep_best_requests(fired["overopt"]) == [("eval/gold_reward", "max")]
