"""DPO trainer: runlocal on finished SFT and reward stages; metrics, reference cache, resume."""

import itertools
import json
import math
import os
import re
import types

import numpy as np
import pytest

from rlhf_jax import config_utils, errors, metrics, stages
from rlhf_jax.trainers import dpo
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The names researchers read in TRL's DPO logs (docs/rlhf_details.md), plus the optimizer's.
TRAIN_METRICS = (
  "loss",
  "rewards/chosen",
  "rewards/rejected",
  "rewards/margins",
  "rewards/accuracies",
  "logps/chosen",
  "logps/rejected",
  "lr",
  "grad_norm",
)
EVAL_METRICS = (
  "eval/pref_loss",
  "eval/pref_accuracy",
  "eval/gold_reward",
  "eval/proxy_reward",
  "eval/kl_to_ref",
  "eval/win_rate_vs_sft",
)


def runlocal_config(reward_dir):
  config = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  return config


def test_bad_config_values_name_the_field():
  config = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  dpo.check_config(config)
  for field, value in (
    ("loss_type", "kto"),
    ("beta", 0.0),
    ("label_smoothing", 0.1),  # with loss_type="sigmoid"
    ("ties", "drop"),
    ("total_steps", 0),
    ("soft_labels", "margin"),
    ("confidence_range", (5.0, 1.0)),
  ):
    bad = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
    bad[field] = value
    with pytest.raises(ValueError, match=re.escape(f"config.{field}=")):
      dpo.check_config(bad)
  bad = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  bad.soft_labels, bad.loss_type = "confidence", "hinge"
  with pytest.raises(ValueError, match=re.escape("config.soft_labels='confidence' needs")):
    dpo.check_config(bad)
  bad.soft_labels = "none"
  dpo.check_config(bad)
  bad.data.source = "hub"
  with pytest.raises(ValueError, match=re.escape("config.data.source=")):
    dpo.check_config(bad)


def test_ref_logps_file_is_keyed_by_data_and_sft_stage(tmp_path):
  sft_dir = tmp_path / "sft"
  sft_dir.mkdir()
  (sft_dir / "export.json").write_text('{"kind": "policy", "step": 10}')
  tables = {"train": {"chosen_tokens": np.arange(6).reshape(2, 3), "tie": np.zeros(2, bool)}}
  key = dpo.ref_logps_key(tables, str(sft_dir))
  path = str(tmp_path / "data" / dpo.REF_LOGPS_FILE)
  assert dpo.load_ref_logps(path, key) is None  # no file yet
  values = {"train_chosen": np.array([-3.0, -4.5], np.float32)}
  dpo.save_ref_logps(path, key, values)
  np.testing.assert_array_equal(dpo.load_ref_logps(path, key)["train_chosen"], [-3.0, -4.5])
  # Other tokens, or another SFT export, make the stored values stale.
  tables["train"]["chosen_tokens"] = tables["train"]["chosen_tokens"] + 1
  other_data = dpo.ref_logps_key(tables, str(sft_dir))
  (sft_dir / "export.json").write_text('{"kind": "policy", "step": 20}')
  other_sft = dpo.ref_logps_key(tables, str(sft_dir))
  assert len({key, other_data, other_sft}) == 3
  assert dpo.load_ref_logps(path, other_data) is None


def test_soft_labels_from_confidence(tmp_path):
  from rlhf_jax.data import testbed
  from rlhf_jax.data.tokenizer import Tokenizer

  texts = [e["prompt"] + " " + e["response"] for e in testbed.sft_examples(300, seed=0)]
  tok = Tokenizer.train(texts, 200)
  pairs = [
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad.", "tie": False}
    for _ in range(4)
  ]
  for pair, c in zip(pairs, (1.0, 3.0, 5.0, None), strict=True):
    pair["confidence"] = c
  hard = dpo.tokenize_pairs(pairs, tok, 24)
  assert hard["target"].tolist() == [1.0] * 4
  soft = dpo.tokenize_pairs(pairs, tok, 24, soft_labels="confidence")
  # 1..5 onto 1/2..1; a record without a confidence keeps its hard label.
  np.testing.assert_allclose(soft["target"], [0.5, 0.75, 1.0, 1.0])
  np.testing.assert_array_equal(soft["chosen_tokens"], hard["chosen_tokens"])
  # The labels do not change the reference log-probs: the same cache key.
  # A confidence on another scale is refused, naming the record.
  pairs[1] = {**pairs[1], "confidence": 0.7}
  with pytest.raises(ValueError, match=r"eval record 1: field 'confidence' = 0.7 is outside"):
    dpo.tokenize_pairs(pairs, tok, 24, soft_labels="confidence", what="eval record")
  (tmp_path / "export.json").write_text('{"kind": "policy", "step": 1}')
  keys = {dpo.ref_logps_key({"train": t}, str(tmp_path)) for t in (hard, soft)}
  assert len(keys) == 1


