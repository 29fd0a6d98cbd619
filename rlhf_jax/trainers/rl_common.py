"""What the policy-optimisation trainers (PPO, GRPO/RLOO, DPO, best-of-n) share.

Upstream stages trained on demand, the response log-prob and reward-model
score functions that every method jits into its own programs, the prompt
loader, the held-out evaluation on the testbed (gold reward, proxy reward,
KL to the reference, win rate against SFT), and the summary every method
writes, so `experiments/compare.py` can put them in one table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import config_utils, metrics, models, sharding, stages, utils
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data.testbed import config as testbed_config
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.rl.logprobs import token_logprobs
from rlhf_jax.trainers import common

# ------------------------------------------------------------------- config

# Fields every policy optimiser shares: upstream stages, sampling, evaluation.
UPSTREAM_FIELDS: dict[str, cs.Check] = {
  "policy_init": cs.FinishedStage("policy"),
  "reward_init": cs.FinishedStage("reward"),
  "sft": cs.Stage(unless="policy_init"),
  "reward": cs.Stage(unless="reward_init"),
}
SAMPLING_FIELDS: dict[str, cs.Check] = {
  "prompt_len": cs.Int(min=1),
  "max_new_tokens": cs.Int(min=1),
  "temperature": cs.Float(gt=0),
}
MISSING_EOS_FIELDS: dict[str, cs.Check] = {
  "missing_eos_penalty": cs.Bool(),
  "missing_eos_score": cs.Float(),
}
PROMPT_DATA_SPEC = cs.Spec(
  {"num_prompts": cs.Int(min=1), "seed": cs.Int(min=0), "testbed": testbed_config.CONFIG_SPEC}
)
EVAL_SPEC = cs.Spec({"num_prompts": cs.Int(min=1)})
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


# ------------------------------------------------------------------ upstream


def ensure_sft(config, workdir) -> str:
  """The SFT stage: `config.policy_init`, or trained on demand into `<workdir>/sft`."""
  sft_dir = config.policy_init or os.path.join(workdir, "sft")
  if not stages.is_complete(sft_dir):
    if config.policy_init:
      raise FileNotFoundError(f"config.policy_init={sft_dir!r} holds no finished SFT stage.")
    logging.info("Training the SFT stage into %s", sft_dir)
    config_utils.run(config.sft, sft_dir)
  return sft_dir


def ensure_reward(config, workdir, sft_dir: str) -> str:
  """The reward stage: `config.reward_init`, or trained on `sft_dir` into `<workdir>/reward`."""
  reward_dir = config.reward_init or os.path.join(workdir, "reward")
  if not stages.is_complete(reward_dir):
    if config.reward_init:
      raise FileNotFoundError(f"config.reward_init={reward_dir!r} holds no finished reward stage.")
    reward_cfg = ml_collections.ConfigDict(config.reward.to_dict())
    reward_cfg.policy_init = sft_dir
    logging.info("Training the reward stage into %s", reward_dir)
    config_utils.run(reward_cfg, reward_dir)
  return reward_dir


def ensure_stages(config, workdir) -> tuple[str, str]:
  """Workdirs of the SFT and reward stages, trained on demand into <workdir>/{sft,reward}."""
  sft_dir = ensure_sft(config, workdir)
  return sft_dir, ensure_reward(config, workdir, sft_dir)


# ------------------------------------------------------ jittable functions


def response_logps_fn(module, prompt_len: int, max_new_tokens: int, temperature: float):
  """f(params, full [B,P+N], fmask, response [B,N]) -> (log-probs [B,N], logits [B,N,V]).

  Log-probs of the response tokens under `module` at the sampling
  temperature, from the positions that predict them (position t predicts
  token t+1), so they equal the sampler's log-probs for the same params.
  """

  def fn(params, full, fmask, response):
    logits, *_ = module.apply(
      {"params": params},
      full,
      models.positions_from_mask(fmask),
      models.causal_attention_mask(fmask),
    )
    resp_logits = logits[:, prompt_len - 1 : prompt_len + max_new_tokens - 1]
    return token_logprobs(resp_logits, response, temperature), resp_logits

  return fn


def policy_sampler(module, policy: stages.Policy, config, mesh, rules):
  """The jitted, sharded sampler of `module` with `config.max_new_tokens` and `.temperature`.

  Params passed to it must have `policy.shardings` (the SFT policy's layout).
  """
  tok = policy.tokenizer
  sample_cfg = sampler_lib.SamplerConfig(
    max_new_tokens=config.max_new_tokens,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
    temperature=config.temperature,
  )
  return sampler_lib.make_sampler(
    module, sample_cfg, mesh=mesh, rules=rules, param_shardings=policy.shardings
  )


def gather_last(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [..., B, S] at index [B] along the last axis -> [..., B]."""
  return jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]


