"""Bradley-Terry reward model (an ensemble) on preference pairs.

    python -m experiments.launch --config=configs/reward.py

Sections, in order: logging, mesh, upstream SFT stage, preference data,
model and optimizer shapes, sharded state, update step, checkpoint restore,
evaluators, train loop, normalisation and export.

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

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import (
  config_utils,
  metrics,
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
from rlhf_jax.rl import reward as reward_lib
from rlhf_jax.trainers import common

TIMING_METRICS = ("tokens_per_s", "steps_per_s", "mfu")

DATA_SOURCES = ("testbed", "jsonl")


# Sampling responses from the SFT policy for pairs (testbed) and for normalisation.
SAMPLING_FIELDS = {
  "temperature": cs.Float(gt=0),
  "max_new_tokens": cs.Int(min=1),
  "prompt_len": cs.Int(min=1),
  "sample_batch": cs.Int(min=1),
}

# One declared check per field of configs/reward.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    "batch_size": cs.Int(min=1),
    "max_len": cs.Int(min=3),
    "policy_init": cs.FinishedStage("policy"),
    "sft": cs.Stage(unless="policy_init"),
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
    "normalize_samples": cs.Int(min=2),
    "eval": cs.Spec({"num_gold_samples": cs.Int(min=0)}),
  },
  checks=(
    pairs_lib.check_confidence_range_field,
    optim.check_steps("optim", lambda c: c.total_steps),
    cs.mesh_batch("batch_size", "data.sample_batch"),
  ),
)


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains the reward-model ensemble; exports it for later stages."""
  # ----------------------------------------------------------------- logging
  os.makedirs(workdir, exist_ok=True)
  is_primary = jax.process_index() == 0

  # -------------------------------------------------------------------- mesh
  mesh = common.mesh_from_config(config)
  rules = config.sharding_rules

  # Config errors surface before any stage trains or any data is built.
  CONFIG_SPEC.validate(config)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)

  # ------------------------------------------------------------ upstream SFT
  sft_dir = config_utils.require_stage(config, "policy_init")
  policy = stages.load_policy(sft_dir, mesh, rules)
  tok = policy.tokenizer
  if is_primary:
    tok.save(os.path.join(workdir, "tokenizer.model"))

  ckpt = common.checkpointer(config, workdir)
  start_step = ckpt.latest_intact_step() or 0
  writer = metrics.MetricWriter(workdir, resume_step=start_step or -1)

  # -------------------------------------------------------- preference data
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

  if data.source == "testbed":
    paths, ceiling = pairs_lib.testbed_pairs(data, os.path.join(workdir, "data"), generate)
    info = {"noise_ceiling": ceiling}
  else:
    paths, info = pairs_lib.file_paths(data.train_files, data.eval_files), {}
  data_dir = data.data_dir or os.path.join(workdir, "data", "tfds")
  train_source, eval_source, data_info = pairs_lib.build(paths, data_dir, data.skip_invalid, info)
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
  k = config.data.responses_per_prompt
  shape = dict(responses=k, pairs=k * (k - 1) // 2)
  train_groups = preferences.GroupedSource(
    train_source, preferences.comparison_groups(train_source, shape["responses"], shape["pairs"])
  )
  data_info["num_train_groups"] = len(train_groups)
  norm_prompts = normalization_prompts(config, train_source)  # known before the first step
  common.check_batch_fits(len(train_groups), config.batch_size, "comparison groups")

  def collate(responses, pairs):
    return functools.partial(
      pairs_lib.group_collate,
      tokenizer=tok,
      max_len=config.max_len,
      responses=responses,
      pairs=pairs,
      soft_labels=config.soft_labels,
      confidence_range=tuple(config.confidence_range),
    )

  train_loader = loader_lib.Loader(
    train_groups, global_batch_size=config.batch_size, seed=config.seed, collate=collate(**shape)
  )
  if is_primary:
    common.write_json_atomic(os.path.join(workdir, "data_info.json"), data_info)
  logging.info("Preference data: %s", data_info)

  # ------------------------------------------------ model, optimizer shapes
  policy_cfg = policy.module.config
  model_cfg = policy_cfg.replace(num_layers=policy_cfg.num_layers + config.extra_layers)
  module = models.ScalarModel(model_cfg, head_init="reward")
  members = config.ensemble_size

  def init_member(rng, trunk):
    params = sharding.unbox(models.init_params(module, rng))
    # The SFT policy's trunk, grown by `extra_layers` identity-initialised blocks; the
    # head (and any new block) is fresh per member.
    trunk = models.grow_trunk(params["trunk"], trunk, policy_cfg.num_layers, model_cfg.scan_layers)
    return {**params, "trunk": trunk}

  def init_state(rng, trunk):
    init_rng, rng = jax.random.split(rng)
    params = jax.vmap(init_member, in_axes=(0, None))(jax.random.split(init_rng, members), trunk)
    return dict(
      params=params,
      opt_state=jax.vmap(tx.init)(params),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
    )

  # -------------------------------------------------------- sharded state
  boxed = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  member_specs = sharding.logical_specs(boxed)
  stacked_specs = jax.tree.map(
    lambda s: jax.P(None, *s), member_specs, is_leaf=lambda x: isinstance(x, jax.P)
  )
  abstract = jax.eval_shape(init_state, rng.key(config.seed, "init"), policy.params["trunk"])
  param_sh = sharding.tree_shardings(abstract["params"], stacked_specs, mesh, rules)
  opt_sh = common.mirror_shardings(abstract["opt_state"], abstract["params"], param_sh, mesh)
  rep = common.replicated(mesh)
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep)
  abstract_state = common.with_shardings(abstract, state_sh)

  # ----------------------------------------------------------- update step
  apply_scores = functools.partial(stages.ensemble_scores, module)

  def pair_scores(params, batch):
    """Scores of each comparison's chosen and rejected rows: [E, G * P] each."""
    g, r, t = batch["tokens"].shape
    scores = apply_scores(
      params, batch["tokens"].reshape(g * r, t), batch["mask"].reshape(g * r, t)
    ).reshape(-1, g, r)  # every distinct response once: [E, G, R]
    read = lambda rows: jnp.take_along_axis(scores, rows[None], axis=2).reshape(-1, rows.size)
    return read(batch["chosen"]), read(batch["rejected"])

  def update(state, batch):
    rng, boot_rng = jax.random.split(state["rng"])
    labels = {k: batch[k].reshape(-1) for k in pairs_lib.LABEL_FIELDS}  # per comparison: [G * P]
    b = labels["margin"].shape[0]
    valid = labels["valid"].astype(jnp.float32)
    if members > 1:
      weights = jax.random.poisson(boot_rng, 1.0, (members, b)).astype(jnp.float32) * valid
    else:
      weights = jnp.broadcast_to(valid, (1, b))

    def loss_fn(params):
      chosen, rejected = pair_scores(params, batch)
      member_loss = jax.vmap(
        lambda c, r, w: reward_lib.bradley_terry_loss(
          c,
          r,
          margin=labels["margin"] if config.use_margin else None,
          tie=labels["tie"],
          target=labels["target"],
          weight=w,
          center_coef=config.center_coef,
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
      / jnp.maximum(2 * members * jnp.sum(valid), 1.0),
      lr=schedule(state["step"]),
      grad_norm=optim.l2_norm(grads),
      param_norm=optim.l2_norm(params),
      update_norm=optim.l2_norm(updates),
    )
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
    return new_state, step_metrics

  batch_sh = sharding.batch_sharding(mesh, 2)
  rows_sh = sharding.batch_sharding(mesh, 3)
  batch_shardings = dict(
    tokens=rows_sh,
    mask=rows_sh,
    chosen=batch_sh,
    rejected=batch_sh,
    **dict.fromkeys(pairs_lib.LABEL_FIELDS, batch_sh),
  )
  update_fn = jax.jit(
    update,
    in_shardings=(state_sh, batch_shardings),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
  scores_fn = jax.jit(pair_scores, in_shardings=(param_sh, batch_shardings))
  single_fn = jax.jit(apply_scores, in_shardings=(param_sh, batch_sh, batch_sh))

  # ------------------------------------------------------ load checkpoint
  with sharding.use_mesh(mesh, rules):
    if start_step:
      state, meta = ckpt.restore(start_step, target=abstract_state)
      train_loader.set_state(meta["loader"])
      logging.info("Resumed from step %d", start_step)
    else:
      init = jax.jit(init_state, out_shardings=state_sh)
      state = init(rng.key(config.seed, "init"), policy.params["trunk"])
  ckpt.install_sigterm_handler()

  # ------------------------------------------------------------ evaluators
  eval_prompts, eval_gold_fn = _gold_setup(config)
  local_rows = config.batch_size // jax.process_count()

  def pair_eval(params) -> dict[str, float]:
    if eval_source is None:
      return {}
    loader = loader_lib.Loader(
      preferences.GroupedSource(eval_source, [[i] for i in range(len(eval_source))]),
      global_batch_size=config.batch_size,
      shuffle=False,
      drop_remainder=False,
      num_epochs=1,
      collate=collate(responses=2, pairs=1),  # plain pairs
    )
    diffs, spreads, ties, nlls = [], [], [], []
    for batch in loader:
      n = batch["margin"].shape[0]
      batch = _pad_rows(batch, local_rows)
      with sharding.use_mesh(mesh, rules):
        chosen, rejected = scores_fn(params, sharding.host_to_global(batch, mesh))
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
    ceiling = data_info.get("noise_ceiling", {}).get("eval")
    if ceiling:
      out["eval/noise_ceiling"] = ceiling["bayes_accuracy"]
      out["eval/accuracy_gap_to_ceiling"] = ceiling["bayes_accuracy"] - out["eval/accuracy"]
    return out

  policy_samples: dict[str, list[str]] = {}

  def score_texts(params, prompts, responses) -> np.ndarray:
    """[E, N] raw member scores of (prompt, response) texts."""
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    scores = []
    for start in range(0, len(rows), local_rows):
      chunk = loader_lib.sft_collate(rows[start : start + local_rows], tok, config.max_len)
      n = chunk["tokens"].shape[0]
      chunk = _pad_rows({"tokens": chunk["tokens"], "mask": chunk["input_mask"]}, local_rows)
      with sharding.use_mesh(mesh, rules):
        s = single_fn(
          params,
          sharding.host_to_global(chunk["tokens"], mesh),
          sharding.host_to_global(chunk["mask"], mesh),
        )
      scores.append(sharding.fetch(s)[:, :n])
    return np.concatenate(scores, axis=1)

  def gold_eval(params) -> dict[str, float]:
    """Correlation of the RM with gold on SFT-policy samples for held-out prompts."""
    if eval_gold_fn is None:
      return {}
    if "eval" not in policy_samples:
      policy_samples["eval"] = generate(eval_prompts, rng.key(config.seed, "reward_gold_eval"))
    responses = policy_samples["eval"]
    rm = score_texts(params, eval_prompts, responses).mean(0)
    gold = np.asarray([eval_gold_fn(p, r) for p, r in zip(eval_prompts, responses, strict=True)])
    return {
      "eval/gold_pearson": reward_lib.pearson(rm, gold),
      "eval/gold_spearman": reward_lib.spearman(rm, gold),
    }

  def evaluate(state) -> dict[str, float]:
    return {**pair_eval(state["params"]), **gold_eval(state["params"])}

  # ----------------------------------------------------------- train loop
  progress = metrics.ProgressLogger(
    config.total_steps,
    every_n_steps=config.log_every,
    start_step=start_step,
    metric_keys=("loss", "accuracy", "eval/accuracy"),
  )
  loop = common.LoopBookkeeping(
    config,
    writer=writer,
    progress=progress,
    mesh=mesh,
    flops_per_step=shape["responses"]
    * members
    * model_cfg.train_flops_per_token(config.max_len)
    * config.batch_size,
    dtype=model_cfg.dtype,
  )
  if start_step == 0:
    first = evaluate(state)
    metrics.check_finite(0, first, context="eval")
    writer.write(0, first)
  step = start_step
  try:
    while step < config.total_steps:
      local = next(train_loader)
      with sharding.use_mesh(mesh, rules):
        state, step_metrics = update_fn(state, sharding.host_to_global(local, mesh))
      step += 1
      preempted = ckpt.preemption_requested(step)
      tokens = float(local["mask"].sum())
      loop.after_update(
        step,
        step_metrics,
        tokens * jax.process_count(),
        lambda: evaluate(state),
        preempted=preempted,
      )
      if loop.should_save:
        ckpt.save(step, state, {"loader": train_loader.get_state()}, force=True)
      if preempted:
        logging.warning("SIGTERM: saved step %d and stopping; rerun to resume.", step)
        break
  finally:
    common.close_all(ckpt.wait, ckpt.close, writer.close)

  # ------------------------------------------------- normalisation, export
  if step >= config.total_steps and stages.needs_export(workdir, step):
    # The loop's last eval (recomputed if the run stopped after its final checkpoint).
    loop.final_eval(start_step, lambda: evaluate(state))
    prompts = norm_prompts
    responses = generate(prompts, rng.key(config.seed, "normalization"))
    raw = score_texts(state["params"], prompts, responses).mean(0)
    gain, bias = reward_lib.normalization(raw)
    logging.info("Normalisation on %d SFT samples: gain %.4f, bias %.4f", len(raw), gain, bias)
    stages.export(
      workdir,
      state["params"],
      {
        "kind": "reward",
        "model": model_cfg.to_dict(),
        "tokenizer": "tokenizer.model",
        "ensemble_size": members,
        "gain": gain,
        "bias": bias,
        "policy": os.path.abspath(sft_dir),
        "step": step,
        "data_content_hash": data_info["content_hash"],
        "eval": loop.last_eval,
      },
    )
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