def test_testbed_source_builds_labelled_pairs(tmp_path, monkeypatch):
  """data.source="testbed": fresh panel-labelled pairs, two samples per prompt."""
  from rlhf_jax.data import pairs as pairs_lib
  from rlhf_jax.data import testbed

  examples = testbed.sft_examples(64, seed=0)
  asked = []

  def fake_samples(generate, n, k, split, seed, testbed_config):  # stands in for SFT samples
    asked.append((split, n, k))
    pairs = itertools.pairwise(examples)
    return [(e["prompt"], e["response"], f["response"]) for e, f in pairs][:n]

  monkeypatch.setattr(pairs_lib, "sample_comparisons", fake_samples)
  config = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  config.data.source, config.data.num_train, config.data.num_eval = "testbed", 24, 8
  # Sampling is faked; testbed prompts are plain text (no chat template to render with).
  no_policy = types.SimpleNamespace(generator=lambda **settings: None, tokenizer=None)
  train, evals, info = dpo.prepare_pairs(config, str(tmp_path), "unused", no_policy, None, None)
  assert asked == [("train", 24, 2), ("eval", 8, 2)]
  assert info["source"] == "testbed" and "noise_ceiling" in info
  skipped = {
    split: info["noise_ceiling"][split]["num_pairs_skipped"] for split in ("train", "eval")
  }
  assert len(evals) == 8 - skipped["eval"]
  assert len(train) > 24 - skipped["train"]  # plus the anchor pairs every rater labels
  assert all(0 <= train[i]["confidence"] <= 5 for i in range(len(train)))


def test_pairs_and_eval_prompts_of_a_reward_stage_trained_on_files(tmp_path):
  """source="reward_stage" reads the files the reward stage learned from; the generation
  eval samples the eval pairs' prompts, or the prompt files eval.prompts names."""
  config = config_utils.load_config(os.path.join(REPO, "configs/dpo.py:runlocal"))
  stage = tmp_path / "rm"
  stage.mkdir()
  with pytest.raises(errors.StageError, match="holds neither"):
    dpo.pair_paths(config, str(stage))
  rm_config = config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))
  rm_config.data.source = "jsonl"
  rm_config.data.train_files, rm_config.data.eval_files = ("/d/train.jsonl",), ("/d/eval.jsonl",)
  config_utils.write_config_json(rm_config, str(stage))
  assert dpo.pair_paths(config, str(stage)) == {
    "train": ["/d/train.jsonl"],
    "eval": ["/d/eval.jsonl"],
  }
  config.reward_init = str(stage)
  assert not dpo.testbed_eval(config)  # the judge "auto" is then the proxy, not gold
  pairs = [{"prompt": p, "chosen": "a", "rejected": "b"} for p in ("x", "y", "x", "z")]
  assert dpo.eval_prompts(config, pairs, None) == ["x", "y", "z"]
  prompt_file = tmp_path / "prompts.jsonl"
  prompt_file.write_text('{"prompt": "p1"}\n{"messages": [{"role": "user", "content": "p2"}]}\n')
  config.eval.prompts = str(prompt_file)
  assert dpo.eval_prompts(config, pairs, None) == ["p1", "User: p2\nAssistant: "]


