"""Reward trainer: runlocal end to end (SFT trained on demand), export, reuse, resume."""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import config_utils, metrics, sharding, stages
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import pairs, preferences, testbed
from rlhf_jax.trainers import reward
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def trained(reward_runlocal):
  return reward_runlocal


@pytest.mark.slow
def test_runlocal_trains_sft_on_demand_and_learns(trained):
  config, workdir, final = trained
  assert stages.is_complete(os.path.join(workdir, "sft"))
  rows = [r for r in metrics.read_metrics(workdir) if "eval/loss" in r]
  first, last = rows[0], rows[-1]
  assert first["step"] == 0 and last["step"] == config.total_steps
  assert last["eval/loss"] < first["eval/loss"]
  # Correlation with gold on SFT-policy samples for held-out prompts rises.
  assert last["eval/gold_pearson"] > first["eval/gold_pearson"] + 0.1
  assert last["eval/gold_pearson"] > 0.3
  assert last["eval/accuracy"] > 0.55
  for key in ("eval/ece", "eval/margin", "eval/ensemble_spread", "eval/noise_ceiling"):
    assert np.isfinite(last[key]), key
  assert 0.5 < last["eval/noise_ceiling"] < 1.0
  train_rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
  for key in ("loss", "accuracy", "lr", "grad_norm", "param_norm", "update_norm", "mfu"):
    assert all(key in r for r in train_rows), key
  assert final == {k: v for k, v in last.items() if k.startswith("eval/")}
  with open(os.path.join(workdir, "data", "noise_ceiling.json")) as f:
    assert set(json.load(f)) == {"train", "eval"}


@pytest.mark.slow
def test_exported_ensemble_is_normalised_on_sft_samples(trained):
  config, workdir, _ = trained
  mesh = sharding.make_mesh((1, -1, 1))
  rm = stages.load_reward_model(workdir, mesh)
  assert rm.ensemble_size == config.ensemble_size
  # Re-create the normalisation samples (deterministic) and score them.
  policy = stages.load_policy(os.path.join(workdir, "sft"), mesh)
  prompts = reward.normalization_prompts(config, None)
  sampling = dict(
    max_new_tokens=config.data.max_new_tokens,
    temperature=config.data.temperature,
    prompt_len=config.data.prompt_len,
    batch_size=config.data.sample_batch,
    mesh=mesh,
    rules="fsdp",
  )
  responses = policy.generate(prompts, rng=jax.random.key(config.seed + 13), **sampling)
  # The compiled sampler is built once per setting and reused: same samples, no new entry.
  first = prompts[: config.data.sample_batch]
  again = policy.generate(first, rng=jax.random.key(config.seed + 13), **sampling)
  assert again == responses[: len(first)]
  assert len(policy.samplers) == 1
  rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
  batch = loader_lib.sft_collate(rows, rm.tokenizer, config.max_len)
  with sharding.use_mesh(mesh, "fsdp"):
    mean, spread = rm.score(batch["tokens"], batch["input_mask"])
  mean, spread = np.asarray(mean), np.asarray(spread)
  np.testing.assert_allclose(mean.mean(), 0.0, atol=1e-3)
  np.testing.assert_allclose(mean.std(), 1.0, atol=1e-3)
  # Members disagree somewhere: the spread is an uncertainty signal, not zeros.
  assert spread.max() > 0.0
  # Scores follow gold on these samples.
  gold = [
    testbed.gold_reward(p, r, config.data.testbed) for p, r in zip(prompts, responses, strict=True)
  ]
  assert np.corrcoef(mean, gold)[0, 1] > 0.3


@pytest.mark.slow
def test_rerun_reuses_finished_stages(trained):
  config, workdir, _ = trained
  sft_metrics = os.path.join(workdir, "sft", "metrics.jsonl")
  before = (os.path.getmtime(sft_metrics), os.path.getmtime(os.path.join(workdir, "export.json")))
  config_utils.run(config, workdir)
  after = (os.path.getmtime(sft_metrics), os.path.getmtime(os.path.join(workdir, "export.json")))
  assert before == after


