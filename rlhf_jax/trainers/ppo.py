"""PPO against a reward model, with a KL penalty to the frozen SFT reference.

    python -m experiments.launch --config=configs/ppo.py

Sections, in order: logging, mesh, upstream stages (SFT, reward model),
prompts, networks and optimizers, sharded state, experience, update,
checkpoint restore, evaluators, train loop, summary.

One iteration: sample responses for a batch of prompts with the jitted KV-cache
sampler; in one jitted function recompute the policy's and the reference's
log-probs at the sampling temperature, the values and the reward-model score
(read at each response's last token), the per-token KL penalty, rewards, GAE
and whitened advantages; then, in one jitted update, several epochs over
shuffled minibatches of the clipped policy and value losses. No Python loop
over tokens and no host round trip inside an update.

The value network is separate and initialised from the reward model (the
"N+ implementation details"); the reference is the SFT policy, frozen twice:
no optimizer state and `stop_gradient` on its log-probs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rlhf_jax import checkpoint, config_utils, metrics, models, optim, sharding, stages, utils
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.rl import advantages as adv_lib
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.rl.logprobs import entropy_from_logits, token_logprobs
from rlhf_jax.trainers import common

TIMING_METRICS = (
  "tokens_per_s",
  "steps_per_s",
  "mfu",
  "time/rollout_s",
  "time/scoring_s",
  "time/update_s",
  "time/generation_fraction",
)


# ------------------------------------------------------------------ upstream


def ensure_stages(config, workdir) -> tuple[str, str]:
  """Workdirs of the SFT and reward stages, trained on demand into <workdir>/{sft,reward}."""
  sft_dir = config.policy_init or os.path.join(workdir, "sft")
  if not stages.is_complete(sft_dir):
    if config.policy_init:
      raise FileNotFoundError(f"config.policy_init={sft_dir!r} holds no finished SFT stage.")
    logging.info("Training the SFT stage into %s", sft_dir)
    config_utils.run(config.sft, sft_dir)
  reward_dir = config.reward_init or os.path.join(workdir, "reward")
  if not stages.is_complete(reward_dir):
    if config.reward_init:
      raise FileNotFoundError(f"config.reward_init={reward_dir!r} holds no finished reward stage.")
    reward_cfg = ml_collections.ConfigDict(config.reward.to_dict())
    reward_cfg.policy_init = sft_dir
    logging.info("Training the reward stage into %s", reward_dir)
    config_utils.run(reward_cfg, reward_dir)
  return sft_dir, reward_dir


def _gather_last(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [..., S] at index [B] along the last axis -> [..., B]."""
  return jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs PPO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  # ----------------------------------------------------------------- logging
  os.makedirs(workdir, exist_ok=True)
  is_primary = jax.process_index() == 0
  rollout_batch = config.rollout_batch_size
  num_minibatches = rollout_batch // config.minibatch_size
  if rollout_batch % config.minibatch_size:
    raise ValueError(
      f"config.rollout_batch_size={rollout_batch} must be a multiple of "
      f"config.minibatch_size={config.minibatch_size}."
    )
  updates_per_iter = config.ppo_epochs * num_minibatches
  # Config errors surface before any stage trains.
  policy_tx, policy_lr = optim.make_optimizer(config.optim, config.total_steps * updates_per_iter)
  value_tx, _ = optim.make_optimizer(config.value_optim, config.total_steps * updates_per_iter)

  # -------------------------------------------------------------------- mesh
  mesh = common.mesh_from_config(config)
  rules = config.sharding_rules

  # -------------------------------------------------------- upstream stages
  sft_dir, reward_dir = ensure_stages(config, workdir)
  sft = stages.load_policy(sft_dir, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules)
  tok = sft.tokenizer
  if is_primary:
    tok.save(os.path.join(workdir, "tokenizer.model"))
  policy_module = sft.module
  value_module = models.ScalarModel(rm.module.config, head_init="zeros")
  temperature = config.temperature

  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.keep_checkpoints,
    save_interval_steps=config.checkpoint_every,
  )
  start_step = ckpt.latest_step() or 0
  writer = metrics.MetricWriter(workdir, resume_step=start_step or -1)

  # ----------------------------------------------------------------- prompts
  from rlhf_jax.data import testbed

  tb = config.data.testbed
  train_prompts = [
    {"prompt": p} for p in testbed.prompts("train", config.data.num_prompts, config.data.seed, tb)
  ]
  eval_prompts = testbed.prompts("eval", config.eval.num_prompts, config.data.seed + 1, tb)

  def prompt_collate(examples):
    tokens, mask = common.left_pad_prompts(tok, [e["prompt"] for e in examples], config.prompt_len)
    return {"tokens": tokens, "mask": mask}

  prompt_loader = loader_lib.Loader(
    train_prompts, global_batch_size=rollout_batch, seed=config.seed, collate=prompt_collate
  )

  # ------------------------------------------------------- sharded state
  value_init = jax.tree.map(lambda x: x[0], rm.params)  # reward member 0: trunk and head
  value_sh = jax.tree.map(lambda s: _drop_leading(s, mesh), rm.shardings)

  def init_state(policy_params, value_params, rng):
    return dict(
      policy=policy_params,
      value=value_params,
      policy_opt=policy_tx.init(policy_params),
      value_opt=value_tx.init(value_params),
      kl=kl_lib.init_kl_controller(config.kl.init_coef),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
    )

  abstract = jax.eval_shape(init_state, sft.params, value_init, jax.random.key(config.seed))
  rep = common.replicated(mesh)
  state_sh = dict(
    policy=sft.shardings,
    value=value_sh,
    policy_opt=common.mirror_shardings(
      abstract["policy_opt"], abstract["policy"], sft.shardings, mesh
    ),
    value_opt=common.mirror_shardings(abstract["value_opt"], abstract["value"], value_sh, mesh),
    kl=jax.tree.map(lambda _: rep, abstract["kl"]),
    step=rep,
    rng=rep,
  )
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
  )

  # --------------------------------------------------------------- sampler
  sample_cfg = sampler_lib.SamplerConfig(
    max_new_tokens=config.max_new_tokens,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
    temperature=temperature,
  )
  sample_fn = sampler_lib.make_sampler(
    policy_module, sample_cfg, mesh=mesh, rules=rules, param_shardings=sft.shardings
  )
  p_len, n_new = config.prompt_len, config.max_new_tokens

  # ------------------------------------------------------------ experience
  def forward_logps(params, full, fmask, response):
    """Log-probs [B, N] of the response tokens at the sampling temperature, and logits."""
    logits, _ = policy_module.apply(
      {"params": params},
      full,
      models.positions_from_mask(fmask),
      models.causal_attention_mask(fmask),
    )
    resp_logits = logits[:, p_len - 1 : p_len + n_new - 1]
    return token_logprobs(resp_logits, response, temperature), resp_logits

  def forward_values(params, full, fmask):
    """V(s_t) [B, N]: the value before each response token (at the position that predicts it)."""
    values = value_module.apply(
      {"params": params},
      full,
      models.positions_from_mask(fmask),
      models.causal_attention_mask(fmask),
    )
    return values[:, p_len - 1 : p_len + n_new - 1]

  def rm_score(full, fmask, rmask):
    """Normalised ensemble-mean RM score, read at the last response token."""
    last = p_len + jnp.maximum(jnp.sum(rmask, axis=-1) - 1, 0)
    positions = models.positions_from_mask(fmask)
    attn = models.causal_attention_mask(fmask)

    def member(params):
      values = rm.module.apply({"params": params}, full, positions, attn)
      return _gather_last(values, last)

    raw = jax.vmap(member)(rm.params)
    return jnp.mean(rm.gain * raw + rm.bias, axis=0)

  def make_experience(state, prompt, pmask, sample):
    response, rmask = sample.tokens, sample.response_mask
    full = jnp.concatenate([prompt, response], axis=1)
    fmask = jnp.concatenate([pmask, rmask], axis=1)
    logp, resp_logits = forward_logps(state["policy"], full, fmask, response)
    ref_logp, _ = forward_logps(sft.params, full, fmask, response)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    values = forward_values(state["value"], full, fmask)
    scores = rm_score(full, fmask, rmask)
    kl = kl_lib.kl_penalty(logp, ref_logp, config.kl.estimator, rmask)
    rewards, non_score, used_scores = adv_lib.assemble_rewards(
      scores,
      kl,
      rmask,
      state["kl"].kl_coef,
      has_eos=sample.has_eos,
      missing_eos_score=config.missing_eos_score if config.missing_eos_penalty else None,
    )
    if config.whiten_rewards:
      rewards = adv_lib.whiten(rewards, rmask, shift_mean=False)
    advantages, returns = adv_lib.gae(rewards, values, rmask, config.gamma, config.lam)
    advantages = adv_lib.whiten(advantages, rmask)
    exp = dict(
      full=full,
      fmask=fmask,
      response=response,
      rmask=rmask,
      old_logp=logp,
      old_values=values,
      advantages=advantages,
      returns=returns,
    )
    seq_kl = kl_lib.objective_kl(kl_lib.kl_penalty(logp, ref_logp, "k1", rmask), rmask)
    stats = {
      "objective/kl": seq_kl,
      "objective/kl_coef": state["kl"].kl_coef,
      "objective/entropy": jnp.sum(entropy_from_logits(resp_logits, temperature) * rmask)
      / jnp.maximum(rmask.shape[0], 1),
      "objective/scores": jnp.mean(used_scores),
      "objective/rm_scores": jnp.mean(scores),
      "objective/non_score_reward": jnp.mean(non_score),
      "returns/mean": adv_lib.masked_mean(returns, rmask),
      "returns/var": adv_lib.masked_var(returns, rmask),
      "val/vpred_rollout": adv_lib.masked_mean(values, rmask),
      "response_length": jnp.mean(jnp.sum(rmask, axis=-1).astype(jnp.float32)),
      "frac_no_eos": 1.0 - jnp.mean(sample.has_eos.astype(jnp.float32)),
    }
    return exp, stats

  # ---------------------------------------------------------------- update
  def minibatch_loss(policy_params, value_params, mb):
    logp, resp_logits = forward_logps(policy_params, mb["full"], mb["fmask"], mb["response"])
    pg_loss, pg_stats = ppo_losses.policy_loss(
      logp,
      mb["old_logp"],
      mb["advantages"],
      mb["rmask"],
      clip_eps=config.clip_eps,
      mode=config.loss_aggregation,
    )
    vpred = forward_values(value_params, mb["full"], mb["fmask"])
    vf_loss, vf_stats = ppo_losses.value_loss(
      vpred,
      mb["old_values"],
      mb["returns"],
      mb["rmask"],
      clip_eps=config.value_clip_eps,
      mode=config.loss_aggregation,
    )
    entropy = ppo_losses.masked_entropy(
      resp_logits, mb["rmask"], temperature=temperature, mode=config.loss_aggregation
    )
    loss = pg_loss + config.vf_coef * vf_loss
    stats = {
      "loss/policy": pg_loss,
      "loss/value": vf_loss,
      "policy/entropy": entropy,
      "val/vpred": adv_lib.masked_mean(vpred, mb["rmask"]),
      "val/error": adv_lib.masked_mean(jnp.square(vpred - mb["returns"]), mb["rmask"]),
      "val/var_explained": adv_lib.explained_variance(vpred, mb["returns"], mb["rmask"]),
      **{f"policy/{k}": v for k, v in pg_stats.items()},
      **{f"val/{k}": v for k, v in vf_stats.items()},
    }
    return loss, stats

  def ppo_update(state, exp):
    rng, perm_rng = jax.random.split(state["rng"])

    def one_minibatch(carry, index):
      policy, value, policy_opt, value_opt = carry
      mb = jax.tree.map(lambda x: jnp.take(x, index, axis=0), exp)
      (_, stats), (g_policy, g_value) = jax.value_and_grad(
        minibatch_loss, argnums=(0, 1), has_aux=True
      )(policy, value, mb)
      u_policy, policy_opt = policy_tx.update(g_policy, policy_opt, policy)
      u_value, value_opt = value_tx.update(g_value, value_opt, value)
      stats["policy/grad_norm"] = optim.l2_norm(g_policy)
      stats["val/grad_norm"] = optim.l2_norm(g_value)
      stats["policy/update_norm"] = optim.l2_norm(u_policy)
      new = (
        optax.apply_updates(policy, u_policy),
        optax.apply_updates(value, u_value),
        policy_opt,
        value_opt,
      )
      return new, stats

    perms = jax.vmap(lambda k: jax.random.permutation(k, rollout_batch))(
      jax.random.split(perm_rng, config.ppo_epochs)
    )
    indices = perms.reshape(updates_per_iter, config.minibatch_size)
    carry = (state["policy"], state["value"], state["policy_opt"], state["value_opt"])
    (policy, value, policy_opt, value_opt), stats = jax.lax.scan(one_minibatch, carry, indices)
    stats = jax.tree.map(jnp.mean, stats)
    stats["lr"] = policy_lr(state["step"] * updates_per_iter)
    stats["policy/param_norm"] = optim.l2_norm(policy)
    return dict(
      state, policy=policy, value=value, policy_opt=policy_opt, value_opt=value_opt, rng=rng
    ), stats

  def update_and_control(state, exp, kl):
    state, upd_stats = ppo_update(state, exp)
    kl_state = kl_lib.update_kl_controller(
      state["kl"],
      kl,
      rollout_batch,
      kind=config.kl.controller,
      target=config.kl.target,
      horizon=config.kl.horizon,
    )
    return dict(state, kl=kl_state, step=state["step"] + 1), upd_stats

  # Two programs, so the time of each phase can be measured; the experience
  # stays on device between them.
  batch_sh = sharding.batch_sharding(mesh, 2)
  vec_sh = sharding.batch_sharding(mesh, 1)
  sample_sh = sampler_lib.SampleOutput(batch_sh, batch_sh, batch_sh, batch_sh, vec_sh, vec_sh)
  experience_fn = jax.jit(make_experience, in_shardings=(state_sh, batch_sh, batch_sh, sample_sh))
  update_fn = jax.jit(
    update_and_control,
    in_shardings=(state_sh, None, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )

  # ------------------------------------------------------ load checkpoint
  with sharding.use_mesh(mesh, rules):
    if start_step:
      state, meta = ckpt.restore(start_step, target=abstract_state)
      prompt_loader.set_state(meta["loader"])
      logging.info("Resumed from iteration %d", start_step)
    else:
      init = jax.jit(init_state, out_shardings=state_sh)
      state = init(sft.params, value_init, jax.random.key(config.seed))
  ckpt.install_sigterm_handler()

  # ------------------------------------------------------------ evaluators
  eval_tokens, eval_mask = common.left_pad_prompts(tok, eval_prompts, p_len)
  eval_rng = jax.random.key(config.seed + 101)
  rm_score_jit, logps_jit = jax.jit(rm_score), jax.jit(forward_logps)

  def sample_texts(params, rng):
    with sharding.use_mesh(mesh, rules):
      out = sample_fn(
        params,
        sharding.global_from_full(eval_tokens, mesh),
        sharding.global_from_full(eval_mask, mesh),
        rng,
      )
      full = jnp.concatenate([jnp.asarray(eval_tokens), out.tokens], axis=1)
      fmask = jnp.concatenate([jnp.asarray(eval_mask), out.response_mask], axis=1)
      proxy = rm_score_jit(full, fmask, out.response_mask)
      logp, _ = logps_jit(params, full, fmask, out.tokens)
      ref, _ = logps_jit(sft.params, full, fmask, out.tokens)
    texts = tok.decode_batch(sharding.fetch(out.tokens))
    kl = np.asarray(sharding.fetch(jnp.sum((logp - ref) * out.response_mask, axis=-1)))
    return texts, sharding.fetch(proxy), kl, jax.tree.map(sharding.fetch, out)

  gold_fn = lambda p, r: testbed.gold_reward(p, r, tb)
  sft_texts, _, _, _ = sample_texts(sft.params, eval_rng)
  sft_gold = np.asarray([gold_fn(p, r) for p, r in zip(eval_prompts, sft_texts, strict=True)])

  def evaluate(state, step) -> dict[str, float]:
    texts, proxy, kl, out = sample_texts(state["policy"], eval_rng)
    gold = np.asarray([gold_fn(p, r) for p, r in zip(eval_prompts, texts, strict=True)])
    if is_primary:
      records = [
        {"step": step, "prompt": p, "response": r, "gold_reward": g, "proxy": s}
        for p, r, g, s in zip(eval_prompts, texts, gold, proxy, strict=True)
      ]
      utils.write_jsonl_atomic(os.path.join(workdir, "samples", f"step_{step:07d}.jsonl"), records)
    return {
      "eval/gold_reward": float(gold.mean()),
      "eval/proxy_reward": float(np.mean(proxy)),
      "eval/win_rate_vs_sft": testbed.win_rate(gold, sft_gold),
      "eval/kl_to_ref": float(kl.mean()),
      "eval/sqrt_kl": float(np.sqrt(max(kl.mean(), 0.0))),
      "eval/response_length": float(out.lengths.mean()),
      "eval/frac_no_eos": float(1.0 - out.has_eos.mean()),
      "eval/distinct_2": testbed.distinct_n(texts, 2),
    }

  # ----------------------------------------------------------- train loop
  progress = metrics.ProgressLogger(
    config.total_steps,
    every_n_steps=config.log_every,
    start_step=start_step,
    metric_keys=("objective/scores", "objective/kl", "eval/gold_reward"),
  )
  cfg_model = policy_module.config
  seq = p_len + n_new
  flops = (
    rollout_batch
    * seq
    * cfg_model.train_flops_per_token(seq)
    * config.ppo_epochs
    * 2  # policy + value
    + rollout_batch * seq * cfg_model.train_flops_per_token(seq) / 3 * (2 + rm.ensemble_size)
  )
  loop = common.LoopBookkeeping(
    config, writer=writer, progress=progress, mesh=mesh, flops_per_step=flops, dtype=cfg_model.dtype
  )
  if start_step == 0:
    first = evaluate(state, 0)
    metrics.check_finite(0, first, context="eval")
    writer.write(0, first)
  step = start_step
  try:
    while step < config.total_steps:
      batch = next(prompt_loader)
      rollout_rng = jax.random.fold_in(jax.random.key(config.seed + 7), step)
      with sharding.use_mesh(mesh, rules):
        prompt = sharding.host_to_global(batch["tokens"], mesh)
        pmask = sharding.host_to_global(batch["mask"], mesh)
        # Phase times are measured on log steps only (blocking elsewhere would
        # stop the host from running ahead of the device).
        timed = (step + 1) % config.log_every == 0
        if timed:  # the host runs ahead of the device: drain earlier iterations first
          jax.block_until_ready(state)
        clock = [time.perf_counter()]
        sample = _mark(sample_fn(state["policy"], prompt, pmask, rollout_rng), timed, clock)
        exp, exp_stats = _mark(experience_fn(state, prompt, pmask, sample), timed, clock)
        state, upd_stats = _mark(update_fn(state, exp, exp_stats["objective/kl"]), timed, clock)
      stats = {**exp_stats, **upd_stats}
      if timed:
        phases = np.diff(clock)
        stats.update(
          {
            "time/rollout_s": phases[0],
            "time/scoring_s": phases[1],
            "time/update_s": phases[2],
            "time/generation_fraction": phases[0] / phases.sum(),
          }
        )
      step += 1
      preempted = ckpt.preemption_requested(step)
      tokens = float(rollout_batch * seq)
      loop.after_update(step, stats, tokens, lambda: evaluate(state, step), preempted=preempted)
      if loop.should_save:
        ckpt.save(step, state, {"loader": prompt_loader.get_state()}, force=True)
      if preempted:
        logging.warning("SIGTERM: saved iteration %d and stopping; rerun to resume.", step)
        break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()

  # --------------------------------------------------------------- summary
  if step >= config.total_steps:
    final = loop.last_eval
    rows = metrics.read_metrics(workdir)
    first = next(r for r in rows if r["step"] == 0)
    summary = {
      "sft_gold_reward": first["eval/gold_reward"],
      "ppo_gold_reward": final["eval/gold_reward"],
      "gold_reward_gain": final["eval/gold_reward"] - first["eval/gold_reward"],
      "sft_proxy_reward": first["eval/proxy_reward"],
      "ppo_proxy_reward": final["eval/proxy_reward"],
      "kl_to_ref": final["eval/kl_to_ref"],
      "win_rate_vs_sft": final["eval/win_rate_vs_sft"],
    }
    if is_primary:
      common.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    logging.info("PPO summary: %s", summary)
    if step >= config.total_steps and not stages.is_complete(workdir):
      stages.export(
        workdir,
        state["policy"],
        {
          "kind": "policy",
          "model": cfg_model.to_dict(),
          "tokenizer": "tokenizer.model",
          "step": step,
          "eval": final,
        },
      )
  return loop.last_eval


# --------------------------------------------------------------- helpers


def _mark(result, timed: bool, clock: list[float]):
  """Blocks on `result` and records the time when `timed`; returns it unchanged."""
  if timed:
    jax.block_until_ready(result)
    clock.append(time.perf_counter())
  return result


def _drop_leading(sh: jax.sharding.NamedSharding, mesh) -> jax.sharding.NamedSharding:
  """The sharding of one ensemble member from the stacked [E, ...] sharding."""
  spec = tuple(sh.spec)[1:]
  return jax.sharding.NamedSharding(mesh, jax.P(*spec))
