"""Bradley-Terry reward model (an ensemble) on preference pairs.

    python -m experiments.launch --config=configs/reward.py

The module-level functions are the method: `init_state` (the ensemble on the SFT
trunk), `pair_scores`, `update` (one bootstrap-weighted step of every member),
`Evaluator` (held-out pairs, correlation with gold) and `prepare_pairs`; `train` wires
them to the loop every trainer shares (`rlhf_jax.trainers.common`), then normalises the
scores and exports the stage.

On the testbed, as in real RLHF, the pairs are samples of the SFT policy for
one prompt, labelled by the simulated rater panel (anchors shown to every
rater): K samples per prompt and all K(K-1)/2 pairs of them
(`data.responses_per_prompt`). Training batches are comparison groups, as in
InstructGPT: each distinct response of a group is scored once and every
comparison among them is taken from those scores, so a step does K-1 times the
comparisons of plain pairs for the same forward passes. Labels are hard (the
chosen response wins) or, with `soft_labels="confidence"`, soft targets from
the rater's stated confidence. The reward trunk starts from the SFT policy's
trunk (optionally grown by `extra_layers` identity-initialised blocks); each
ensemble member gets its own head initialisation and online-bootstrap weights
(Poisson(1) per comparison and member), so members disagree where data is
thin. After training, scores of SFT-policy samples are normalised to mean 0,
std 1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
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
  exporters,
  hf,
  models,
  optim,
  rng,
  sharding,
  stages,
)
from rlhf_jax.data import lengths, preferences
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import pairs as pairs_lib
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.models import lora
from rlhf_jax.rl import reward as reward_lib
from rlhf_jax.trainers import common

TIMING_METRICS = ("tokens_per_s", "steps_per_s", "mfu")

DATA_SOURCES = ("testbed", "jsonl")
# Under LoRA the reward heads train beside the adapters (`lora.trainable`).
HEADS = "head/.*"


# Sampling responses from the SFT policy for pairs (testbed) and for normalisation.
SAMPLING_FIELDS = {
  "temperature": cs.Float(gt=0),
  "max_new_tokens": cs.Int(min=1),
  "prompt_len": cs.Int(min=1),
  "sample_batch": cs.Int(min=1),
}


class RewardStart(cs.Check):
  """`reward_init`: "", `hf:DIR` (a Hugging Face causal LM or one-label classifier), or a
  finished reward stage's workdir (every member continues from its own trunk and head)."""

  def problem(self, value):
    if isinstance(value, str) and value and not value.startswith("hf:"):
      return cs.FinishedStage("reward").problem(value)
    return cs.HfModel().problem(value)


def check_continued(config, prefix: str) -> None:
  """A finished reward stage as `reward_init` keeps its members and its depth."""
  start = config.reward_init
  if not start or start.startswith("hf:"):
    return
  meta = stages.read_meta(start)
  key = f"{prefix}.reward_init={start!r}"
  if meta.get("ensemble_size") != config.ensemble_size:
    raise cs.ConfigError(
      f"{key} has {meta.get('ensemble_size')} members but {prefix}.ensemble_size="
      f"{config.ensemble_size}; a continued reward model keeps its members."
    )
  if config.extra_layers:
    raise cs.ConfigError(
      f"{prefix}.extra_layers={config.extra_layers} with {key}: a continued reward model "
      "keeps its depth; use 0."
    )