def test_loading_the_wrong_kind_of_stage_is_refused(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "export.json"), "w") as f:
    json.dump({"kind": "policy"}, f)
  with pytest.raises(ValueError, match="not a reward model"):
    stages.load_reward_model(workdir, sharding.make_mesh((1, -1, 1)))
  with pytest.raises(FileNotFoundError, match="no finished stage"):
    stages.load_policy(str(tmp_path / "missing"), sharding.make_mesh((1, -1, 1)))


def _pairs(examples):
  return [[e] for e in examples]  # plain pairs: one comparison per group


def test_pair_collate_marks_ties_margins_and_drops():
  tok = _testbed_tokenizer()
  examples = [
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad.", "margin": 0.5},
    {"prompt": "Review of the lamp:", "chosen": "Fine.", "rejected": "Okay.", "tie": True},
    {"prompt": "Review of the lamp:", "chosen": "word " * 80, "rejected": "Bad."},
  ]
  batch = pairs.group_collate(_pairs(examples), tok, max_len=24)
  assert batch["tokens"].shape == (3, 2, 24)
  np.testing.assert_array_equal(batch["margin"][:, 0], [0.5, 0.0, 0.0])
  np.testing.assert_array_equal(batch["tie"][:, 0], [False, True, False])
  np.testing.assert_array_equal(batch["valid"][:, 0], [True, True, False])
  np.testing.assert_array_equal(batch["chosen"][:, 0], [0, 0, 0])
  np.testing.assert_array_equal(batch["rejected"][:, 0], [1, 1, 1])
  # Each row ends with EOS at its last real position (where the score is read).
  mask = batch["mask"]
  assert batch["tokens"][0, 0, mask[0, 0].sum() - 1] == tok.eos_id
  assert batch["tokens"][1, 1, mask[1, 1].sum() - 1] == tok.eos_id


def test_kwise_groups_score_each_response_once():
  tok = _testbed_tokenizer()
  p, q = "Review of the lamp:", "Review of the kettle:"
  records = [
    {"prompt": p, "chosen": "It glows.", "rejected": "It is bad."},
    {"prompt": p, "chosen": "It glows.", "rejected": "It is fine."},
    {"prompt": p, "chosen": "It is fine.", "rejected": "It is bad.", "tie": True},
    {"prompt": p, "chosen": "It dims.", "rejected": "It is bad."},  # a 4th response: new group
    {"prompt": q, "chosen": "It is hot.", "rejected": "It is cold."},  # another prompt: new group
    {"prompt": p, "chosen": "It glows.", "rejected": "It is bad."},  # not a neighbour: new group
  ]
  groups = preferences.comparison_groups(records, max_responses=3, max_records=3)
  assert groups == [[0, 1, 2], [3], [4], [5]]
  assert preferences.comparison_groups(records, 3, 2) == [[0, 1], [2, 3], [4], [5]]
  assert preferences.comparison_groups(records, 2, 1) == [[i] for i in range(6)]
  source = preferences.GroupedSource(records, groups)
  assert len(source) == 4 and source[1] == [records[3]]
  batch = pairs.group_collate(source.__getitems__([0, 1]), tok, 24, responses=3, pairs=3)
  assert batch["tokens"].shape == (2, 3, 24)
  # Group 0: rows "It glows.", "It is bad.", "It is fine." once each; comparisons index into them.
  np.testing.assert_array_equal(batch["chosen"], [[0, 0, 2], [0, 0, 0]])
  np.testing.assert_array_equal(batch["rejected"], [[1, 2, 1], [1, 0, 0]])
  np.testing.assert_array_equal(batch["valid"], [[True, True, True], [True, False, False]])
  np.testing.assert_array_equal(batch["tie"][0], [False, False, True])
  rows = [tok.decode_batch(batch["tokens"][g])[:n] for g, n in ((0, 3), (1, 2))]
  assert [r[-len("It is fine.") :] for r in rows[0]][2] == "It is fine."
  assert rows[1][0].endswith("It dims.") and rows[1][1].endswith("It is bad.")
  with pytest.raises(ValueError, match="at most 2 fit"):
    pairs.group_collate([records[:3]], tok, 24, responses=3, pairs=2)


