"""DPO (and its IPO, hinge and conservative variants) on preference pairs, offline.

    python -m experiments.launch --config=configs/dpo.py

The module-level functions are the method: `pair_logps` (one forward pass over a
batch's chosen and rejected rows), `pair_terms` (the loss of each pair), `update` (one
optimizer step), `pair_eval`, and `PairLogps`/`attach_reference` for the reference
pass; `train` reads the pairs, computes or reuses the reference log-probs, and wires
them to the loop every trainer shares (`rlhf_jax.trainers.common`).

The policy starts from the SFT policy, which is also the frozen reference.
Pairs come, by `config.data.source`, from the reward stage's own labelled
pairs (`reward_stage`, the default: DPO and the reward model learn from the
same labels), from fresh panel-labelled SFT samples (`testbed`, as the
reward trainer makes them) or from JSONL/Parquet files (`jsonl`). Every pair
is tokenized once into SFT rows (`loader.sft_collate`: BOS + prompt +
response + EOS). With `config.prefix_sharing` (the default) the two rows of a pair
become one, BOS + prompt + chosen + rejected, in which each response attends to the
prompt and to itself only and the prompt is read once (`dpo_lib.share_prompts`; the
log-probs are the two rows' own, tested): on the peer benchmark's shape, a 32-token
prompt and two 32-token responses, that is 96 tokens a pair instead of 128. The
reference's sequence log-probs of every train and eval pair are computed once, by a
jitted batched pass of the SFT policy, and kept in `<workdir>/data/ref_logps.npz`,
keyed by the tokenized data (its layout included) and the SFT stage (a stale file is
rebuilt); a resumed run reuses it. The loader yields pair indices and its collate
attaches the stored values, so an update is one forward-backward pass of the policy on
the pairs' rows and no reference forward.

Ties: by `config.ties`, "soft" (default) gives a tie pair the preference
probability 1/2, as the reward model's loss does (sigmoid/conservative:
-(1/2) log sigmoid(beta h) - (1/2) log sigmoid(-beta h); IPO: h_mean -> 0;
hinge: no loss), so the comparison with the reward model uses the same
labels the same way; "skip" gives ties weight 0. Ties never count in
`rewards/accuracies`. Soft labels: with `config.soft_labels="confidence"` each
pair's target (the probability that the chosen response is preferred) comes from
the rater's stated confidence on `config.confidence_range`, as in the reward
model (`reward_lib.confidence_targets`; a confidence outside the range is
refused, a record without one keeps the hard label); "none" trains on hard
labels. Log-probs are the model's own (temperature 1); the
temperature only sets the evaluation's sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import (
  config_utils,
  errors,
  evaluation,
  exporters,
  hf,
  models,
  monitor,
  optim,
  rng,
  sharding,
  stages,
)
from rlhf_jax.data import chat, lengths, preferences
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import pairs as pairs_lib
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.models import lora
from rlhf_jax.rl import dpo as dpo_lib
from rlhf_jax.rl import reward as reward_lib
from rlhf_jax.trainers import common, rl_common

TIMING_METRICS = ("tokens_per_s", "steps_per_s", "mfu")

SOURCES = ("reward_stage", "testbed", "jsonl")
TIE_MODES = ("soft", "skip")
REF_LOGPS_FILE = "ref_logps.npz"
ROW_FIELDS = ("tokens", "mask", "loss_mask")  # of each side of a pair: SFT-layout rows
LABEL_ONLY = ("target",)  # table fields the reference log-probs do not depend on


# ------------------------------------------------------------------- data


def _check_losses(config, prefix: str) -> None:
  if config.label_smoothing and config.loss_type != "conservative":
    raise cs.ConfigError(
      f"{prefix}.label_smoothing={config.label_smoothing!r} is used by "
      f"{prefix}.loss_type='conservative' only (got {config.loss_type!r})."
    )
  if config.soft_labels != "none" and config.loss_type == "hinge":
    raise cs.ConfigError(
      f"{prefix}.soft_labels={config.soft_labels!r} needs a probabilistic loss: "
      f"{prefix}.loss_type='hinge' has no preference probability to match "
      "(set config.soft_labels='none' with it)."
    )


# One declared check per field of configs/dpo.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    **rl_common.SAMPLING_FIELDS,
    "data": cs.Spec(
      {
        "source": cs.Choice(*SOURCES),
        "num_train": cs.Int(min=1),
        "num_eval": cs.Int(min=0),
        "sample_batch": cs.Int(min=1),
        "responses_per_prompt": cs.Int(min=2),
        "seed": cs.Int(min=0),
        "testbed": prompts_lib.TestbedSection(("testbed", "reward_stage")),
        **pairs_lib.PAIR_FILE_FIELDS,
      },
      checks=(pairs_lib.check_pair_data,),
    ),
    "max_len": cs.Int(min=3),
    "prefix_sharing": cs.Bool(),
    "loss_type": cs.Choice(*dpo_lib.LOSS_TYPES),
    "beta": cs.Float(gt=0),
    "label_smoothing": cs.Float(min=0, max=0.5),
    "ties": cs.Choice(*TIE_MODES),
    "soft_labels": cs.Choice(*pairs_lib.SOFT_LABELS),
    "confidence_range": cs.Seq(cs.Float(), length=2),
    "batch_size": cs.Int(min=1),
    "optim": optim.CONFIG_SPEC,
    "monitor": monitor.CONFIG_SPEC,
    "lora": lora.CONFIG_SPEC,
    # The generation eval's prompts: prompt files, or (by default) the testbed's
    # held-out prompts for testbed pairs and the eval pairs' prompts for files.
    "eval": rl_common.EVAL_SPEC.extend({"prompts": cs.Str()}),
  },
  checks=(
    _check_losses,
    lambda c, prefix: evaluation.check_judge(c, prefix, testbed_prompts=testbed_eval(c)),
    pairs_lib.check_confidence_range_field,
    optim.check_steps("optim", lambda c: c.total_steps),
    cs.mesh_batch("batch_size", "data.sample_batch"),
  ),
)


def testbed_eval(config) -> bool:
  """Whether the generation eval samples the testbed's held-out prompts (see eval_prompts)."""
  if config.eval.prompts or config.data.source == "jsonl":
    return False
  if config.data.source == "testbed":
    return True
  if config.reward_init:  # source "reward_stage": testbed pairs iff the stage made them
    try:
      return config_utils.read_config_json(config.reward_init).data.source == "testbed"
    except (OSError, ValueError, AttributeError):
      return False
  return config.reward.data.source == "testbed"


