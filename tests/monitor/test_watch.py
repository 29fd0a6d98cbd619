"""The stage's watch (rlhf_jax/monitor/watch.py): files, resume, stop and keep_best."""

import json
import os

import numpy as np

from rlhf_jax.monitor import alerts as alerts_lib
from rlhf_jax.monitor import config as monitor_config
from rlhf_jax.monitor import watch as watch_lib


def _section(**rules):
  section = monitor_config.monitor_section()
  for name, rule in rules.items():
    section.alerts[name] = rule
  return section


def _eval(step):
  """An over-optimising run: the proxy climbs, gold peaks at step 4 then falls."""
  rng = np.random.default_rng(step)
  gold = {0: 0.0, 2: 0.5, 4: 0.8, 6: 0.4, 8: 0.1, 10: -0.2}[step]
  proxy = 0.3 * step + rng.normal(0, 0.1, 16)
  judge = gold + rng.normal(0, 0.1, 16)
  line = {"eval/gold_reward": float(judge.mean()), "eval/kl_to_ref": 0.5 * step}
  texts = [f"the kettle is good {'good ' * (step // 2)}" for _ in range(16)]
  inputs = dict(
    prompts=["Review of the kettle:"] * 16,
    responses=texts,
    proxy=proxy,
    judge=judge,
    lengths=np.full(16, 5 + step),
    kl=np.full(16, 0.5 * step),
  )
  return line, inputs


def _run(workdir, steps, start_step=0, section=None, exports=None):
  exports = [] if exports is None else exports
  watch = watch_lib.Watch(
    section or _section(), workdir, start_step,
    export_best=lambda d, params, meta: exports.append((d, params, meta)),
  )  # fmt: skip
  lines = {}
  for step in steps:
    line, inputs = _eval(step)
    lines[step] = watch.observe(step, line, params={"step": step}, **inputs)
  return watch, lines


def test_a_resumed_watch_continues_as_an_uninterrupted_one(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _, expected = _run(straight, [0, 2, 4, 6, 8, 10])
  _run(killed, [0, 2, 4, 6])
  # Killed after step 6's eval, resumed from the checkpoint of step 4: step 6 runs again.
  _, lines = _run(killed, [6, 8, 10], start_step=4)
  for step in (6, 8, 10):
    assert lines[step] == expected[step], step
  assert alerts_lib.read(killed) == alerts_lib.read(straight)
  assert [a.step for a in alerts_lib.read(killed)] == sorted(
    a.step for a in alerts_lib.read(killed)
  )
  assert os.listdir(os.path.join(killed, "monitor"))  # the state files
  assert all(k.startswith("monitor/") for k in expected[10])


def test_keep_best_exports_the_best_eval_and_the_summary_names_it(tmp_path):
  exports = []
  watch, _ = _run(str(tmp_path), [0, 2, 4, 6, 8, 10], exports=exports)
  # Exported at each new best (steps 0, 2, 4), the last one the gold peak.
  assert [meta["step"] for _, _, meta in exports] == [0, 2, 4]
  assert exports[-1][1] == {"step": 4} and exports[-1][0] == str(tmp_path / "best")
  summary = watch.summary()
  assert summary["best"]["step"] == 4 and summary["best"]["criterion"] == "eval/gold_reward"
  # The gap rule (action keep_best) fired once the proxy outgrew gold: use the best policy.
  assert "proxy_gold_gap_rising" in summary["alert_rules_fired"]
  assert summary["best"]["recommended"]
  assert summary["stopped_by_alert_at"] is None


def test_a_stop_rule_records_the_step_and_survives_a_resume(tmp_path):
  rule = alerts_lib.rule_config("eval/kl_to_ref", ">", 1.5, action="stop", severity="critical")
  section = _section(too_far=rule)
  watch, lines = _run(str(tmp_path), [0, 2, 4], section=section)
  assert watch.stopped == 4 and lines[4]["monitor/alerts"] >= 1
  (stop,) = [a for a in alerts_lib.read(str(tmp_path)) if a.rule == "too_far"]
  assert stop.step == 4 and stop.action == "stop"
  again = watch_lib.Watch(section, str(tmp_path), 4)
  assert again.stopped == 4
  # Re-evaluating the stopping step (a stage resumed there) writes no second alert.
  line, inputs = _eval(4)
  again.observe(4, line, **inputs)
  assert len([a for a in alerts_lib.read(str(tmp_path)) if a.rule == "too_far"]) == 1


def test_a_disabled_monitor_has_no_watch():
  import ml_collections

  config = ml_collections.ConfigDict({"monitor": monitor_config.monitor_section()})
  assert watch_lib.enabled(config)
  config.monitor.enabled = False
  assert not watch_lib.enabled(config)
  assert not watch_lib.enabled(ml_collections.ConfigDict({"seed": 0}))
  json.dumps(config.to_dict())  # the section is plain JSON (config.json)