def rm_score_fn(rm: stages.RewardModel, prompt_len: int):
  """f(full [B,P+N], fmask, rmask [B,N]) -> normalised ensemble-mean score [B].

  The score is read at each response's last token (index prompt_len +
  length - 1): the classic off-by-one is reading one past it, at padding.
  """

  def fn(full, fmask, rmask):
    last = prompt_len + jnp.maximum(jnp.sum(rmask, axis=-1) - 1, 0)
    positions = models.positions_from_mask(fmask)
    attn = models.causal_attention_mask(fmask)

    def member(params):
      return gather_last(rm.module.apply({"params": params}, full, positions, attn), last)

    raw = jax.vmap(member)(rm.params)
    return jnp.mean(rm.gain * raw + rm.bias, axis=0)

  return fn


def drop_leading(sh: jax.sharding.NamedSharding, mesh) -> jax.sharding.NamedSharding:
  """The sharding of one ensemble member from the stacked [E, ...] sharding."""
  return jax.sharding.NamedSharding(mesh, jax.P(*tuple(sh.spec)[1:]))


# ------------------------------------------------------------------ prompts


def prompt_loader(config, tok, batch_size: int) -> loader_lib.Loader:
  """Deterministic, checkpointable loader of left-padded testbed training prompts."""
  from rlhf_jax.data import testbed

  prompts = testbed.prompts("train", config.data.num_prompts, config.data.seed, config.data.testbed)

  def collate(examples):
    tokens, mask = common.left_pad_prompts(tok, [e["prompt"] for e in examples], config.prompt_len)
    return {"tokens": tokens, "mask": mask}

  return loader_lib.Loader(
    [{"prompt": p} for p in prompts],
    global_batch_size=batch_size,
    seed=config.seed,
    collate=collate,
  )


# ------------------------------------------------------------------- eval


class Evaluator:
  """Held-out evaluation on the testbed, the same for every method.

  Samples one response per held-out prompt (fixed RNG) from the given
  policy params, and reports `eval/gold_reward` (the testbed's gold reward),
  `eval/proxy_reward` (the reward model), `eval/win_rate_vs_sft` (gold, against
  the SFT policy's samples on the same prompts), `eval/kl_to_ref` (sequence
  KL to the SFT policy, sum over tokens of log pi - log ref on the samples),
  `eval/sqrt_kl`, response length, fraction without EOS and distinct-2.
  Writes the samples to `<workdir>/samples/step_NNNNNNN.jsonl`.
  """

  def __init__(self, config, workdir, *, sft, rm, sample_fn, logps_fn, mesh, rules):
    from rlhf_jax.data import testbed

    self._testbed = testbed
    self.workdir = workdir
    self.sft, self.rm = sft, rm
    self.mesh, self.rules = mesh, rules
    self.tok = sft.tokenizer
    tb = config.data.testbed
    self.prompts = testbed.prompts("eval", config.eval.num_prompts, config.data.seed + 1, tb)
    self.gold_fn = lambda p, r: testbed.gold_reward(p, r, tb)
    self.tokens, self.mask = common.left_pad_prompts(self.tok, self.prompts, config.prompt_len)
    self.rng = jax.random.key(config.seed + 101)
    self.sample_fn = sample_fn
    self._logps = jax.jit(logps_fn)
    self._score = jax.jit(rm_score_fn(rm, config.prompt_len)) if rm is not None else None
    self.sft_texts, _ = self.sample(sft.params)
    self.sft_gold = self.gold(self.sft_texts)

  def gold(self, texts: list[str]) -> np.ndarray:
    return np.asarray([self.gold_fn(p, r) for p, r in zip(self.prompts, texts, strict=True)])

  def sample(self, params) -> tuple[list[str], dict[str, np.ndarray]]:
    """Texts, and host arrays: proxy score, sequence KL to the reference, lengths, has_eos."""
    with sharding.use_mesh(self.mesh, self.rules):
      out = self.sample_fn(
        params,
        sharding.global_from_full(self.tokens, self.mesh),
        sharding.global_from_full(self.mask, self.mesh),
        self.rng,
      )
      full = jnp.concatenate([jnp.asarray(self.tokens), out.tokens], axis=1)
      fmask = jnp.concatenate([jnp.asarray(self.mask), out.response_mask], axis=1)
      logp, _ = self._logps(params, full, fmask, out.tokens)
      ref, _ = self._logps(self.sft.params, full, fmask, out.tokens)
      kl = jnp.sum((logp - ref) * out.response_mask, axis=-1)
      proxy = self._score(full, fmask, out.response_mask) if self._score else jnp.zeros_like(kl)
    texts = self.tok.decode_batch(sharding.fetch(out.tokens))
    arrays = dict(proxy=proxy, kl=kl, lengths=out.lengths, has_eos=out.has_eos.astype(jnp.float32))
    return texts, {k: np.asarray(sharding.fetch(v)) for k, v in arrays.items()}

  def report(self, step: int, texts, gold, proxy, kl, lengths, no_eos) -> dict[str, float]:
    """The eval metrics of `texts` (one per held-out prompt); writes the samples file."""
    if jax.process_index() == 0:
      records = [
        {"step": step, "prompt": p, "response": r, "gold_reward": float(g), "proxy": float(s)}
        for p, r, g, s in zip(self.prompts, texts, gold, proxy, strict=True)
      ]
      path = os.path.join(self.workdir, "samples", f"step_{step:07d}.jsonl")
      utils.write_jsonl_atomic(path, records)
    kl = float(np.mean(kl))
    return {
      "eval/gold_reward": float(np.mean(gold)),
      "eval/proxy_reward": float(np.mean(proxy)),
      "eval/win_rate_vs_sft": self._testbed.win_rate(gold, self.sft_gold),
      "eval/kl_to_ref": kl,
      "eval/sqrt_kl": float(np.sqrt(max(kl, 0.0))),
      "eval/response_length": float(np.mean(lengths)),
      "eval/frac_no_eos": float(np.mean(no_eos)),
      "eval/distinct_2": self._testbed.distinct_n(texts, 2),
    }

  def __call__(self, params, step: int) -> dict[str, float]:
    texts, a = self.sample(params)
    return self.report(
      step, texts, self.gold(texts), a["proxy"], a["kl"], a["lengths"], 1.0 - a["has_eos"]
    )