def eval_prompts(config, eval_source, train_source, tokenizer=None) -> list[str]:
  """The generation eval's prompts: `config.eval.prompts` files, the testbed's held-out
  prompts (testbed pairs), or the distinct prompts of the eval pairs (of the training
  pairs when there are none), `config.eval.num_prompts` at most. Chat prompts are
  rendered in `tokenizer`'s chat format."""
  n = config.eval.num_prompts
  if config.eval.prompts:
    render = chat.format_for(tokenizer).render_prompt
    found, _ = prompts_lib.read_files(prompts_lib.split_paths(config.eval.prompts), render=render)
    return [p.text for p in found][:n]
  if testbed_eval(config):
    from rlhf_jax.data import testbed

    return testbed.prompts(
      "eval", n, rng.seed(config.data.seed, "eval_prompts"), config.data.testbed
    )
  source = eval_source if eval_source is not None else train_source
  distinct = dict.fromkeys(record["prompt"] for _, record in preferences.iter_records(source))
  return list(distinct)[:n]


def check_config(config) -> None:
  """Raises ConfigError naming the config field for values DPO cannot run with."""
  CONFIG_SPEC.validate(config)


def pair_paths(config, reward_dir: str | None) -> dict[str, list[str]]:
  """Preference files by split for `config.data.source` "reward_stage" or "jsonl".

  "reward_stage": the files the reward stage learned from: its panel-labelled testbed pairs
  (`<reward_dir>/data/pairs_{train,eval}.jsonl`), or the preference files its config names.
  """
  data = config.data
  if data.source == "jsonl":
    return pairs_lib.file_paths(data.train_files, data.eval_files)
  pair_dir = os.path.join(reward_dir, "data")
  train_file = os.path.join(pair_dir, "pairs_train.jsonl")
  if os.path.exists(train_file):
    eval_file = os.path.join(pair_dir, "pairs_eval.jsonl")
    return pairs_lib.file_paths([train_file], [eval_file] if os.path.exists(eval_file) else [])
  try:
    reward_data = config_utils.read_config_json(reward_dir).data
  except (OSError, ValueError, AttributeError):
    reward_data = None
  if reward_data is None or reward_data.get("source") != "jsonl":
    raise errors.StageError(
      f"config.data.source='reward_stage' but the reward stage {reward_dir!r} "
      f"(config.reward_init) holds neither {train_file} nor a config naming its "
      "preference files.",
      hint="Set config.data.source='testbed' or 'jsonl'.",
    )
  return pairs_lib.file_paths(reward_data.train_files, reward_data.eval_files)


