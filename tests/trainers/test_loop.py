"""The human-feedback loop (rlhf_jax/trainers/loop.py, configs/loop.py)."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import config_utils, errors, metrics, stages
from rlhf_jax.data import preferences, quality_gate
from rlhf_jax.trainers import loop
from tests.trainers import resume

REPO = resume.REPO
CONFIG = "configs/loop.py:runlocal"


def _config():
  return config_utils.load_config(os.path.join(REPO, CONFIG))


# ------------------------------------------------------------------------- config, budget


def test_runlocal_config_is_valid_and_refuses_bad_combinations():
  loop.CONFIG_SPEC.validate(_config())
  config = _config()
  config.data.source = "jsonl"
  config.data.prompts = __file__
  with pytest.raises(cs.ConfigError, match=r"config\.labeler='panel'.*testbed"):
    loop.CONFIG_SPEC.validate(config)
  config = _config()
  config.reward.ensemble_size = 1
  with pytest.raises(cs.ConfigError, match=r"ensemble_disagreement.*ensemble_size >= 2"):
    loop.CONFIG_SPEC.validate(config)
  for name in ("grpo", "rloo"):  # any RL stage with a separate KL reference
    config = _config()
    config.rl = config_utils.load_config(os.path.join(REPO, f"configs/{name}.py:runlocal"))
    loop.CONFIG_SPEC.validate(config)
  config.rl = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  with pytest.raises(cs.ConfigError, match=r"config\.rl\.trainer='dpo' has no continue_from"):
    loop.CONFIG_SPEC.validate(config)
  config.rl_mode = "restart"
  with pytest.raises(cs.ConfigError, match=r"config\.rl\.trainer='dpo' has no reference_init"):
    loop.CONFIG_SPEC.validate(config)
  config = _config()
  config.strategy = "loudest"
  with pytest.raises(cs.ConfigError, match=r"config\.strategy='loudest'"):
    loop.CONFIG_SPEC.validate(config)


def test_round_budgets_respect_the_total():
  config = _config()
  config.labels_per_round, config.total_labels = 100, 250
  assert [loop.round_budget(config, k) for k in range(4)] == [100, 100, 50, 0]
  config.total_labels = 0
  assert loop.round_budget(config, 7) == 100


def test_rounds_draw_fresh_prompts_and_wrap_around():
  pool = [f"p{i}" for i in range(10)]
  assert loop.round_prompts(pool, 4, 0) == ["p0", "p1", "p2", "p3"]
  assert loop.round_prompts(pool, 4, 1) == ["p4", "p5", "p6", "p7"]
  assert loop.round_prompts(pool, 4, 2) == ["p8", "p9", "p0", "p1"]


# ------------------------------------------------------------------ labels from people


def _queue(tmp_path, n=3):
  queue = tmp_path / "queue"
  queue.mkdir()
  rows = [
    {"pair_id": f"r0-{i}", "prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}"}
    for i in range(n)
  ]
  rows.append({"pair_id": "anchor-0", "prompt": "p", "response_a": "x", "response_b": "y",
               "anchor": True})  # fmt: skip
  (queue / loop.QUEUE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(queue), rows


def _label(row, rater="alice"):
  return {"prompt": row["prompt"], "chosen": row["response_a"], "rejected": row["response_b"],
          "rater_id": rater, "pair_id": row["pair_id"], "confidence": 4}  # fmt: skip


def test_the_loop_waits_for_peoples_labels_and_says_where(tmp_path):
  queue, rows = _queue(tmp_path)
  with pytest.raises(loop.LabelsPending, match=r"queue: 0 of 3 pairs have a label") as info:
    loop.queue_labels(queue)
  assert f"--queue={queue}" in info.value.hint
  # Two labelled (the anchor does not count towards the round's pairs).
  path = os.path.join(queue, loop.LABELS_FILE)
  preferences.write_preference_jsonl([_label(rows[0]), _label(rows[3])], path)
  with pytest.raises(loop.LabelsPending, match="1 of 3"):
    loop.queue_labels(queue)
  preferences.write_preference_jsonl([_label(r) for r in rows], path)
  records = loop.queue_labels(queue)
  assert [r["pair_id"] for r in records] == ["r0-0", "r0-1", "r0-2", "anchor-0"]


def test_the_labeling_page_serves_a_loop_queue_and_the_loop_reads_its_labels(tmp_path):
  """The queue contract between the loop and experiments/label_server.py, both ways."""
  from experiments import label_server

  queue, _ = _queue(tmp_path)
  label_server.add_rater(queue, "alice")
  label_server.add_rater(queue, "bob")
  served = label_server.LabelQueue(queue)
  for rater in ("alice", "bob"):
    while (item := served.next_item(rater)["item"]) is not None:
      # Response a wins, whichever side the page put it on (so the raters agree).
      choice = "left" if item["left"] == "a" else "right"
      choice = "tie" if item["pair_id"] == "r0-1" else choice
      payload = {"pair_id": item["pair_id"], "left": item["left"], "choice": choice}
      assert served.submit(rater, {**payload, "confidence": 5})["ok"]
  records = loop.queue_labels(queue)
  # One label per ordinary pair (labels_per_pair=1), the anchor from both raters.
  ordinary = [r for r in records if not r["anchor"]]
  assert sorted(r["pair_id"] for r in ordinary) == ["r0-0", "r0-1", "r0-2"]
  assert sorted(r["rater_id"] for r in records if r["anchor"]) == ["alice", "bob"]
  tie = next(r for r in records if r["pair_id"] == "r0-1")
  assert tie["tie"] and tie["confidence"] == 5
  # The gate and the reward model's file take them as they are.
  gate = quality_gate.check(records, quality_gate.default_config())
  assert gate["passed"] and gate["num_kept"] == len(records)


def test_a_malformed_labels_file_is_a_data_error_naming_the_line(tmp_path):
  queue, rows = _queue(tmp_path)
  path = os.path.join(queue, loop.LABELS_FILE)
  with open(path, "w") as f:
    f.write(json.dumps(_label(rows[0])) + "\n" + '{"prompt": "p1", "chosen": "a1"}\n')
  with pytest.raises(errors.DataError, match=r"labels\.jsonl:2: missing field 'rejected'"):
    loop.queue_labels(queue)


# ----------------------------------------------------------------------- end to end


def _overrides(sft_dir):
  return [f"--config.policy_init={sft_dir}"]


def _kill_when(workdir, overrides, cache, ready, what):
  """Starts the loop and SIGKILLs it once `ready()` holds."""
  proc = resume.launch(CONFIG, workdir, overrides, cache)
  code, out = resume.signal_when(proc, ready, signal.SIGKILL)
  assert code == -signal.SIGKILL, (what, out[-3000:])


def _loop_json(workdir):
  with open(os.path.join(workdir, "loop.json")) as f:
    out = json.load(f)
  for key in ("stage_seconds", "final_policy", "final_reward"):
    out.pop(key)
  return out


def _read(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.mark.slow
def test_two_rounds_killed_anywhere_end_as_an_uninterrupted_run(reward_runlocal, tmp_path):
  """configs/loop.py:runlocal (2 rounds, PPO) straight, and killed twice (inside round 0's
  reward stage, and between round 1's candidates and its labels) then rerun: the same
  labels, gate, reward models and policies, bit for bit."""
  _, reward_dir, _ = reward_runlocal
  sft_dir = os.path.join(reward_dir, "sft")
  cache = str(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  resume.run_to_end(CONFIG, straight, _overrides(sft_dir), cache)

  result = _loop_json(straight)
  rounds = result["rounds"]
  assert [r["round"] for r in rounds] == [0, 1]
  # Round 0 has no reward model to select with; round 1 uses the ensemble.
  assert rounds[0]["selection"]["strategy_used"] == "random"
  assert rounds[1]["selection"]["strategy_used"] == "ensemble_disagreement"
  assert (
    rounds[1]["selection"]["mean_criterion_selected"] > rounds[1]["selection"]["mean_criterion_all"]
  )
  # 240 pairs a round, plus 12 raters x 10 anchors in round 0.
  assert rounds[0]["labels_round"] == 240 + 120 and rounds[1]["labels_total"] == 600
  assert rounds[1]["labels_trained_on"] <= 600
  assert all(0.0 <= r["reward_eval_accuracy"] <= 1.0 for r in rounds)
  assert all(r["policy"]["kl_to_ref"] > 0 for r in rounds)
  # The testbed's careless rater is named in the gate's score.
  assert rounds[1]["gate_testbed"]["careless"]
  # Round 1 continues: its reward model from round 0's, its PPO stage round 0's (iterations
  # 6-12 of one 12-iteration schedule), with the SFT policy as the start and KL reference.
  r1 = os.path.join(straight, "round_1")
  reward_cfg = config_utils.read_config_json(os.path.join(r1, "reward"))
  assert reward_cfg.reward_init == os.path.join(straight, "round_0", "reward")
  assert reward_cfg.data.train_files == [os.path.join(r1, "train_labels.jsonl")]
  policy_cfg = config_utils.read_config_json(os.path.join(r1, "policy"))
  assert policy_cfg.policy_init == sft_dir and not policy_cfg.reference_init
  assert policy_cfg.continue_from == os.path.join(straight, "round_0", "policy")
  assert (policy_cfg.total_steps, policy_cfg.schedule_steps) == (12, 12)
  policy0_cfg = config_utils.read_config_json(os.path.join(straight, "round_0", "policy"))
  assert (policy0_cfg.total_steps, policy0_cfg.schedule_steps) == (6, 12)
  assert not policy0_cfg.continue_from
  evals1 = [
    r["step"] for r in metrics.read_metrics(os.path.join(r1, "policy")) if "eval/kl_to_ref" in r
  ]
  assert evals1 == [6, 12]  # its first eval is its start, round 0's end
  # Both rounds' gains are over the SFT policy.
  sft_gold = {_summary(straight, k)["sft_gold_reward"] for k in (0, 1)}
  assert len(sft_gold) == 1
  # The labels the reward model of round 1 trained on: both rounds', less excluded raters.
  gate = json.load(open(os.path.join(r1, "gate.json")))
  trained = preferences.read_preferences(os.path.join(r1, "train_labels.jsonl"))
  assert len(trained) == gate["num_kept"] == rounds[1]["labels_trained_on"]
  assert not {r["rater_id"] for r in trained} & set(gate["excluded"])

  killed = str(tmp_path / "killed")
  reward0 = os.path.join(killed, "round_0", "reward")
  _kill_when(
    killed, _overrides(sft_dir), cache, lambda: resume.committed_steps(reward0), "round 0 RM"
  )
  assert not os.path.exists(os.path.join(reward0, "export.json"))
  cands1 = os.path.join(killed, "round_1", "candidates.json")
  _kill_when(killed, _overrides(sft_dir), cache, lambda: os.path.exists(cands1), "round 1")
  assert not os.path.exists(os.path.join(killed, "round_1", "queue", loop.LABELS_FILE))
  # Inside round 1's continued PPO stage, after its first checkpoint of its own (step 9).
  policy1 = os.path.join(killed, "round_1", "policy")
  _kill_when(killed, _overrides(sft_dir), cache, lambda: resume.committed_steps(policy1), "PPO 1")
  assert not os.path.exists(os.path.join(policy1, "export.json"))
  resume.run_to_end(CONFIG, killed, _overrides(sft_dir), cache)

  assert _loop_json(killed) == result
  for k in (0, 1):
    for name in ("candidates.json", "queue/pairs.jsonl", "queue/labels.jsonl", "gate.json"):
      a = _read(os.path.join(straight, f"round_{k}", name))
      assert a == _read(os.path.join(killed, f"round_{k}", name)), (k, name)
    for stage in ("reward", "policy"):
      _, ref = resume.export_params(os.path.join(straight, f"round_{k}", stage))
      _, got = resume.export_params(os.path.join(killed, f"round_{k}", stage))
      jax.tree.map(np.testing.assert_array_equal, got, ref)


@pytest.mark.slow
def test_labels_from_people_stop_the_loop_with_exit_2_until_they_are_in(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "people")
  overrides = [
    f"--config.policy_init={os.path.join(reward_dir, 'sft')}",
    "--config.labeler=files",
    "--config.rounds=1",
  ]
  proc = resume.launch(CONFIG, workdir, overrides, str(tmp_path / "jax_cache"))
  out, _ = proc.communicate(timeout=900)
  out = out.decode()
  queue = os.path.join(workdir, "round_0", "queue")
  assert proc.returncode == errors.EXIT_CODE, out[-3000:]
  assert f"FATAL waiting for labels: {queue}: 0 of 240 pairs have a label" in out
  assert "Traceback" not in out
  queue_rows = loop.read_queue(queue)
  assert len(queue_rows) == 240 and not any(q.get("anchor") for q in queue_rows)

  # People label every pair (three raters, turn about); the rerun goes on from there.
  labels = [
    {**_label(row, rater=f"rater{i % 3}"), "time": 1.7e9 + 20.0 * i}
    for i, row in enumerate(queue_rows)
  ]
  preferences.write_preference_jsonl(labels, os.path.join(queue, loop.LABELS_FILE))
  short = ["--config.reward.total_steps=10", "--config.rl.total_steps=2"]
  resume.run_to_end(CONFIG, workdir, overrides + short, str(tmp_path / "jax_cache"))
  with open(os.path.join(workdir, "loop.json")) as f:
    (only,) = json.load(f)["rounds"]
  assert only["labels_round"] == only["labels_trained_on"] == 240
  assert only["gate_testbed"] is None  # no known careless raters outside the panel


# --------------------------------------------- the stage options the loop builds on


def _reward_config():
  return config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))


def test_a_continued_reward_model_keeps_its_members_and_depth(reward_runlocal):
  from rlhf_jax.trainers import reward

  _, reward_dir, _ = reward_runlocal
  config = _reward_config()  # the fixture's config is shared: never change it
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  reward.CONFIG_SPEC.validate(config)
  config.ensemble_size = 3
  with pytest.raises(cs.ConfigError, match=r"has 2 members but config\.ensemble_size=3"):
    reward.CONFIG_SPEC.validate(config)
  config.ensemble_size, config.extra_layers = 2, 1
  with pytest.raises(cs.ConfigError, match=r"config\.extra_layers=1 with config\.reward_init"):
    reward.CONFIG_SPEC.validate(config)
  config.extra_layers, config.reward_init = 0, os.path.join(reward_dir, "sft")
  with pytest.raises(cs.ConfigError, match=r"exports a 'policy', not a reward"):
    reward.CONFIG_SPEC.validate(config)


def test_another_reference_is_refused_under_lora(reward_runlocal):
  from rlhf_jax.trainers import ppo

  _, reward_dir, _ = reward_runlocal
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.policy_init = config.reference_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  ppo.CONFIG_SPEC.validate(config)
  config.lora.rank = 4
  with pytest.raises(cs.ConfigError, match=r"reference_init=.* with config\.lora\.rank=4"):
    ppo.CONFIG_SPEC.validate(config)


@pytest.mark.slow
def test_a_reward_stage_continued_starts_where_the_last_one_ended(reward_runlocal, tmp_path):
  """Every member starts from the finished stage's trunk and head: the new stage's step-0
  eval equals the old stage's final eval (same eval pairs), and then it trains on."""
  from rlhf_jax import metrics

  _, reward_dir, final = reward_runlocal
  config = _reward_config()  # the fixture's config is shared: never change it
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 2, 2, 2, 1
  config.optim.warmup_steps = 1
  workdir = str(tmp_path / "continued")
  config_utils.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  start = next(r for r in rows if r["step"] == 0)
  assert start["eval/accuracy"] == final["eval/accuracy"]
  assert start["eval/loss"] == final["eval/loss"]
  assert stages.read_meta(workdir)["step"] == 2


def _summary(workdir, k):
  with open(os.path.join(workdir, f"round_{k}", "policy", "summary.json")) as f:
    return json.load(f)