# ---------------------------------------------------------------- summary


def write_summary(workdir: str, method: str, wall_time_s: float, **extra) -> dict[str, Any]:
  """`<workdir>/summary.json` from the step-0 (SFT) and last eval lines of metrics.jsonl.

  Keys shared by every method: sft_gold_reward, gold_reward, gold_reward_gain,
  sft_proxy_reward, proxy_reward, kl_to_ref, sqrt_kl, win_rate_vs_sft,
  wall_time_s (this stage's own time, upstream stages excluded), and `extra`.
  """
  evals = [r for r in metrics.read_metrics(workdir) if "eval/gold_reward" in r]
  first, final = evals[0], evals[-1]
  summary = {
    "method": method,
    "sft_gold_reward": first["eval/gold_reward"],
    "gold_reward": final["eval/gold_reward"],
    "gold_reward_gain": final["eval/gold_reward"] - first["eval/gold_reward"],
    "sft_proxy_reward": first["eval/proxy_reward"],
    "proxy_reward": final["eval/proxy_reward"],
    "kl_to_ref": final["eval/kl_to_ref"],
    "sqrt_kl": final["eval/sqrt_kl"],
    "win_rate_vs_sft": final["eval/win_rate_vs_sft"],
    "wall_time_s": wall_time_s,
    **extra,
  }
  if jax.process_index() == 0:
    utils.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  logging.info("%s summary: %s", method, summary)
  return summary


class StageClock:
  """Wall time of this stage across resumes: kept in checkpoint metadata by the trainer.

  Counts `previous` (the seconds earlier runs of the stage took, from the checkpoint)
  plus the time since `start` (a `time.perf_counter()` value; default now), so a
  trainer that starts the clock after its setup still counts the setup.
  """

  def __init__(self, previous: float = 0.0, start: float | None = None):
    self.previous = previous
    self._start = time.perf_counter() if start is None else start

  def elapsed(self) -> float:
    return self.previous + time.perf_counter() - self._start


def timed(result, enabled: bool, clock: list[float]):
  """Blocks on `result` and appends the time to `clock` when `enabled`; returns `result`."""
  if enabled:
    jax.block_until_ready(result)
    clock.append(time.perf_counter())
  return result


EvalFn = Callable[[Any, int], dict[str, float]]