def prepare_pairs(config, workdir, reward_dir, sft, mesh, rules):
  """Train/eval preference sources and their info (`config.data.source`)."""
  data = config.data
  info = {}
  if data.source == "testbed":
    generate = sft.generator(  # testbed pairs are sampled the way the evaluation samples
      max_new_tokens=config.max_new_tokens,
      temperature=config.temperature,
      prompt_len=config.prompt_len,
      batch_size=data.sample_batch,
      mesh=mesh,
      rules=rules,
    )
    paths, info["noise_ceiling"] = pairs_lib.testbed_pairs(
      data, os.path.join(workdir, "data"), generate
    )
  else:
    paths = pair_paths(config, reward_dir)
  data_dir = data.data_dir or os.path.join(workdir, "data", "tfds")
  train, evals, info = pairs_lib.build(
    paths, data_dir, data.skip_invalid, info, tokenizer=sft.tokenizer
  )
  info["source"] = data.source
  return train, evals, info


def tokenize_pairs(
  source,
  tokenizer,
  max_len: int,
  *,
  soft_labels="none",
  confidence_range=(1.0, 5.0),
  what="record",
) -> dict[str, np.ndarray]:
  """Every pair of `source` as SFT rows: the table the loader and the reference pass index.

  Returns arrays with a leading pair axis [N]: {chosen,rejected}_{tokens,mask,loss_mask}
  [N, T], tie [N] bool, valid [N] bool (False where a row did not fit in max_len),
  target [N] float32 (the probability that chosen is preferred: 1, or with
  soft_labels="confidence" the record's confidence mapped onto [1/2, 1]; a confidence
  outside `confidence_range` is an error naming `what` and the record's index).
  """
  examples = [source[i] for i in range(len(source))]
  table = {}
  for side in ("chosen", "rejected"):
    rows = [{"prompt": e["prompt"], "response": e[side]} for e in examples]
    out = loader_lib.sft_collate(rows, tokenizer, max_len)
    table[f"{side}_tokens"] = out["tokens"]
    table[f"{side}_mask"] = out["input_mask"]
    table[f"{side}_loss_mask"] = out["loss_mask"]
    table[f"{side}_dropped"] = out["dropped"]
  table["tie"] = np.asarray([bool(e["tie"]) for e in examples], np.bool_)
  confidence = [pairs_lib.record_float(e.get("confidence")) for e in examples]
  if soft_labels == "confidence":
    pairs_lib.check_confidence(confidence, confidence_range, where=pairs_lib.where_of(source, what))
  table["target"] = pairs_lib.label_targets(confidence, soft_labels, confidence_range)
  table["valid"] = ~(table.pop("chosen_dropped") | table.pop("rejected_dropped"))
  return table


def ref_logps_key(tables: dict[str, dict[str, np.ndarray]], sft_dir: str) -> str:
  """sha256 of the tokenized pairs and the SFT stage (its path and export.json, or for a
  Hugging Face model its config and weight files, `hf.fingerprint`)."""
  digest = hashlib.sha256()
  for split in sorted(tables):
    for name in sorted(set(tables[split]) - set(LABEL_ONLY)):
      digest.update(f"{split}/{name}".encode())
      digest.update(np.ascontiguousarray(tables[split][name]).tobytes())
  if hf.is_hf(sft_dir):
    digest.update(hf.fingerprint(sft_dir))
    return digest.hexdigest()
  digest.update(os.path.abspath(sft_dir).encode())
  with open(os.path.join(sft_dir, stages.EXPORT_META), "rb") as f:
    digest.update(f.read())
  return digest.hexdigest()


