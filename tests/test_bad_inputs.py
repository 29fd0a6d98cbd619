"""Bad input through the real entry points: one clear line, exit 2, no traceback, nothing trusted.

Every case runs `experiments.launch` as `__main__`, as `python -m` does for a user, on a
malformed config value, data file, workdir or checkpoint (and the two other entry points,
`experiments.label_report` and `experiments.compare`), and requires:

  - exit status 2 and no Python traceback;
  - the message names what is wrong and where: the dotted config key, the file and line
    (Parquet: row) and field, or the checkpoint folder (each case lists the fragments);
  - nothing a rerun would trust is left behind: no export, no new committed checkpoint, no
    completed dataset build, no summary; damaged checkpoints are renamed aside, not deleted.

The cases run concurrently (a module fixture), then each is checked by its own test. Most run
in children forked by one warm interpreter (tests/cli_runner.py: the entry point run as
`__main__` with its own exit status and file descriptors 1 and 2), since starting Python and
importing JAX is most of a case; those in `COLD` run as true `python -m` subprocesses, so the
cold entry point stays covered. `CASES` holds one line per case: an id, the command line
(placeholders: {tmp} is the case's folder, {sft} a finished tiny SFT stage, {fake_policy} a
folder whose export.json says "policy", {fake_reward} the same for a reward-model ensemble of
2), the fragments the message must contain, and the files the case writes first (FILES[id]) or the
damage it does to a copy of the SFT stage (DAMAGE[id]).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import cli_runner, shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SFT = "--config=configs/sft.py:runlocal"
RM = "--config=configs/reward.py:runlocal"
PPO = "--config=configs/ppo.py:runlocal"
DPO = "--config=configs/dpo.py:runlocal"
GRPO = "--config=configs/grpo.py:runlocal"
BON = "--config=configs/best_of_n.py:runlocal"
SFT_FILE = [SFT, "--config.data.source=jsonl", "--config.data.train_jsonl={tmp}/s.jsonl"]
RM_FILE = [RM, "--config.policy_init={sft}", "--config.data.source=jsonl",
           "--config.data.train_files=('{tmp}/p.jsonl',)"]  # fmt: skip
RM_PARQUET = [*RM_FILE[:3], "--config.data.train_files=('{tmp}/p.parquet',)"]
PROMPT_FILE = [GRPO, "--config.data.source=jsonl", "--config.data.prompts={tmp}/q.jsonl",
               "--config.policy_init={sft}", "--config.eval.num_prompts=8",
               "--config.reward_fn=tests.trainers.test_grpo:length_reward"]  # fmt: skip
# The finished tiny SFT stage every workdir case starts from (trained once, copied per case).
SFT_SMALL = [SFT, "--config.total_steps=20", "--config.checkpoint_every=10",
             "--config.eval_every=20", "--config.log_every=10", "--config.data.num_train=200",
             "--config.data.num_eval=16", "--config.eval.num_samples=4",
             "--config.optim.warmup_steps=2"]  # fmt: skip
RESUME = [*SFT_SMALL, "--workdir={tmp}/work"]  # rerun of that stage, copied to {tmp}/work
REPORT = "experiments.label_report"

HF_MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 9,
              "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16}  # fmt: skip
ELEVEN_PROMPTS = [f"Review of the {c} {i}:" for c in ("red", "blue") for i in ("lamp", "desk", "mug", "fan", "chair", "kettle")][:11]  # fmt: skip
GOOD_SFT = '{"prompt": "Review of the lamp:", "response": "It glows warmly."}\n'
GOOD_PAIR = {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad.",
             "rater_id": 1, "confidence": 4.0}  # fmt: skip


def _pairs(*changes):
  """JSONL of a good pair, then the good pair with each change applied (one line each)."""
  return "".join(json.dumps({**GOOD_PAIR, **c}) + "\n" for c in ({}, *changes))


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  args: tuple
  expect: tuple
  entry: str = "experiments.launch"


def C(id, args, *expect, entry="experiments.launch"):
  return Case(id, tuple(args if isinstance(args, list) else [args]), expect, entry)


# fmt: off
CASES = [
  # -- flags and config files ---------------------------------------------------------------
  C("unknown_key", [SFT, "--config.optim.lrr=0.1"], "config.optim.lrr", "config.optim.lr"),
  C("wrong_type", [SFT, "--config.total_steps=ten"], "config.total_steps", "expected int"),
  C("missing_config_file", "--config=configs/nope.py", "configs/nope.py", "not found"),
  C("unknown_config_arg", "--config=configs/sft.py:runlokal", "runlokal", "known keys"),
  C("unknown_trainer", [SFT, "--config.trainer=sftt"], "config.trainer", "Did you mean 'sft'"),
  C("stray_argument", [SFT, "extra"], "Unexpected arguments: extra"),
  # -- values out of range, named by their dotted key ----------------------------------------
  C("keep_checkpoints_0", [SFT, "--config.keep_checkpoints=0"], "config.keep_checkpoints=0", ">= 1"),
  C("negative_lr", [SFT, "--config.optim.lr=-0.01"], "config.optim.lr=-0.01", "> 0"),
  C("nan_lr", [SFT, "--config.optim.lr=nan"], "config.optim.lr=nan", "finite"),
  C("negative_clip", [SFT, "--config.optim.grad_clip_norm=-1"], "config.optim.grad_clip_norm=-1", ">= 0"),
  C("checkpoint_every_0", [SFT, "--config.checkpoint_every=0"], "config.checkpoint_every=0"),
  C("log_every_0", [SFT, "--config.log_every=0"], "config.log_every=0"),
  C("eval_every_0", [SFT, "--config.eval_every=0"], "config.eval_every=0"),
  C("total_steps_0", [SFT, "--config.total_steps=0"], "config.total_steps=0"),
  C("batch_size_0", [SFT, "--config.batch_size=0"], "config.batch_size=0"),
  C("mesh_zero", [SFT, "--config.mesh=(0,-1,1)"], "config.mesh=(0, -1, 1)", "each size"),
  C("mesh_two_fill", [SFT, "--config.mesh=(-1,-1,1)"], "config.mesh=(-1, -1, 1)", "at most one"),
  C("mesh_too_big", [SFT, "--config.mesh=(3,1,1)"], "config.mesh=(3, 1, 1)", "needs 3 devices"),
  C("mesh_batch", [SFT, "--config.batch_size=15"], "config.batch_size=15", "mesh batch shards"),
  C("bad_rules", [SFT, "--config.sharding_rules=zero3"], "config.sharding_rules='zero3'"),
  C("bad_optimizer", [SFT, "--config.optim.name=adafactor"], "config.optim.name='adafactor'"),
  C("bad_schedule", [SFT, "--config.optim.schedule=exp"], "config.optim.schedule='exp'"),
  C("warmup_past_end", [SFT, "--config.optim.warmup_steps=500"], "config.optim", "warmup_steps=500"),
  C("bad_lr_fraction", [SFT, "--config.optim.final_lr_fraction=1.5"], "config.optim.final_lr_fraction=1.5", "<= 1"),
  C("heads_dont_divide", [SFT, "--config.model.num_heads=3"], "config.model", "num_heads=3"),
  C("unknown_preset", [SFT, "--config.model.preset=gpt5"], "config.model.preset='gpt5'"),
  C("bad_dtype", [SFT, "--config.model.dtype=int8"], "config.model.dtype='int8'"),
  C("max_len_2", [SFT, "--config.max_len=2"], "config.max_len=2", ">= 3"),
  C("bad_source", [SFT, "--config.data.source=hub"], "config.data.source='hub'"),
  C("jsonl_without_file", [SFT, "--config.data.source=jsonl"], "config.data.train_jsonl is empty"),
  C("missing_data_file", [*SFT_FILE[:2], "--config.data.train_jsonl={tmp}/none.jsonl"], "config.data.train_jsonl", "none.jsonl", "no such file"),
  C("missing_tokenizer", [SFT, "--config.tokenizer.path={tmp}/none.model"], "config.tokenizer.path", "no such file"),
  C("testbed_no_raters", [RM, "--config.data.testbed.panel.num_raters=0"], "config.data.testbed.panel.num_raters=0"),
  C("testbed_categories", [SFT, "--config.data.testbed.language.num_categories=9"], "config.data.testbed.language.num_categories=9", "<= 8"),
  C("testbed_taus_count", [RM, "--config.data.testbed.panel.taus=(0.5,0.5)"], "config.data.testbed.panel.taus", "2 values for"),
  C("rm_soft_labels", [RM, "--config.soft_labels=margin"], "config.soft_labels='margin'"),
  C("rm_k_1", [RM, "--config.data.responses_per_prompt=1"], "config.data.responses_per_prompt=1"),
  C("rm_ensemble_0", [RM, "--config.ensemble_size=0"], "config.ensemble_size=0"),
  C("rm_confidence_range", [RM, "--config.confidence_range=(5.0,1.0)"], "config.confidence_range=(5.0, 1.0)", "high must exceed low"),
  C("ppo_kl_target_0", [PPO, "--config.kl.target=0"], "config.kl.target=0", "> 0"),
  C("ppo_kl_horizon", [PPO, "--config.kl.horizon=5"], "config.kl.horizon=5", "beta turns negative"),
  C("ppo_minibatch", [PPO, "--config.minibatch_size=12"], "config.rollout_batch_size=32", "multiple of config.minibatch_size=12"),
  C("ppo_value_model", [PPO, "--config.value_model=shared"], "config.value_model='shared'"),
  C("ppo_gamma", [PPO, "--config.gamma=1.5"], "config.gamma=1.5", "<= 1"),
  C("ppo_nested_sft", [PPO, "--config.sft.optim.lr=0"], "config.sft.optim.lr=0"),
  C("ppo_nested_rm_sft", [PPO, "--config.reward.sft.checkpoint_every=0"], "config.reward.sft.checkpoint_every=0"),
  C("ppo_policy_init_missing", [PPO, "--config.policy_init={tmp}/nowhere"], "config.policy_init", "no such directory"),
  C("ppo_policy_init_unfinished", [PPO, "--config.policy_init={tmp}"], "config.policy_init", "export.json is missing"),
  C("ppo_continue_from_another_trainer", [PPO, "--config.policy_init={sft}", "--config.continue_from={sft}"], "config.continue_from", "is a 'sft' stage; a 'ppo' stage continues only"),
  C("ppo_reward_init_kind", [PPO, "--config.policy_init={fake_policy}", "--config.reward_init={fake_policy}"], "config.reward_init", "exports a 'policy', not a reward"),
  C("dpo_beta_0", [DPO, "--config.beta=0"], "config.beta=0", "> 0"),
  C("dpo_hinge_soft", [DPO, "--config.loss_type=hinge"], "config.soft_labels='confidence'", "hinge"),
  C("dpo_smoothing", [DPO, "--config.label_smoothing=0.1"], "config.label_smoothing=0.1", "conservative"),
  C("dpo_loss_type", [DPO, "--config.loss_type=kto"], "config.loss_type='kto'"),
  C("grpo_k1_loss", [GRPO, "--config.kl.estimator=k1"], "config.kl.estimator='k1'", "expected gradient"),
  C("grpo_group_1", [GRPO, "--config.group_size=1"], "config.group_size=1"),
  C("grpo_reward_fn", [GRPO, "--config.reward_fn=no_such_module_q:score"], "config.reward_fn='no_such_module_q:score'", "cannot import"),
  C("bon_n_too_big", [BON, "--config.ns=(1,32)"], "config.ns", "n=32 > config.num_samples=16"),
  C("ppo_prompts_missing", [PPO, "--config.data.source=jsonl"], "config.data.prompts is empty"),
  C("ppo_prompt_file_missing", [PPO, "--config.data.source=jsonl", "--config.data.prompts={tmp}/none.jsonl"], "config.data.prompts", "none.jsonl", "is not a file"),
  C("ppo_judge_gold_on_files", [PPO, "--config.data.source=jsonl", "--config.data.prompts={tmp}/q.jsonl", "--config.eval.judge=gold"], "config.eval.judge='gold'", "only for the testbed's prompts"),
  C("ppo_judge_unknown", [PPO, "--config.eval.judge=oracle"], "config.eval.judge='oracle'", "expected one of"),
  C("ppo_judge_rm_missing", [PPO, "--config.eval.judge=rm:{tmp}/none"], "config.eval.judge='rm:", "no such directory"),
  # -- prompt files for the RL stages (GRPO on a reward function: no reward model needed) ----
  C("prompts_bad_record", PROMPT_FILE, "{tmp}/q.jsonl:2", "exactly one of the fields 'prompt' and 'messages'"),
  C("prompts_chat_ends_with_assistant", PROMPT_FILE, "{tmp}/q.jsonl:2", "must end with a user turn"),
  C("prompts_all_too_long", PROMPT_FILE, "{tmp}/q.jsonl", "no train prompt fits prompt_len=18 tokens"),
  C("prompts_too_few", [*PROMPT_FILE, "--config.prompt_len=40"], "config.prompts_per_iter=8", "exceeds the 3 training prompts"),
  # -- SFT data files -------------------------------------------------------------------------
  C("sft_not_json", SFT_FILE, "{tmp}/s.jsonl:2", "not valid JSON"),
  C("sft_missing_field", SFT_FILE, "{tmp}/s.jsonl:2", "missing field 'response'"),
  C("sft_wrong_type", SFT_FILE, "{tmp}/s.jsonl:2", "field 'response' must be a non-empty string, got int"),
  C("sft_blank_prompt", SFT_FILE, "{tmp}/s.jsonl:2", "field 'prompt' must be a non-empty string"),
  C("sft_not_utf8", SFT_FILE, "{tmp}/s.jsonl:2", "not valid UTF-8"),
  C("sft_not_object", SFT_FILE, "{tmp}/s.jsonl:1", "expected a JSON object"),
  C("sft_empty_file", SFT_FILE, "{tmp}/s.jsonl", "the file has no records"),
  C("sft_blank_lines_only", SFT_FILE, "{tmp}/s.jsonl", "the file has no records"),
  C("sft_all_invalid_skipped", [*SFT_FILE, "--config.data.skip_invalid=True"], "{tmp}/s.jsonl", "all 2 records are invalid"),
  C("sft_all_too_long", [*SFT_FILE, "--config.max_len=4"], "{tmp}/s.jsonl", "none of the 40 train examples fits config.max_len=4"),
  C("sft_bad_eval_file", [*SFT_FILE, "--config.data.eval_jsonl={tmp}/e.jsonl"], "{tmp}/e.jsonl:1", "missing field 'prompt'"),
  C("sft_too_few_for_batch", [*SFT_FILE, "--config.batch_size=64"], "config.batch_size=64", "exceeds the 40 training examples"),
  C("sft_nan_loss", [SFT, "--config.optim.lr=1e30", "--config.optim.grad_clip_norm=0"], "FATAL training error", "Non-finite training metrics at step"),
  # -- preference files for the reward model --------------------------------------------------
  C("rm_same_texts", RM_FILE, "{tmp}/p.jsonl:2", "'chosen' and 'rejected' hold the same text"),
  C("rm_negative_margin", RM_FILE, "{tmp}/p.jsonl:2", "field 'margin' must be >= 0"),
  C("rm_tie_margin", RM_FILE, "{tmp}/p.jsonl:2", "field 'margin' must be 0 for a tie"),
  C("rm_p_chosen", RM_FILE, "{tmp}/p.jsonl:2", "field 'p_chosen' must be in [0, 1]"),
  C("rm_shown_order", RM_FILE, "{tmp}/p.jsonl:2", "field 'shown_order' must be one of"),
  C("rm_tie_not_bool", RM_FILE, "{tmp}/p.jsonl:2", "field 'tie' must be true or false"),
  C("rm_confidence_out_of_range", RM_FILE, "{tmp}/p.jsonl:3", "field 'confidence' = 7.0 is outside config.confidence_range"),
  C("rm_all_too_long", [*RM_FILE, "--config.max_len=5"], "{tmp}/p.jsonl", "none of the 20 train pairs fits config.max_len=5"),
  C("rm_missing_file", [*RM_FILE[:3], "--config.data.train_files=('{tmp}/none.jsonl',)"], "config.data.train_files[0]", "no such file"),
  C("rm_parquet_row", RM_PARQUET, "{tmp}/p.parquet: row 2", "field 'chosen' must be a non-empty string"),
  C("rm_parquet_corrupt", RM_PARQUET, "{tmp}/p.parquet", "cannot read the rows"),
  C("rm_parquet_garbage", RM_PARQUET, "{tmp}/p.parquet", "not a readable Parquet file"),
  C("rm_parquet_empty", RM_PARQUET, "{tmp}/p.parquet", "the file has no records"),
  C("report_bad_record", ["--data={tmp}/p.jsonl"], "{tmp}/p.jsonl:2", "field 'chosen' must be a non-empty string", entry=REPORT),
  C("report_no_raters", ["--data={tmp}/p.jsonl"], "{tmp}/p.jsonl", "no record has a rater_id", entry=REPORT),
  C("report_missing_file", ["--data={tmp}/none.jsonl"], "{tmp}/none.jsonl", entry=REPORT),
  C("compare_unknown_method", ["--methods=ppo,sac", "--workdir={tmp}/c"], "Unknown method 'sac'", entry="experiments.compare"),
  C("compare_unknown_key", ["--methods=ppo", "--size=runlocal", "--set=kl.init_coeff=0.1", "--workdir={tmp}/c"], "config.kl.init_coeff", entry="experiments.compare"),
  C("sweep_missing_file", ["--sweep={tmp}/none.py", "--config=configs/ppo.py:runlocal", "--workdir={tmp}/s"], "Sweep file '{tmp}/none.py' not found", entry="experiments.sweep"),
  C("sweep_unknown_key", ["--sweep=configs/sweeps/kl_coef.py:runlocal", "--config=configs/ppo.py:runlocal", "--set=kl.init_coeff=1", "--workdir={tmp}/s"], "config.kl.init_coeff (from --set)", "Did you mean config.kl.init_coef", entry="experiments.sweep"),
  C("sweep_unknown_baseline", ["--sweep=configs/sweeps/kl_coef.py:runlocal", "--config=configs/ppo.py:runlocal", "--baseline=kl.init_coef=9", "--dry_run", "--workdir={tmp}/s"], "--baseline='kl.init_coef=9' is not a setting", "'kl.init_coef=0.01'", entry="experiments.sweep"),
  C("sweep_bad_arg", ["--sweep=configs/sweeps/kl_coef.py:seeds=x", "--config=configs/ppo.py", "--workdir={tmp}/s"], "Config arg seeds='x': expected int", entry="experiments.sweep"),
  # -- Hugging Face models in ({tmp} holds a config.json) and the export ---------------------
  C("hf_missing_dir", [SFT, "--config.policy_init=hf:{tmp}/none"], "config.policy_init", "no such directory"),
  C("hf_unsupported_model", [SFT, "--config.policy_init=hf:{tmp}"], "config.policy_init", "{tmp}/config.json", "model_type 'gemma3' is not supported"),
  C("hf_sliding_window", [PPO, "--config.policy_init=hf:{tmp}"], "config.policy_init", "sliding_window=4096 is not supported", "implemented for Mistral and Gemma only"),
  C("hf_policy_as_reward", [PPO, "--config.policy_init=hf:{tmp}", "--config.reward_init=hf:{tmp}"], "config.reward_init", "not a reward model"),
  C("export_missing_stage", ["--workdir={tmp}/none", "--out={tmp}/o"], "{tmp}/none", entry="experiments.export"),
  C("export_ensemble_member", ["--workdir={fake_reward}", "--out={tmp}/o"], "ensemble of 2 reward models", "--member=K", entry="experiments.export"),
  # -- workdirs, stages and checkpoints (a copy of the finished SFT stage in {tmp}/work) -------
  C("ckpt_all_altered", RESUME, "{tmp}/work/checkpoints", "checksum mismatch"),
  C("ckpt_all_state_empty", RESUME, "{tmp}/work/checkpoints", "state/ is empty"),
  C("ckpt_all_metadata_garbled", RESUME, "{tmp}/work/checkpoints", "_CHECKPOINT_METADATA is garbled"),
  C("ckpt_all_manifest_garbled", RESUME, "{tmp}/work/checkpoints", "checksum manifest"),
  C("workdir_tokenizer_garbled", RESUME, "{tmp}/work/tokenizer.model", "not a readable SentencePiece model"),
  C("workdir_metrics_garbled", RESUME, "{tmp}/work/metrics.jsonl:2", "not a metrics line"),
  C("workdir_in_use", RESUME, "{tmp}/work is in use by another process (host test, pid "),
  C("stage_export_garbled", [RM, "--config.policy_init={tmp}/work"], "config.policy_init", "{tmp}/work/export.json is unreadable"),
  C("stage_trained_past_export", [RM, "--config.policy_init={tmp}/work"], "config.policy_init", "trained past its export"),
  C("stage_export_deleted", [RM, "--config.policy_init={tmp}/work"], "config.policy_init", "export.json is missing"),
]
# fmt: on

# Files each case writes into {tmp} before it runs.
FILES = {
  "missing_tokenizer": {},
  "sft_not_json": {"s.jsonl": GOOD_SFT + '{"prompt": "x", "response": \n'},
  "sft_missing_field": {"s.jsonl": GOOD_SFT + '{"prompt": "x"}\n'},
  "sft_wrong_type": {"s.jsonl": GOOD_SFT + '{"prompt": "x", "response": 3}\n'},
  "sft_blank_prompt": {"s.jsonl": GOOD_SFT + '{"prompt": "  ", "response": "y"}\n'},
  "sft_not_utf8": {"s.jsonl": GOOD_SFT.encode() + b'{"prompt": "\xff\xfe", "response": "y"}\n'},
  "sft_not_object": {"s.jsonl": '["prompt", "response"]\n' + GOOD_SFT},
  "sft_empty_file": {"s.jsonl": ""},
  "sft_blank_lines_only": {"s.jsonl": "\n  \n\n"},
  "sft_all_invalid_skipped": {"s.jsonl": '{"prompt": "x"}\nnot json\n'},
  "sft_all_too_long": {"s.jsonl": GOOD_SFT * 40},
  "sft_bad_eval_file": {"s.jsonl": GOOD_SFT * 40, "e.jsonl": '{"response": "y"}\n'},
  "sft_too_few_for_batch": {"s.jsonl": GOOD_SFT * 40},
  "ppo_judge_gold_on_files": {"q.jsonl": '{"prompt": "Review of the lamp:"}\n'},
  "prompts_bad_record": {"q.jsonl": '{"prompt": "Review of the lamp:"}\n{"text": "x"}\n'},
  "prompts_chat_ends_with_assistant": {
    "q.jsonl": '{"prompt": "Review of the lamp:"}\n'
    + json.dumps(
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    + "\n"
  },
  "prompts_all_too_long": {"q.jsonl": json.dumps({"prompt": "Review of the lamp: " * 20}) + "\n"},
  "prompts_too_few": {"q.jsonl": "".join(json.dumps({"prompt": p}) + "\n" for p in ELEVEN_PROMPTS)},
  "rm_same_texts": {"p.jsonl": _pairs({"rejected": GOOD_PAIR["chosen"]})},
  "rm_negative_margin": {"p.jsonl": _pairs({"margin": -1.0})},
  "rm_tie_margin": {"p.jsonl": _pairs({"tie": True, "margin": 0.5})},
  "rm_p_chosen": {"p.jsonl": _pairs({"p_chosen": 1.5})},
  "rm_shown_order": {"p.jsonl": _pairs({"shown_order": "left"})},
  "rm_tie_not_bool": {"p.jsonl": _pairs({"tie": "no"})},
  "rm_confidence_out_of_range": {"p.jsonl": _pairs({}, {"confidence": 7.0})},
  "rm_all_too_long": {"p.jsonl": _pairs(*[{}] * 19)},
  "report_bad_record": {"p.jsonl": _pairs({"chosen": 5})},
  "report_no_raters": {"p.jsonl": _pairs().replace('"rater_id": 1, ', "") * 2},
  "hf_unsupported_model": {"config.json": json.dumps({"model_type": "gemma3", "vocab_size": 9})},
  "hf_sliding_window": {
    "config.json": json.dumps(
      HF_MISTRAL | {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096}
    )
  },
  "hf_policy_as_reward": {"config.json": json.dumps(HF_MISTRAL), "tokenizer.json": "{}"},
}


def _parquet_files():
  rows = [GOOD_PAIR, {**GOOD_PAIR, "chosen": ""}]
  return {
    "rm_parquet_row": rows,
    "rm_parquet_corrupt": [
      {**GOOD_PAIR, "prompt": f"Review of item {i}: " * 20} for i in range(2000)
    ],
    "rm_parquet_empty": [],
  }


def _write_case_files(case, folder):
  for name, content in FILES.get(case.id, {}).items():
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(os.path.join(folder, name), mode) as f:
      f.write(content)
  rows = _parquet_files().get(case.id)
  path = os.path.join(folder, "p.parquet")
  if rows is not None:
    schema = pa.schema([("prompt", pa.string())]) if not rows else None
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=500)
    if case.id == "rm_parquet_corrupt":
      with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(64))
  if case.id == "rm_parquet_garbage":
    with open(path, "wb") as f:
      f.write(b"PAR1 not parquet at all")


# ------------------------------------------------------------------------ workdir damage


def _steps(work):
  folder = os.path.join(work, "checkpoints")
  return [os.path.join(folder, n) for n in os.listdir(folder) if n.isdigit()]


def _each_step(fn):
  def damage(work):
    for step in _steps(work):
      fn(step)

  return damage


def _flip_array_bytes(step):
  files = [p for p in glob.glob(os.path.join(step, "state", "**", "*"), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 64 and "d/" in p.replace(os.sep, "/")]  # fmt: skip
  path = max(files or glob.glob(os.path.join(step, "state", "**", "*"), recursive=True),
             key=lambda p: os.path.getsize(p) if os.path.isfile(p) else -1)  # fmt: skip
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\x5a" * 8)


def _empty_state(step):
  shutil.rmtree(os.path.join(step, "state"))
  os.makedirs(os.path.join(step, "state"))


def _garble(name):
  def damage(step):
    with open(os.path.join(step, name), "w") as f:
      f.write("{garbled")

  return damage


def _garble_file(name, content="{garbled\n"):
  def damage(work):
    with open(os.path.join(work, name), "w") as f:
      f.write(content)

  return damage


def _checkpoint_past_export(work):
  step = max(_steps(work), key=lambda p: int(os.path.basename(p)))
  shutil.copytree(step, os.path.join(work, "checkpoints", str(int(os.path.basename(step)) + 10)))


_HELD: list[int] = []  # lock files this process holds while the cases run


def _hold_run_lock(work):
  """Another process (this one) is running in `work`: it holds the run's lock."""
  fd = os.open(os.path.join(work, ".run_lock"), os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(fd, f"host test, pid {os.getpid()}, since now".encode())
  _HELD.append(fd)


DAMAGE = {
  "ckpt_all_altered": _each_step(_flip_array_bytes),
  "ckpt_all_state_empty": _each_step(_empty_state),
  "ckpt_all_metadata_garbled": _each_step(_garble("_CHECKPOINT_METADATA")),
  "ckpt_all_manifest_garbled": _each_step(_garble("_CHECKSUMS.json")),
  "workdir_tokenizer_garbled": _garble_file("tokenizer.model", "not a model"),
  "workdir_metrics_garbled": lambda work: _garble_metrics(work),
  "stage_export_garbled": _garble_file("export.json"),
  "stage_trained_past_export": _checkpoint_past_export,
  "stage_export_deleted": lambda work: os.remove(os.path.join(work, "export.json")),
  "workdir_in_use": _hold_run_lock,
}


def _garble_metrics(work):
  path = os.path.join(work, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[1] = '{"step": 10, "loss": \n'
  with open(path, "w") as f:
    f.writelines(lines)


# --------------------------------------------------------------------------------- running


def _trusted(folder):
  """What a rerun would trust: exports, committed checkpoints, summaries.

  (Dataset builds are atomic and keyed by their input's content: a build that finished is
  right to reuse even when the run then failed.)
  """
  found = set()
  for root, dirs, files in os.walk(folder):
    rel = os.path.relpath(root, folder)
    for name in files:
      if name in ("export.json", "summary.json"):
        found.add(os.path.join(rel, name))
    if os.path.basename(root) == "checkpoints":
      found.update(os.path.join(rel, d) for d in dirs if d.isdigit())
  return found


@dataclasses.dataclass
class Result:
  returncode: int
  output: str
  before: set
  after: set
  folder: str


def _prepare(case, folder, names):
  """Writes the case's files and damage into `folder`: (its arguments, what is trusted now)."""
  os.makedirs(folder, exist_ok=True)
  _write_case_files(case, folder)
  damage = DAMAGE.get(case.id)
  if damage is not None:
    work = os.path.join(folder, "work")
    shutil.copytree(names["sft"], work)
    damage(work)
  args = [a.format(tmp=folder, **names) for a in case.args]
  if case.entry == "experiments.launch" and not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={folder}/run")
  return args, _trusted(folder)


def _run_cold(entry, args):
  """(exit status, stdout + stderr) of `python -m entry args`, a fresh interpreter."""
  proc = subprocess.run(
    [sys.executable, "-m", entry, *args],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  return proc.returncode, proc.stdout + proc.stderr


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  return env


def _fake_stage(folder, kind, **meta):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "export.json"), "w") as f:
    json.dump({"kind": kind, "step": 1, **meta}, f)
  return folder


# Cases run as true `python -m` subprocesses: a flag error and a damaged checkpoint.
COLD = ("unknown_key", "ckpt_all_altered")
SLOWEST = "sft_nan_loss"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every case's result, run once per test run (also under xdist): see `_run_cases`."""
  return shared.once(
    tmp_path_factory, "bad_inputs", lambda folder: _run_cases(pathlib.Path(folder))
  )


def _run_cases(root: pathlib.Path) -> dict[str, Result]:
  """Runs every case: those in COLD as subprocesses, beside the rest forked 3 at a time."""
  sft_dir = str(root / "sft")
  trained = subprocess.run(
    [sys.executable, "-m", "experiments.launch", *SFT_SMALL, f"--workdir={sft_dir}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  names = dict(
    sft=sft_dir,
    fake_policy=_fake_stage(str(root / "fake_policy"), "policy"),
    fake_reward=_fake_stage(str(root / "fake_reward"), "reward", ensemble_size=2),
  )
  folders = {case.id: str(root / case.id) for case in CASES}
  args, before = {}, {}
  for case in CASES:
    args[case.id], before[case.id] = _prepare(case, folders[case.id], names)
  # The slowest case (it trains until the loss overflows) first, so it does not run alone last.
  forked = sorted((case for case in CASES if case.id not in COLD), key=lambda c: c.id != SLOWEST)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    cold = {
      case.id: pool.submit(_run_cold, case.entry, args[case.id])
      for case in CASES
      if case.id in COLD
    }
    jobs = [cli_runner.Job(case.entry, tuple(args[case.id])) for case in forked]
    done = cli_runner.run_many(jobs, cwd=REPO, env=_env(), scratch=str(root / "runner"))
    runs = {
      case.id: (d.returncode, d.stdout + d.stderr) for case, d in zip(forked, done, strict=True)
    }
    runs.update({name: future.result() for name, future in cold.items()})
  while _HELD:
    os.close(_HELD.pop())
  return {
    name: Result(*runs[name], before[name], _trusted(folders[name]), folders[name])
    for name in folders
  }


def test_at_least_sixty_distinct_cases():
  assert len({case.id for case in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_cleanly(case, results):
  result = results[case.id]
  output = result.output
  assert result.returncode == 2, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  for fragment in case.expect:
    assert fragment.format(tmp=result.folder) in output, (fragment, output[-3000:])
  # Nothing new a rerun would trust; damaged checkpoints are kept (renamed aside).
  assert result.after <= result.before, result.after - result.before
  if case.id.startswith("ckpt_all_"):
    kept = glob.glob(os.path.join(result.folder, "work", "checkpoints", "*.damaged-*"))
    assert len(kept) == len(result.before - result.after) > 0


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(results, tmp_path):
  """Not a failure: the newest intact checkpoint is used, with a warning, and the run ends as
  the uninterrupted one did (same metrics, same final checkpoint, bit for bit)."""
  from tests.trainers import resume

  reference = os.path.join(os.path.dirname(results["unknown_key"].folder), "sft")
  work = str(tmp_path / "work")
  shutil.copytree(reference, work)
  newest = max(_steps(work), key=lambda p: int(os.path.basename(p)))
  _flip_array_bytes(newest)
  os.remove(os.path.join(work, "export.json"))  # so the rerun trains to the end again
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.launch", *SFT_SMALL, f"--workdir={work}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Checkpoint {newest} is damaged (checksum mismatch" in proc.stderr
  assert glob.glob(newest + ".damaged-*")  # kept beside the new one
  resume.assert_same_run(reference, work, total_steps=20, timing_metrics=TIMING)
  with open(os.path.join(work, "export.json")) as f:
    assert json.load(f)["step"] == 20


TIMING = ("tokens_per_s", "steps_per_s", "mfu", "step_time_s")