# One declared check per field of configs/reward.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    "batch_size": cs.Int(min=1),
    "max_len": cs.Int(min=3),
    "policy_init": cs.FinishedStage("policy"),
    "sft": cs.Stage(unless="policy_init"),
    "reward_init": RewardStart(),
    "data": cs.Spec(
      {
        "source": cs.Choice(*DATA_SOURCES),
        "num_train": cs.Int(min=1),
        "num_eval": cs.Int(min=0),
        "responses_per_prompt": cs.Int(min=2),
        "seed": cs.Int(min=0),
        "testbed": prompts_lib.TestbedSection(),
        **SAMPLING_FIELDS,
        **pairs_lib.PAIR_FILE_FIELDS,
      },
      checks=(pairs_lib.check_pair_data,),
    ),
    "extra_layers": cs.Int(min=0),
    "ensemble_size": cs.Int(min=1),
    "use_margin": cs.Bool(),
    "soft_labels": cs.Choice(*pairs_lib.SOFT_LABELS),
    "confidence_range": cs.Seq(cs.Float(), length=2),
    "center_coef": cs.Float(min=0),
    "optim": optim.CONFIG_SPEC,
    "lora": lora.CONFIG_SPEC,
    "normalize_samples": cs.Int(min=2),
    "eval": cs.Spec({"num_gold_samples": cs.Int(min=0)}),
  },
  checks=(
    check_continued,
    pairs_lib.check_confidence_range_field,
    optim.check_steps("optim", lambda c: c.total_steps),
    cs.mesh_batch("batch_size", "data.sample_batch"),
  ),
)