def load_ref_logps(path: str, key: str) -> dict[str, np.ndarray] | None:
  """The stored reference log-probs if `path` holds them for `key`, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as stored:
      if str(stored["key"]) != key:
        logging.info("%s is stale (other data or SFT stage): recomputing.", path)
        return None
      return {k: stored[k] for k in stored.files if k != "key"}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
    # A cache: a damaged file is computed again (and replaced), never trusted.
    logging.warning("%s is unreadable (%s): recomputing.", path, error)
    return None


def save_ref_logps(path: str, key: str, values: dict[str, np.ndarray]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, key=np.asarray(key), **values)
  os.replace(tmp, path)


# ---------------------------------------------------- reference log-probs


class PairLogps:
  """`pair_logps` of a model over every pair of a table, jitted once, in fixed batches of
  `batch_size` pairs (the last batch padded with the first pairs, then cut)."""

  def __init__(self, module, param_sh, batch_size: int, mesh, rules):
    self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
    self.fn = jax.jit(
      functools.partial(pair_logps, module=module),
      in_shardings=(param_sh, sharding.batch_sharding(mesh, 2)),  # every row field: [B, T]
    )

  def __call__(self, params, table) -> dict[str, np.ndarray]:
    n, b = len(table["tie"]), self.batch_size
    outs = []
    for start in range(0, n, b):
      idx = np.arange(start, start + b) % n  # padding rows repeat the first pairs
      with sharding.use_mesh(self.mesh, self.rules):
        rows = {k: sharding.global_from_full(table[k][idx], self.mesh) for k in row_keys(table)}
        out = self.fn(params, rows)
      outs.append({k: sharding.fetch(v)[: min(b, n - start)] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def attach_reference(tables, path: str, sft_dir: str, ref_logps) -> dict[str, Any]:
  """Adds the reference's sequence log-probs (ref_chosen, ref_rejected) to every table.

  They are read from `path` when it holds them for these tables and this SFT stage
  (`ref_logps_key`), else computed with `ref_logps(table)` and stored there (by process
  0). Returns what data_info.json records about them.
  """
  key = ref_logps_key(tables, sft_dir)
  ref = load_ref_logps(path, key)
  info = {"path": path, "key": key, "reused": ref is not None}
  if ref is None:
    start = time.perf_counter()
    ref = {}
    for split, table in tables.items():
      logps = ref_logps(table)
      ref[f"{split}_chosen"], ref[f"{split}_rejected"] = logps["chosen"], logps["rejected"]
    if jax.process_index() == 0:
      save_ref_logps(path, key, ref)
    logging.info("Reference log-probs computed in %.1fs", time.perf_counter() - start)
  else:
    logging.info("Reusing the reference log-probs in %s", path)
  for split, table in tables.items():
    table["ref_chosen"] = ref[f"{split}_chosen"].astype(np.float32)
    table["ref_rejected"] = ref[f"{split}_rejected"].astype(np.float32)
  return info


# ------------------------------------------------------ loss and update step

ROW_KEYS = tuple(f"{side}_{name}" for side in ("chosen", "rejected") for name in ROW_FIELDS)
SHARED_KEYS = tuple(f"shared_{name}" for name in dpo_lib.SHARED_FIELDS)


def row_keys(table) -> tuple[str, ...]:
  """The fields of a pair table (or batch) that hold its rows: shared-prompt or two-row."""
  return SHARED_KEYS if SHARED_KEYS[0] in table else ROW_KEYS


def share_prompts(
  table, widths: tuple[int, int], pad_id: int, layout=None
) -> dict[str, np.ndarray]:
  """A pair table (`tokenize_pairs`) with its two rows per pair replaced by one
  shared-prompt row of `widths` = (length, target slots) (`dpo_lib.share_prompts`)."""
  rest = {k: v for k, v in table.items() if k not in ROW_KEYS}
  return {**rest, **dpo_lib.share_prompts(table, widths, pad_id, layout)}


def shares_exactly(model_config, row_len: int) -> bool:
  """Whether shared-prompt rows of `row_len` give the two rows' log-probs under this model:
  a sliding window counts row slots, and in a shared row the rejected response sits
  further from its prompt than in its own row, so a window shorter than the row would cut
  what it sees (two rows a pair are used then, logged)."""
  window = model_config.sliding_window
  if window and window < row_len:
    logging.info(
      "prefix_sharing: the model's sliding window (%d) is shorter than the shared rows (%d); "
      "two rows a pair instead.",
      window,
      row_len,
    )
    return False
  return True


def row_tokens(batch) -> float:
  """The real tokens of a batch's rows: what a forward pass reads."""
  return float(sum(batch[k].sum() for k in row_keys(batch) if k.endswith("_mask")))


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the jitted loss reads from the config."""

  beta: float
  loss_type: str
  label_smoothing: float
  soft_ties: bool  # config.ties == "soft": a tie is a 1/2 preference, else weight 0
  seed: int = 0  # of LoRA dropout's masks (the only randomness of an update)

  @staticmethod
  def from_config(config) -> Settings:
    return Settings(
      config.beta, config.loss_type, config.label_smoothing, config.ties == "soft", config.seed
    )


def pair_logps(params, batch, *, module, rngs=None):
  """Sequence log-prob sums and token counts [B] of chosen and rejected responses, one
  pass over the batch's shared-prompt rows or its chosen and rejected rows (`rngs`:
  {"dropout": key} in training, for LoRA dropout)."""
  if SHARED_KEYS[0] in batch:
    logits, *_ = module.apply(
      {"params": params},
      batch["shared_tokens"],
      batch["shared_positions"],
      dpo_lib.shared_attention_mask(batch["shared_segment"]),
      logits_at=batch["shared_source"],  # the LM head on the targets' positions only
      rngs=rngs,
    )
    return dpo_lib.shared_response_logps(logits, batch["shared_targets"], batch["shared_side"])
  cat = lambda name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
  tokens, mask = cat("tokens"), cat("mask")
  logits, *_ = module.apply(
    {"params": params},
    tokens,
    models.positions_from_mask(mask),
    models.causal_attention_mask(mask),
    rngs=rngs,
  )
  sums, counts = dpo_lib.response_logps(logits, tokens, cat("loss_mask"))
  b = batch["chosen_tokens"].shape[0]
  return dict(chosen=sums[:b], rejected=sums[b:], chosen_len=counts[:b], rejected_len=counts[b:])


def pair_terms(logps, batch, *, s: Settings):
  """Per-pair loss [B] and metrics, loss weights [B] and accuracy weights [B] (strict pairs)."""
  loss, pair_metrics = dpo_lib.dpo_loss(
    logps["chosen"],
    logps["rejected"],
    batch["ref_chosen"],
    batch["ref_rejected"],
    beta=s.beta,
    loss_type=s.loss_type,
    label_smoothing=s.label_smoothing,
    chosen_lengths=logps["chosen_len"],
    rejected_lengths=logps["rejected_len"],
    tie=batch["tie"] if s.soft_ties else None,
    target=None if s.loss_type == "hinge" else batch["target"],
  )
  valid = jnp.asarray(batch["valid"], jnp.float32)
  strict = valid * (1.0 - jnp.asarray(batch["tie"], jnp.float32))
  return loss, pair_metrics, valid if s.soft_ties else strict, strict


def weighted_mean(x, weight):
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def init_state(params, *, tx) -> dict[str, Any]:
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def update(state, batch, *, module, tx, schedule, s: Settings):
  """One optimizer step on a batch of pairs (rows and stored reference log-probs)."""

  rngs = None
  if module.config.lora_rank and module.config.lora_dropout:
    rngs = {"dropout": jax.random.fold_in(rng.key(s.seed, "lora_dropout"), state["step"])}

  trainable = lora.trainable(module.config)  # LoRA: gradients of the adapters only

  def loss_fn(params):
    params = lora.stop_frozen(params, trainable)
    logps = pair_logps(params, batch, module=module, rngs=rngs)
    loss, pair_metrics, weight, strict = pair_terms(logps, batch, s=s)
    return weighted_mean(loss, weight), (pair_metrics, weight, strict)

  (loss, (pair_metrics, weight, strict)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state["params"]
  )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  step_metrics = {
    "loss": loss,
    **{k: weighted_mean(v, weight) for k, v in pair_metrics.items()},
    # A tie has no right answer: accuracy is over strict preferences only.
    "rewards/accuracies": weighted_mean(pair_metrics["rewards/accuracies"], strict),
    "lr": schedule(state["step"]),
    "grad_norm": optim.l2_norm(grads),
    "param_norm": optim.l2_norm(params),
    "update_norm": optim.l2_norm(updates),
  }
  return dict(params=params, opt_state=opt_state, step=state["step"] + 1), step_metrics


def pair_eval(params, table, logps: PairLogps, terms_fn) -> dict[str, float]:
  """The held-out pairs' DPO loss and implicit-reward accuracy and margin (`table`: the
  eval split's table with its reference log-probs; `terms_fn`: jitted `pair_terms`)."""
  labels = {k: table[k] for k in ("ref_chosen", "ref_rejected", "tie", "valid", "target")}
  loss, pair_metrics, weight, strict = jax.device_get(terms_fn(logps(params, table), labels))
  strict = strict > 0
  out = {"eval/pref_loss": float(np.sum(loss * weight) / max(weight.sum(), 1))}
  if strict.any():
    # As the reward model's eval/accuracy: an exact tie of implicit rewards counts half.
    margins = pair_metrics["rewards/margins"][strict]
    out["eval/pref_accuracy"] = reward_lib.preference_accuracy(margins)
    out["eval/pref_margin"] = float(margins.mean())
  return out