def test_pair_collate_soft_labels_from_confidence():
  tok = _testbed_tokenizer()
  examples = [
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad.", "confidence": c}
    for c in (1.0, 3.0, 5.0, float("nan"))
  ]
  assert pairs.group_collate(_pairs(examples), tok, 24)["target"].tolist() == [[1.0]] * 4
  batch = pairs.group_collate(_pairs(examples), tok, 24, soft_labels="confidence")
  # 1..5 onto 0.5..1; a record without a confidence keeps its hard label.
  np.testing.assert_allclose(batch["target"][:, 0], [0.5, 0.75, 1.0, 1.0])
  batch = pairs.group_collate(
    _pairs(examples), tok, 24, soft_labels="confidence", confidence_range=(1, 3)
  )
  np.testing.assert_allclose(batch["target"][:, 0], [0.5, 1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="soft_labels='margin'"):
    pairs.group_collate(_pairs(examples), tok, 24, soft_labels="margin")


def test_confidence_on_another_scale_is_refused():
  records = [
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad.", "confidence": c}
    for c in (1.0, float("nan"), 5.0)
  ]
  pairs.check_confidence_range(records, (1.0, 5.0))
  records.append({**records[0], "confidence": 0.7})
  with pytest.raises(ValueError, match=r"record 3: field 'confidence' = 0.7 is outside"):
    pairs.check_confidence_range(records, (1.0, 5.0))


def _testbed_tokenizer():
  from rlhf_jax.data.tokenizer import Tokenizer

  texts = [e["prompt"] + " " + e["response"] for e in testbed.sft_examples(300, seed=0)]
  return Tokenizer.train(texts, 200)


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_is_exact(reward_runlocal, tmp_path):
  """Ensemble params, optimizer state, step, RNG, loader position; pairs and export too."""
  _, reward_dir, _ = reward_runlocal
  sft_dir = os.path.join(reward_dir, "sft")
  config = "configs/reward.py:runlocal"
  overrides = [
    f"--config.policy_init={sft_dir}",  # the fixture's SFT stage: not retrained
    "--config.total_steps=16",
    "--config.optim.warmup_steps=4",
    "--config.data.num_train=64",  # 11 groups plus 120 anchor pairs: runs cross epoch ends
    "--config.batch_size=16",
    "--config.data.num_eval=32",
    "--config.data.sample_batch=32",
    "--config.normalize_samples=32",
    "--config.eval.num_gold_samples=32",
    "--config.log_every=4",
    "--config.eval_every=8",
    "--config.checkpoint_every=4",
    "--config.keep_checkpoints=10",
  ]
  resume.check_kill_and_sigterm(
    tmp_path,
    config,
    overrides,
    total_steps=16,
    kill_after=4,
    timing_metrics=reward.TIMING_METRICS,
    samples=False,
  )
  straight = str(tmp_path / "straight")
  ref_meta = stages.read_meta(straight)
  assert ref_meta["step"] == 16 and ref_meta["policy"] == os.path.abspath(sft_dir)
  assert np.isfinite(ref_meta["gain"]) and ref_meta["gain"] > 0 and np.isfinite(ref_meta["bias"])
  assert metrics.read_metrics(straight)[-1]["step"] == 16
  assert ref_meta["eval"] == resume.final_eval(straight)
  assert "eval/gold_pearson" in ref_meta["eval"]
  ref_info = _read_json(os.path.join(straight, "data_info.json"))
  assert ref_info["num_train"] > 0 and ref_info["num_eval"] > 0

  # Stopped after the final checkpoint but before the export (normalisation is a second
  # of sampling and scoring): the rerun exports the same stage. Its noise_ceiling.json
  # goes too, as a first run stopped between the pairs files and it leaves them: the
  # rerun redoes all three (same bytes, checked below) rather than failing to read it.
  resume.rerun_after_late_stop(
    tmp_path, config, overrides, also_remove=(os.path.join("data", "noise_ceiling.json"),)
  )

  for name in ("killed", "late"):
    workdir = str(tmp_path / name)
    # The labelled pairs, written on the first (interrupted) run, and their noise ceiling.
    for file in ("pairs_train.jsonl", "pairs_eval.jsonl", "noise_ceiling.json"):
      with open(os.path.join(straight, "data", file), "rb") as a:
        with open(os.path.join(workdir, "data", file), "rb") as b:
          expected = a.read()
          assert expected and b.read() == expected, (name, file)
    info = _read_json(os.path.join(workdir, "data_info.json"))
    for key in ("content_hash", "num_train", "num_eval", "skipped", "noise_ceiling"):
      assert info[key] == ref_info[key], (name, key)
    # The exported stage: metadata (gain, bias, final eval) and the ensemble, bit for bit.
    resume.assert_same_export(straight, workdir)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


# A tiny hand-written preference dataset: for each item, a specific, a vague and an
# off-topic review, and the three pairs among them (consecutive, so they form one group).
_ITEMS = ["kettle", "lamp", "chair", "blender", "desk", "fan", "mug", "toaster"]
_COLOURS = ["blue", "red"]


def _handwritten_pairs():
  records = []
  for item in _ITEMS:
    for colour in _COLOURS:
      prompt = f"Review of the {colour} {item}:"
      best = f"The {item} works well and looks great."
      ok = "It is fine."
      worst = "It is bad bad bad."
      for chosen, rejected, confidence in ((best, ok, 4.0), (best, worst, 5.0), (ok, worst, 3.0)):
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "rater_id": f"r{len(records) % 3}", "confidence": confidence})  # fmt: skip
  return records