@pytest.mark.slow
def test_runlocal_on_finished_stages(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "dpo")
  config = runlocal_config(reward_dir)
  config.log_every = 1  # step 1's loss is the loss at the reference
  assert config.soft_labels == "confidence"  # the default; the resume test runs hard labels
  final = config_utils.run(config, workdir)

  rows = metrics.read_metrics(workdir)
  evals = [r for r in rows if "eval/gold_reward" in r]
  # Measured before any update and at each eval.
  assert [r["step"] for r in evals] == [0, 6, 12]
  for key in EVAL_METRICS:
    assert all(np.isfinite(r[key]) for r in evals), key
  # Before any update the policy is the reference: h = 0 for every pair.
  assert evals[0]["eval/pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert evals[0]["eval/kl_to_ref"] == pytest.approx(0.0, abs=1e-4)
  train_rows = [r for r in rows if "rewards/margins" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 13))
  for key in TRAIN_METRICS:
    assert all(np.isfinite(r[key]) for r in train_rows), key
  assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert train_rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
  # The policy moved away from the reference, towards the held-out preferences. (Not
  # judged by eval/kl_to_ref: a k1 mean over 64 samples is noise at this distance, and
  # went negative when three over-long SFT examples were left out upstream.)
  assert evals[-1]["eval/pref_loss"] < math.log(2) - 1e-3
  assert train_rows[-1]["logps/chosen"] != train_rows[0]["logps/chosen"]
  assert 0.0 <= final["eval/win_rate_vs_sft"] <= 1.0

  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "dpo"
  assert summary["beta"] == config.beta and summary["loss_type"] == "sigmoid"
  for key in ("sft_gold_reward", "gold_reward", "kl_to_ref", "win_rate_vs_sft", "wall_time_s"):
    assert np.isfinite(summary[key]), key
  assert summary["gold_reward_gain"] == pytest.approx(
    summary["gold_reward"] - summary["sft_gold_reward"]
  )
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
    f"step_{s:07d}.jsonl" for s in (0, 6, 12)
  ]
  export = stages.read_meta(workdir)
  assert export["kind"] == "policy" and export["step"] == 12

  # The reference log-probs are computed once, for every train and eval pair.
  with open(os.path.join(workdir, "data_info.json")) as f:
    info = json.load(f)
  assert info["source"] == "reward_stage" and info["ref_logps"]["reused"] is False
  # The reward stage's testbed pairs carry the raters' confidence: soft targets.
  assert 0.5 < info["mean_train_target"] < 1.0
  with np.load(os.path.join(workdir, "data", dpo.REF_LOGPS_FILE)) as stored:
    assert stored["train_chosen"].shape == (info["num_train"],)
    assert stored["eval_rejected"].shape == (info["num_eval"],)
    assert np.all(stored["train_chosen"] < 0)


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_is_exact(reward_runlocal, tmp_path):
  """Params, optimizer state, step and the loader's position: all restored exactly."""
  _, reward_dir, _ = reward_runlocal
  overrides = [
    f"--config.policy_init={os.path.join(reward_dir, 'sft')}",
    f"--config.reward_init={reward_dir}",
    "--config.total_steps=24",
    "--config.log_every=4",
    "--config.eval_every=12",
    "--config.checkpoint_every=4",
    "--config.keep_checkpoints=10",
    "--config.eval.num_prompts=16",
    "--config.soft_labels=none",
  ]
  resume.check_kill_and_sigterm(
    tmp_path,
    "configs/dpo.py:runlocal",
    overrides,
    total_steps=24,
    kill_after=8,
    timing_metrics=dpo.TIMING_METRICS,
  )
  # The resumed runs reused the reference log-probs their first run stored.
  ref_file = os.path.join("data", dpo.REF_LOGPS_FILE)
  with np.load(tmp_path / "straight" / ref_file) as straight:
    for name in ("killed",):
      with open(tmp_path / name / "data_info.json") as f:
        assert json.load(f)["ref_logps"]["reused"] is True, name
      with np.load(tmp_path / name / ref_file) as stored:
        for key in straight.files:
          np.testing.assert_array_equal(stored[key], straight[key])


# ------------------------------------------------------------ shared-prompt rows


def _pair_table(max_len=14, vocab=40, pad=0, bos=1, eos=2):
  """SFT-layout rows of five pairs: shared prompts of several lengths, one pair whose
  prompts differ (as when one row's prompt was cut to fit), one left out (all padding)."""
  rng = np.random.default_rng(0)
  words = lambda n: list(rng.integers(3, vocab, n))
  pairs = [(words(p), words(c), words(r)) for p, c, r in ((3, 4, 6), (6, 2, 5), (1, 7, 1))]
  pairs.append((None, words(5), words(3)))  # prompts differ
  pairs.append(None)  # left out
  table = {}
  for side in ("chosen", "rejected"):
    tokens = np.full((len(pairs), max_len), pad, np.int32)
    loss = np.zeros((len(pairs), max_len), bool)
    for i, pair in enumerate(pairs):
      if pair is None:
        continue
      prompt = pair[0] if pair[0] is not None else words(2 if side == "chosen" else 4)
      response = pair[1] if side == "chosen" else pair[2]
      row = [bos, *prompt, *response, eos]
      tokens[i, : len(row)] = row
      loss[i, len(prompt) + 1 : len(row)] = True
    table.update(
      {f"{side}_tokens": tokens, f"{side}_mask": tokens != pad, f"{side}_loss_mask": loss}
    )
  n = len(pairs)
  table.update(
    tie=np.zeros(n, bool), valid=np.arange(n) < n - 1, target=np.ones(n, np.float32),
    ref_chosen=np.full(n, -20.0, np.float32), ref_rejected=np.full(n, -21.0, np.float32),
  )  # fmt: skip
  return table