# ------------------------------------------------------------------------ train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs DPO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  # Config errors surface before any stage trains.
  check_config(config)
  tx, schedule = optim.make_optimizer(
    config.optim, config.total_steps, trainable=lora.trainable(config.lora.rank)
  )
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = common.mesh_from_config(config), config.sharding_rules
  batch_size = config.batch_size

  # ----------------------------------------- upstream stages, pairs, reference
  sft_dir = config_utils.require_stage(config, "policy_init")
  reward_dir = config_utils.require_stage(config, "reward_init")
  clock_start = time.perf_counter()
  sft = stages.load_policy(sft_dir, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules)
  tok = sft.tokenizer
  # The policy trained: the SFT policy, or it with fresh LoRA adapters (B = 0: it computes
  # what the SFT policy computes, so it serves as the reference too, without a copy).
  policy = sft
  if config.lora.rank:
    module, params, shardings = common.add_lora(
      sft.module, sft.params, config.lora, rng.key(config.seed, "lora"), mesh, rules
    )
    policy = stages.Policy(module, params, shardings, tok, sft.meta)
  if jax.process_index() == 0:
    tok.save(os.path.join(workdir, tok.filename))
  train_source, eval_source, data_info = prepare_pairs(
    config, workdir, reward_dir, sft, mesh, rules
  )
  # Pairs with a row too long for max_len are counted per file and left out (as in the
  # reward model); none left is an error naming the files.
  sources, data_info["lengths"] = lengths.keep_fitting(
    {"train": train_source, "eval": eval_source},
    lengths.pair_fit(tok, config.max_len),
    what="pairs",
    max_len=config.max_len,
  )
  labels = dict(soft_labels=config.soft_labels, confidence_range=tuple(config.confidence_range))
  tables = {
    split: tokenize_pairs(source, tok, config.max_len, what=f"{split} record", **labels)
    for split, source in sources.items()
    if source is not None
  }
  for split, table in tables.items():
    data_info[f"num_{split}_ties"] = int(table["tie"].sum())
    data_info[f"mean_{split}_target"] = float(table["target"].mean())
    data_info[f"num_{split}_too_long"] = int((~table["valid"]).sum())
  row_len = 2 * config.max_len  # tokens a pair's rows hold
  layouts, widths = [], (0, 0)
  if config.prefix_sharing:  # each pair's shared row, made once
    layouts, widths = dpo_lib.shared_layouts(tables.values())
  shared = config.prefix_sharing and shares_exactly(policy.module.config, widths[0])
  if shared:
    row_len = widths[0]
    tables = {
      split: share_prompts(table, widths, tok.pad_id, layout)
      for (split, table), layout in zip(tables.items(), layouts, strict=True)
    }
    data_info["shared_row_length"], data_info["shared_target_slots"] = widths
  data_info["prefix_sharing"] = shared
  common.check_batch_fits(len(tables["train"]["tie"]), batch_size, "training pairs")
  # One compiled forward pass serves the reference pass and the held-out pair eval.
  logps = PairLogps(policy.module, policy.shardings, batch_size, mesh, rules)
  ref_path = os.path.join(workdir, "data", REF_LOGPS_FILE)
  data_info["ref_logps"] = attach_reference(
    tables, ref_path, sft_dir, lambda table: logps(policy.params, table)
  )
  if jax.process_index() == 0:
    common.write_json_atomic(os.path.join(workdir, "data_info.json"), data_info)
  logging.info("Preference data: %s", data_info)
  # The loader walks pair indices; its collate gathers the rows and stored reference values.
  train_table = tables["train"]
  train_loader = loader_lib.Loader(
    range(len(train_table["tie"])),
    global_batch_size=batch_size,
    seed=config.seed,
    collate=lambda indices: {k: v[np.asarray(indices)] for k, v in train_table.items()},
  )

  with common.open_run(config, workdir, mesh, train_loader, clock_start=clock_start) as run:
    # ------------------------------------------------- state, jitted programs
    s = Settings.from_config(config)
    init = functools.partial(init_state, tx=tx)
    abstract = jax.eval_shape(init, policy.params)
    rep = common.replicated(mesh)
    opt_sh = common.mirror_shardings(
      abstract["opt_state"], abstract["params"], policy.shardings, mesh
    )
    state_sh = dict(params=policy.shardings, opt_state=opt_sh, step=rep)
    table_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in train_table.items()}
    update_fn = jax.jit(
      functools.partial(update, module=policy.module, tx=tx, schedule=schedule, s=s),
      in_shardings=(state_sh, table_sh),
      out_shardings=(state_sh, rep),
      donate_argnums=(0,),
    )
    state, clock = common.restore_or_init(
      run,
      common.with_shardings(abstract, state_sh),
      lambda: jax.jit(init, out_shardings=state_sh)(policy.params),
    )

    # ----------------------------------------------------------- eval, loop
    terms_fn = jax.jit(functools.partial(pair_terms, s=s))
    generation_eval = rl_common.make_evaluator(
      config, workdir, eval_prompts(config, sources["eval"], sources["train"], tok),
      sft=policy, rm=rm,
      sample_fn=rl_common.sampler(policy, config, mesh, rules),
      logps_fn=rl_common.response_logps_fn(
        policy.module, config.prompt_len, config.max_new_tokens, config.temperature
      ),
      mesh=mesh, rules=rules, testbed_prompts=testbed_eval(config),
      start_step=run.start_step, exporter=run.writer.exporter, model_config=policy.module.config,
    )  # fmt: skip

    def evaluate(params, step) -> dict[str, float]:
      pairs = pair_eval(params, tables["eval"], logps, terms_fn) if "eval" in tables else {}
      return {**pairs, **generation_eval(params, step)}

    cfg_model = policy.module.config
    loop = common.bookkeeping(
      run,
      # A pair's rows (one shared-prompt row, or chosen and rejected), forward and backward.
      flops_per_step=batch_size * row_len
      * cfg_model.train_flops_per_token(row_len if shared else config.max_len),
      dtype=cfg_model.dtype,
      metric_keys=("loss", "rewards/accuracies", "eval/gold_reward"),
    )  # fmt: skip
    common.evaluate_start(run, lambda: evaluate(state["params"], 0))
    step = run.start_step
    while step < config.total_steps and rl_common.stopped_by_alert(generation_eval) is None:
      local = next(train_loader)
      with sharding.use_mesh(mesh, rules):
        state, step_metrics = update_fn(state, sharding.host_to_global(local, mesh))
      step += 1
      preempted = run.ckpt.preemption_requested(step)
      tokens = row_tokens(local)
      loop.after_update(
        step,
        step_metrics,
        tokens * jax.process_count(),
        lambda: evaluate(state["params"], step),
        preempted=preempted,
      )
      if rl_common.stopped_by_alert(generation_eval) == step:
        loop.should_save = True  # the stage ends here: its last checkpoint and export
      common.save_if_due(run, loop, step, state, clock)
      if preempted:
        logging.warning("SIGTERM: saved step %d and stopping; rerun to resume.", step)
        break
  return rl_common.finish(
    run,
    loop,
    step,
    params=lambda: state["params"],
    evaluate=evaluate,
    method="dpo",
    clock=clock,
    evaluator=generation_eval.judge.name,
    model_config=cfg_model,
    tokenizer_file=tok.filename,
    summary={"beta": config.beta, "loss_type": config.loss_type},
    export={"data_content_hash": data_info["content_hash"]},
    watch=generation_eval.watch,
  )