@pytest.mark.slow
def test_reward_model_on_preference_files_end_to_end(reward_runlocal, tmp_path):
  """data.source=jsonl trains, normalises on SFT samples of the files' prompts and exports.

  It used to run every step and then stop at the normalisation ("needs SFT-policy prompts").
  """
  import pyarrow as pa
  import pyarrow.parquet as pq

  _, reward_dir, _ = reward_runlocal
  records = _handwritten_pairs()
  train_file = tmp_path / "prefs.jsonl"
  train_file.write_text("".join(json.dumps(r) + "\n" for r in records[:36]))
  eval_file = tmp_path / "prefs_eval.parquet"
  pq.write_table(pa.Table.from_pylist(records[36:]), eval_file)
  config = config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.data.source = "jsonl"
  config.data.train_files = (str(train_file),)
  config.data.eval_files = (str(eval_file),)
  config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 8, 8, 8, 4
  config.optim.warmup_steps, config.normalize_samples = 2, 32
  workdir = str(tmp_path / "rm")
  final = config_utils.run(config, workdir)

  assert np.isfinite(final["eval/accuracy"]) and "eval/gold_pearson" not in final
  meta = stages.read_meta(workdir)
  assert meta["kind"] == "reward" and meta["step"] == 8
  assert np.isfinite(meta["gain"]) and meta["gain"] > 0 and np.isfinite(meta["bias"])
  with open(os.path.join(workdir, "data_info.json")) as f:
    info = json.load(f)
  assert info["num_train"] == 36 and info["num_eval"] == 12
  assert info["lengths"]["train"]["files"][str(train_file)]["records"] == 36
  assert info["num_train_groups"] == 12  # three pairs of one prompt share a group
  # Normalised on samples for the files' own prompts, repeated to normalize_samples.
  source = preferences.build_preferences([str(train_file)], tmp_path / "tfds").source()
  prompts = reward.normalization_prompts(config, source)
  assert len(prompts) == 32 and set(prompts) == {r["prompt"] for r in records[:36]}
  mesh = sharding.make_mesh((1, -1, 1))
  rm = stages.load_reward_model(workdir, mesh)
  # The export loads like any reward stage and scores new text.
  rows = [{"prompt": "Review of the red desk:", "response": r} for r in
          ("The desk works well and looks great.", "It is bad bad bad.")]  # fmt: skip
  batch = loader_lib.sft_collate(rows, rm.tokenizer, config.max_len)
  with sharding.use_mesh(mesh, "fsdp"):
    scores, _ = rm.score(batch["tokens"], batch["input_mask"])
  assert np.all(np.isfinite(np.asarray(scores)))