# ------------------------------------------------------ state and update step


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the jitted update reads from the config besides the networks."""

  members: int  # config.ensemble_size
  use_margin: bool
  center_coef: float

  @staticmethod
  def from_config(config) -> Settings:
    return Settings(config.ensemble_size, config.use_margin, config.center_coef)


def init_state(
  key, trunk, head=None, *, module, tx, members: int, base_layers: int, stacked: bool = False
) -> dict[str, Any]:
  """A fresh state: `members` reward models stacked on a leading axis, each with the
  trunk `trunk` (the SFT policy's, or `reward_init`'s; of `base_layers` layers, grown to
  the module's depth by identity-initialised blocks) and its own fresh head, or `head`
  (a classifier's) when given; their optimizer states; step; RNG. With `stacked`, `trunk`
  and `head` carry the member axis already (a finished reward stage continued): member i
  starts from trunk[i] and head[i]."""
  cfg = module.config

  def init_member(member_key, trunk, head):
    params = sharding.unbox(models.init_params(module, member_key))
    fresh = lora.base(params["trunk"])
    grown = models.grow_trunk(fresh, trunk, base_layers, cfg.scan_layers)
    grown = lora.attach(grown, lora.adapters(params["trunk"]))  # fresh adapters, if any
    if head is not None:
      params["head"] = jax.tree.map(lambda h, x: h.astype(x.dtype), head, params["head"])
    return {**params, "trunk": grown}

  init_rng, key = jax.random.split(key)
  axes = (0, 0, 0) if stacked else (0, None, None)
  params = jax.vmap(init_member, in_axes=axes)(jax.random.split(init_rng, members), trunk, head)
  return dict(
    params=params, opt_state=jax.vmap(tx.init)(params), step=jnp.zeros((), jnp.int32), rng=key
  )


def state_shardings(abstract: dict[str, Any], module, mesh, rules) -> dict[str, Any]:
  """Stacked parameters sharded as one member's logical axes (the ensemble axis
  replicated), optimizer moments as their parameters, scalars replicated."""
  boxed = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  stacked_specs = jax.tree.map(
    lambda s: jax.P(None, *s), sharding.logical_specs(boxed), is_leaf=lambda x: isinstance(x, jax.P)
  )
  param_sh = sharding.tree_shardings(abstract["params"], stacked_specs, mesh, rules)
  opt_sh = common.mirror_shardings(abstract["opt_state"], abstract["params"], param_sh, mesh)
  rep = common.replicated(mesh)
  return dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep)


def batch_shardings(mesh) -> dict[str, Any]:
  """A batch of comparison groups (`pairs_lib.group_collate`): rows [G, R, T], indices and
  labels [G, P]."""
  batch_sh, rows_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 3)
  return dict(
    tokens=rows_sh,
    mask=rows_sh,
    chosen=batch_sh,
    rejected=batch_sh,
    **dict.fromkeys(pairs_lib.LABEL_FIELDS, batch_sh),
  )


def pair_scores(params, batch, *, module, dropout_key=None):
  """Scores of each comparison's chosen and rejected rows: [E, G * P] each."""
  g, r, t = batch["tokens"].shape
  scores = stages.ensemble_scores(
    module,
    params,
    batch["tokens"].reshape(g * r, t),
    batch["mask"].reshape(g * r, t),
    dropout_key,
  ).reshape(-1, g, r)  # every distinct response once: [E, G, R]
  read = lambda rows: jnp.take_along_axis(scores, rows[None], axis=2).reshape(-1, rows.size)
  return read(batch["chosen"]), read(batch["rejected"])


def update(state, batch, *, module, tx, schedule, s: Settings):
  """One step of every member on its own bootstrap weights of the batch's comparisons.

  Each member draws Poisson(1) weights per comparison (one member: all 1), so members
  see different resamples of the data; their summed loss gives each its own gradient.
  """
  rng, boot_rng = jax.random.split(state["rng"])
  labels = {k: batch[k].reshape(-1) for k in pairs_lib.LABEL_FIELDS}  # per comparison: [G * P]
  b = labels["margin"].shape[0]
  valid = labels["valid"].astype(jnp.float32)
  if s.members > 1:
    weights = jax.random.poisson(boot_rng, 1.0, (s.members, b)).astype(jnp.float32) * valid
  else:
    weights = jnp.broadcast_to(valid, (1, b))

  # LoRA dropout (the only dropout) draws from a key of its own; unused without adapters, so
  # the bootstrap weights are what they were.
  lora_dropout = module.config.lora_rank and module.config.lora_dropout
  dropout_key = jax.random.fold_in(state["rng"], 1) if lora_dropout else None

  trainable = lora.trainable(module.config, HEADS)  # LoRA: adapters and heads only

  def loss_fn(params):
    params = lora.stop_frozen(params, trainable)
    chosen, rejected = pair_scores(params, batch, module=module, dropout_key=dropout_key)
    member_loss = jax.vmap(
      lambda c, r, w: reward_lib.bradley_terry_loss(
        c,
        r,
        margin=labels["margin"] if s.use_margin else None,
        tie=labels["tie"],
        target=labels["target"],
        weight=w,
        center_coef=s.center_coef,
      )[0]
    )(chosen, rejected, weights)
    # Sum over members: each member's gradient is its own loss's gradient.
    return jnp.sum(member_loss), (member_loss, chosen, rejected)

  (_, (member_loss, chosen, rejected)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state["params"]
  )
  updates, opt_state = jax.vmap(tx.update)(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  diff = jnp.mean(chosen - rejected, axis=0)
  strict = (~labels["tie"]).astype(jnp.float32) * valid
  step_metrics = dict(
    loss=jnp.mean(member_loss),
    accuracy=jnp.sum((diff > 0) * strict) / jnp.maximum(jnp.sum(strict), 1.0),
    margin=jnp.sum(diff * strict) / jnp.maximum(jnp.sum(strict), 1.0),
    score_mean=jnp.sum((chosen + rejected) * valid)
    / jnp.maximum(2 * s.members * jnp.sum(valid), 1.0),
    lr=schedule(state["step"]),
    grad_norm=optim.l2_norm(grads),
    param_norm=optim.l2_norm(params),
    update_norm=optim.l2_norm(updates),
  )
  new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
  return new_state, step_metrics


# ------------------------------------------------------------------- evaluation


class Evaluator:
  """`evaluator(params)`: held-out pair metrics and, on the testbed, agreement with gold.

  On the eval pairs (plain pairs): loss, accuracy (ties excluded, an exact tie of
  scores counts half), margin, calibration error, the members' spread, and the gap to
  the labels' noise ceiling when it is known. On the testbed, the Pearson and Spearman
  correlation of the ensemble's score with the gold reward on SFT samples for held-out
  prompts (sampled once, with `generate`). `score_texts` also serves the normalisation.
  """

  def __init__(self, config, module, tok, eval_source, generate, state_sh, mesh, noise_ceiling):
    self.config, self.tok, self.mesh, self.rules = config, tok, mesh, config.sharding_rules
    self.eval_source, self.generate, self.noise_ceiling = eval_source, generate, noise_ceiling
    self.local_rows = config.batch_size // jax.process_count()
    param_sh, batch_sh = state_sh["params"], sharding.batch_sharding(mesh, 2)
    scores = functools.partial(pair_scores, module=module)
    self.scores_fn = jax.jit(scores, in_shardings=(param_sh, batch_shardings(mesh)))
    self.single_fn = jax.jit(
      functools.partial(stages.ensemble_scores, module), in_shardings=(param_sh, batch_sh, batch_sh)
    )
    self.gold_prompts, self.gold_fn = _gold_setup(config)
    self.gold_samples: list[str] | None = None

  def __call__(self, params) -> dict[str, float]:
    return {**self.pair_eval(params), **self.gold_eval(params)}

  def pair_eval(self, params) -> dict[str, float]:
    if self.eval_source is None:
      return {}
    loader = loader_lib.Loader(
      preferences.GroupedSource(self.eval_source, [[i] for i in range(len(self.eval_source))]),
      global_batch_size=self.config.batch_size,
      shuffle=False,
      drop_remainder=False,
      num_epochs=1,
      collate=group_collate(self.config, self.tok, responses=2, pairs=1),  # plain pairs
    )
    diffs, spreads, ties, nlls = [], [], [], []
    for batch in loader:
      n = batch["margin"].shape[0]
      batch = _pad_rows(batch, self.local_rows)
      with sharding.use_mesh(self.mesh, self.rules):
        chosen, rejected = self.scores_fn(params, sharding.host_to_global(batch, self.mesh))
      chosen, rejected = sharding.fetch(chosen)[:, :n], sharding.fetch(rejected)[:, :n]
      member_diff = chosen - rejected
      diff = member_diff.mean(0)
      valid = batch["valid"][:n, 0]
      diffs.append(diff[valid])
      spreads.append(member_diff.std(0)[valid])
      ties.append(batch["tie"][:n, 0][valid])
      nll, _ = reward_lib.bradley_terry_loss(diff[valid], np.zeros_like(diff[valid]), tie=ties[-1])
      nlls.append(float(nll) * int(valid.sum()))
    diff, tie = np.concatenate(diffs), np.concatenate(ties)
    out = {
      "eval/loss": sum(nlls) / max(len(diff), 1),
      "eval/accuracy": reward_lib.preference_accuracy(diff, tie),
      "eval/margin": float(diff[~tie].mean()) if (~tie).any() else float("nan"),
      "eval/ece": reward_lib.expected_calibration_error(diff, tie),
      "eval/ensemble_spread": float(np.concatenate(spreads).mean()),
    }
    if self.noise_ceiling:
      out["eval/noise_ceiling"] = self.noise_ceiling["bayes_accuracy"]
      out["eval/accuracy_gap_to_ceiling"] = (
        self.noise_ceiling["bayes_accuracy"] - out["eval/accuracy"]
      )
    return out

  def score_texts(self, params, prompts, responses) -> np.ndarray:
    """[E, N] raw member scores of (prompt, response) texts."""
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    scores, local_rows = [], self.local_rows
    for start in range(0, len(rows), local_rows):
      chunk = loader_lib.sft_collate(
        rows[start : start + local_rows], self.tok, self.config.max_len
      )
      n = chunk["tokens"].shape[0]
      chunk = _pad_rows({"tokens": chunk["tokens"], "mask": chunk["input_mask"]}, local_rows)
      with sharding.use_mesh(self.mesh, self.rules):
        s = self.single_fn(
          params,
          sharding.host_to_global(chunk["tokens"], self.mesh),
          sharding.host_to_global(chunk["mask"], self.mesh),
        )
      scores.append(sharding.fetch(s)[:, :n])
    return np.concatenate(scores, axis=1)

  def gold_eval(self, params) -> dict[str, float]:
    """Correlation of the RM with gold on SFT-policy samples for held-out prompts."""
    if self.gold_fn is None:
      return {}
    prompts = self.gold_prompts
    if self.gold_samples is None:
      self.gold_samples = self.generate(prompts, rng.key(self.config.seed, "reward_gold_eval"))
    responses = self.gold_samples
    rm = self.score_texts(params, prompts, responses).mean(0)
    gold = np.asarray([self.gold_fn(p, r) for p, r in zip(prompts, responses, strict=True)])
    return {
      "eval/gold_pearson": reward_lib.pearson(rm, gold),
      "eval/gold_spearman": reward_lib.spearman(rm, gold),
    }


# ------------------------------------------------------------------------ data


def prepare_pairs(config, workdir, tok, generate):
  """The training comparison groups and the eval pairs (`pairs_lib`), those too long left
  out; (train groups, eval source or None, normalisation prompts, data_info)."""
  data = config.data
  if data.source == "testbed":
    paths, ceiling = pairs_lib.testbed_pairs(data, os.path.join(workdir, "data"), generate)
    info = {"noise_ceiling": ceiling}
  else:
    paths, info = pairs_lib.file_paths(data.train_files, data.eval_files), {}
  data_dir = data.data_dir or os.path.join(workdir, "data", "tfds")
  train_source, eval_source, data_info = pairs_lib.build(
    paths, data_dir, data.skip_invalid, info, tokenizer=tok
  )
  if config.soft_labels == "confidence":
    pairs_lib.check_confidence_range(train_source, tuple(config.confidence_range))
  # Pairs with a row too long for max_len are counted per file and left out before the
  # groups are formed, so every comparison of a batch counts; none left is an error.
  fitting, data_info["lengths"] = lengths.keep_fitting(
    {"train": train_source, "eval": eval_source},
    lengths.pair_fit(tok, config.max_len),
    what="pairs",
    max_len=config.max_len,
  )
  train_source, eval_source = fitting["train"], fitting["eval"]
  # K-wise groups: a batch is config.batch_size groups of up to K responses each, every
  # response scored once for all its comparisons. Eval pairs are plain pairs.
  k = data.responses_per_prompt
  groups = preferences.comparison_groups(train_source, k, k * (k - 1) // 2)
  train_groups = preferences.GroupedSource(train_source, groups)
  data_info["num_train_groups"] = len(train_groups)
  norm_prompts = normalization_prompts(config, train_source)  # known before the first step
  common.check_batch_fits(len(train_groups), config.batch_size, "comparison groups")
  return train_groups, eval_source, norm_prompts, data_info


def group_collate(config, tok, *, responses: int, pairs: int):
  """Rows of `responses` responses and `pairs` comparisons per group, with their labels."""
  return functools.partial(
    pairs_lib.group_collate,
    tokenizer=tok,
    max_len=config.max_len,
    responses=responses,
    pairs=pairs,
    soft_labels=config.soft_labels,
    confidence_range=tuple(config.confidence_range),
  )


# ------------------------------------------------------------------------ train


def start_params(config, policy, mesh, rules):
  """(model config, trunk, head or None, stacked) the reward model starts from: the SFT
  policy's trunk, or `config.reward_init`'s (`hf:DIR`, a causal LM or a one-label
  classifier, whose head comes too; or a finished reward stage, every member's trunk and
  head, `stacked` on the member axis). The reward model reads the policy's tokens, so
  `reward_init` must have the policy's tokenizer."""
  if not config.reward_init:
    return policy.module.config, policy.params["trunk"], None, False
  if not hf.is_hf(config.reward_init):
    return _continued(config, policy, mesh, rules)
  directory = hf.directory_of(config.reward_init)
  problem = hf.tokenizer_mismatch(directory, policy.tokenizer)
  if problem:
    raise errors.ConfigError(
      f"config.reward_init={config.reward_init!r}: {problem}; the reward model must read the "
      f"policy's tokens ({config.policy_init})."
    )
  if hf.is_classifier(directory):
    if config.ensemble_size > 1:
      raise errors.ConfigError(
        f"config.ensemble_size={config.ensemble_size} with a sequence classifier as "
        "config.reward_init: every member would start from its head and stay identical. "
        "Use 1, or a causal LM (fresh heads)."
      )
    start = hf.load_reward_model(config.reward_init, mesh, rules)
    params = jax.tree.map(lambda x: x[0], start.params)
    return start.module.config, params["trunk"], params["head"], False
  start = hf.load_policy(config.reward_init, mesh, rules)
  return start.module.config, start.params["trunk"], None, False


def _continued(config, policy, mesh, rules):
  """start_params for a finished reward stage: its members, to train on."""
  start = stages.load_reward_model(config.reward_init, mesh, rules)
  if start.tokenizer.vocab_size != policy.tokenizer.vocab_size:
    raise errors.ConfigError(
      f"config.reward_init={config.reward_init!r}: its tokenizer is not the policy's "
      f"({config.policy_init})."
    )
  check_continued(config, "config")
  return start.module.config, start.params["trunk"], start.params["head"], True


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains the reward-model ensemble; exports it for later stages."""
  # Config errors surface before any stage trains or any data is built.
  CONFIG_SPEC.validate(config)
  # With LoRA, the adapters and the fresh scalar heads train; the trunk stays.
  trainable = lora.trainable(config.lora.rank, HEADS)  # as `update`'s
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps, trainable=trainable)
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = common.mesh_from_config(config), config.sharding_rules

  # ------------------------------------------------- upstream SFT, pairs
  sft_dir = config_utils.require_stage(config, "policy_init")
  clock_start = time.perf_counter()
  policy = stages.load_policy(sft_dir, mesh, rules)
  tok = policy.tokenizer
  if jax.process_index() == 0:
    tok.save(os.path.join(workdir, tok.filename))
  data = config.data
  # SFT samples: for testbed pairs, the gold eval and the normalisation.
  generate = policy.generator(
    max_new_tokens=data.max_new_tokens,
    temperature=data.temperature,
    prompt_len=data.prompt_len,
    batch_size=data.sample_batch,
    mesh=mesh,
    rules=rules,
  )
  train_groups, eval_source, norm_prompts, data_info = prepare_pairs(config, workdir, tok, generate)
  k = data.responses_per_prompt
  train_loader = loader_lib.Loader(
    train_groups,
    global_batch_size=config.batch_size,
    seed=config.seed,
    collate=group_collate(config, tok, responses=k, pairs=k * (k - 1) // 2),
  )
  if jax.process_index() == 0:
    common.write_json_atomic(os.path.join(workdir, "data_info.json"), data_info)
  logging.info("Preference data: %s", data_info)

  with common.open_run(config, workdir, mesh, train_loader, clock_start=clock_start) as run:
    # ------------------------------------------- networks, state, jitted programs
    base_cfg, trunk, head, stacked = start_params(config, policy, mesh, rules)
    model_cfg = base_cfg.replace(num_layers=base_cfg.num_layers + config.extra_layers)
    model_cfg = lora.with_adapters(model_cfg, config.lora)  # none at rank 0
    module = models.ScalarModel(model_cfg, head_init="reward")
    s = Settings.from_config(config)
    init = functools.partial(
      init_state,
      module=module,
      tx=tx,
      members=s.members,
      base_layers=base_cfg.num_layers,
      stacked=stacked,
    )
    key = rng.key(config.seed, "init")
    state_sh = state_shardings(jax.eval_shape(init, key, trunk, head), module, mesh, rules)
    abstract = common.with_shardings(jax.eval_shape(init, key, trunk, head), state_sh)
    update_fn = jax.jit(
      functools.partial(update, module=module, tx=tx, schedule=schedule, s=s),
      in_shardings=(state_sh, batch_shardings(mesh)),
      out_shardings=(state_sh, common.replicated(mesh)),
      donate_argnums=(0,),
    )
    init_fn = jax.jit(init, out_shardings=state_sh)
    state, clock = common.restore_or_init(run, abstract, lambda: init_fn(key, trunk, head))

    # ----------------------------------------------------------- eval, loop
    ceiling = data_info.get("noise_ceiling", {}).get("eval")
    evaluate = Evaluator(config, module, tok, eval_source, generate, state_sh, mesh, ceiling)
    loop = common.bookkeeping(
      run,
      flops_per_step=k * s.members * model_cfg.train_flops_per_token(config.max_len)
      * config.batch_size,
      dtype=model_cfg.dtype,
      metric_keys=("loss", "accuracy", "eval/accuracy"),
    )  # fmt: skip
    common.evaluate_start(run, lambda: evaluate(state["params"]))
    step = run.start_step
    while step < config.total_steps:
      local = next(train_loader)
      with sharding.use_mesh(mesh, rules):
        state, step_metrics = update_fn(state, sharding.host_to_global(local, mesh))
      step += 1
      preempted = run.ckpt.preemption_requested(step)
      tokens = float(local["mask"].sum()) * jax.process_count()
      loop.after_update(
        step, step_metrics, tokens, lambda: evaluate(state["params"]), preempted=preempted
      )
      common.save_if_due(run, loop, step, state, clock)
      if preempted:
        logging.warning("SIGTERM: saved step %d and stopping; rerun to resume.", step)
        break

  # ------------------------------------------------- normalisation, export
  if step >= config.total_steps and stages.needs_export(workdir, step):
    # The loop's last eval (recomputed if the run stopped after its final checkpoint).
    loop.final_eval(run.start_step, lambda: evaluate(state["params"]))
    responses = generate(norm_prompts, rng.key(config.seed, "normalization"))
    raw = evaluate.score_texts(state["params"], norm_prompts, responses).mean(0)
    gain, bias = reward_lib.normalization(raw)
    logging.info("Normalisation on %d SFT samples: gain %.4f, bias %.4f", len(raw), gain, bias)
    meta = {
      "kind": "reward",
      "model": lora.plain(model_cfg).to_dict(),  # adapters are merged into the export
      "tokenizer": tok.filename,
      "ensemble_size": s.members,
      "gain": gain,
      "bias": bias,
      "policy": sft_dir if hf.is_hf(sft_dir) else os.path.abspath(sft_dir),
      "step": step,
      "data_content_hash": data_info["content_hash"],
      "eval": loop.last_eval,
    }
    stages.export(workdir, lora.merged(state["params"], model_cfg), meta)
  return loop.last_eval


# --------------------------------------------------------------- helpers


def _gold_setup(config):
  if config.data.source != "testbed":
    return [], None
  from rlhf_jax.data import testbed

  prompts = testbed.prompts(
    "eval",
    config.eval.num_gold_samples,
    rng.seed(config.data.seed, "gold_prompts"),
    config.data.testbed,
  )
  return prompts, lambda p, r: testbed.gold_reward(p, r, config.data.testbed)


def normalization_prompts(config, train_source) -> list[str]:
  """`config.normalize_samples` prompts whose SFT samples set the score's mean 0 and std 1.

  On the testbed, fresh training prompts; with preference files, the distinct prompts
  of the training pairs in file order, repeated (each copy gets its own sample) when
  there are fewer than `normalize_samples`.
  """
  n = config.normalize_samples
  if config.data.source == "testbed":
    from rlhf_jax.data import testbed

    return testbed.prompts(
      "train", n, rng.seed(config.data.seed, "normalization_prompts"), config.data.testbed
    )
  distinct: dict[str, None] = {}
  for _, record in preferences.iter_records(train_source):
    distinct.setdefault(record["prompt"])
    if len(distinct) == n:
      break
  prompts = list(distinct)
  return [prompts[i % len(prompts)] for i in range(n)]


def _pad_rows(batch, rows):
  b = next(iter(batch.values())).shape[0]
  if b == rows:
    return batch
  return {
    k: np.concatenate([v, np.zeros((rows - b, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
  }