def test_shared_prompt_rows_give_the_two_rows_log_probs_and_gradients(tmp_path):
  import functools

  import jax
  import jax.numpy as jnp

  from rlhf_jax import models
  from rlhf_jax.rl import dpo as dpo_lib

  cfg = models.get_model_config(
    "tiny", vocab_size=40, d_model=32, num_layers=2, mlp_dim=64, num_heads=4, num_kv_heads=2
  )
  module = models.LanguageModel(cfg)
  params = jax.jit(lambda key: models.init_params(module, key))(jax.random.key(0))
  two_rows = _pair_table()
  length, slots = widths = dpo_lib.shared_widths([two_rows])
  # 3 + 1 + 6 + 1 + (6 + 1) = 18 tokens for pair 0; the unshared pair: 2 + 5 + 1 + 3 + ...
  assert length % 8 == 0 and length < 2 * two_rows["chosen_tokens"].shape[1]
  assert slots % 8 == 0 and slots < length  # the prompts' positions have no target slot
  shared = dpo.share_prompts(two_rows, widths, pad_id=0)
  assert dpo.row_keys(shared) == dpo.SHARED_KEYS and dpo.row_keys(two_rows) == dpo.ROW_KEYS
  assert not set(dpo.ROW_KEYS) & set(shared)
  # Pair 0: BOS + 3 prompt tokens read once; both responses start at position 4.
  segment, positions = shared["shared_segment"][0], shared["shared_positions"][0]
  assert segment[:4].tolist() == [dpo_lib.PROMPT] * 4
  assert positions[4] == 4 and positions[4 + 5] == 4  # chosen: 4 tokens + EOS
  # Pair 0's targets: the chosen response (4 tokens + EOS), then the rejected one's.
  side, source = shared["shared_side"][0], shared["shared_source"][0]
  assert side[:12].tolist() == [1] * 5 + [2] * 7 and not side[12:].any()
  assert source[:5].tolist() == [3, 4, 5, 6, 7]
  assert source[5:12].tolist() == [3, 9, 10, 11, 12, 13, 14]  # first from the prompt's end
  np.testing.assert_array_equal(shared["shared_targets"][0][:5], shared["shared_tokens"][0][4:9])
  # The pair whose prompts differ holds its two rows side by side; the left-out one nothing.
  assert dpo_lib.PROMPT not in shared["shared_segment"][3]
  assert not shared["shared_mask"][4].any()
  assert dpo.row_tokens(shared) < dpo.row_tokens(two_rows)
  # The stored reference log-probs are keyed by the layout too (they differ by rounding).
  (tmp_path / "export.json").write_text('{"kind": "policy", "step": 1}')
  keys = {dpo.ref_logps_key({"train": t}, str(tmp_path)) for t in (two_rows, shared)}
  assert len(keys) == 2

  logps = jax.jit(functools.partial(dpo.pair_logps, module=module))
  want, got = logps(params, two_rows), logps(params, shared)
  for key in ("chosen", "rejected", "chosen_len", "rejected_len"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert np.all(np.asarray(want["chosen"])[:4] < 0)

  s = dpo.Settings(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, soft_ties=True)

  def loss(p, batch):
    per_pair, _, weight, _ = dpo.pair_terms(dpo.pair_logps(p, batch, module=module), batch, s=s)
    return dpo.weighted_mean(per_pair, weight)

  grads = [jax.jit(jax.grad(loss))(params, table) for table in (two_rows, shared)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0])) > 0
  # A sliding window counts row slots: one shorter than the shared rows keeps two rows.
  assert dpo.shares_exactly(cfg, length)
  assert dpo.shares_exactly(cfg.replace(sliding_window=length), length)
  assert not dpo.shares_exactly(cfg.replace(sliding_window=length - 1), length)
