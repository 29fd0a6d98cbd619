"""Best-of-n against the reward model: no training, a curve of gold reward against KL.

    python -m experiments.launch --config=configs/best_of_n.py

For each held-out prompt, N = `config.num_samples` responses are sampled from
the SFT policy and scored by the reward model. For every n in `config.ns`
the run reports the expected judge ("gold") and proxy reward of the best-of-n choice
(the unbiased estimate over all n-subsets of the N samples,
rl/best_of_n.expected_best_of_n), its analytic KL to the SFT policy,
log n - (n-1)/n, and the win rate against the SFT samples of the shared
evaluator (by its judge, `config.eval.judge`, for one actual best-of-n draw: the
best of the first n samples). The metrics line for n is written at "step" n, after the
step-0 line every method writes for the SFT policy.

Sampling is done in chunks of prompts; each finished chunk is written
atomically to `<workdir>/candidates/`, so an interrupted run resumes where it
stopped and ends with the same figures as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import config_utils, exporters, metrics, rng, sharding, stages, utils
from rlhf_jax.rl import best_of_n
from rlhf_jax.trainers import common, rl_common

TIMING_METRICS = ()


def _check_ns(config, prefix: str) -> None:
  if max(config.ns) > config.num_samples:
    raise cs.ConfigError(
      f"{prefix}.ns has n={max(config.ns)} > {prefix}.num_samples={config.num_samples}: "
      "best-of-n needs at least n samples per prompt."
    )


# One declared check per field of configs/best_of_n.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    **rl_common.SAMPLING_FIELDS,
    "data": rl_common.PROMPT_DATA_SPEC,
    "num_samples": cs.Int(min=1),
    "ns": cs.Seq(cs.Int(min=1), min_len=1),
    "prompts_per_chunk": cs.Int(min=1),
    "eval": rl_common.EVAL_SPEC,
  },
  checks=(_check_ns, rl_common.check_eval, cs.mesh_batch("prompts_per_chunk*num_samples")),
)


def check_config(config) -> list[int]:
  """The sorted n values, after the declared checks (errors name the field)."""
  CONFIG_SPEC.validate(config)
  return sorted(int(n) for n in config.ns)


def train(config: Any, workdir: str) -> dict[str, float]:
  """Samples, scores and evaluates best-of-n; returns the eval metrics of the largest n."""
  os.makedirs(workdir, exist_ok=True)
  is_primary = jax.process_index() == 0
  ns = check_config(config)
  mesh = common.mesh_from_config(config)
  rules = config.sharding_rules

  # -------------------------------------------------------- upstream stages
  sft_dir = config_utils.require_stage(config, "policy_init")
  reward_dir = config_utils.require_stage(config, "reward_init")
  clock = time.perf_counter()
  sft = stages.load_policy(sft_dir, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules)
  tok = sft.tokenizer
  if is_primary:
    tok.save(os.path.join(workdir, tok.filename))
  p_len, n_new, n_samples = config.prompt_len, config.max_new_tokens, config.num_samples
  sample_fn = rl_common.sampler(sft, config, mesh, rules)
  logps_fn = rl_common.response_logps_fn(sft.module, p_len, n_new, config.temperature)
  prompt_set = rl_common.load_prompts(config, tok, workdir)
  evaluate = rl_common.make_evaluator(
    config,
    workdir,
    prompt_set.eval,
    sft=sft,
    rm=rm,
    sample_fn=sample_fn,
    logps_fn=logps_fn,
    mesh=mesh,
    rules=rules,
  )

  # ------------------------------------------------ candidates, in chunks
  score_fn = jax.jit(rl_common.rm_score_fn(rm, p_len))
  prompts = evaluate.prompts
  cand_dir = os.path.join(workdir, "candidates")
  os.makedirs(cand_dir, exist_ok=True)
  chunks = range(0, len(prompts), config.prompts_per_chunk)
  key = rng.key(config.seed, "candidates")
  results = []
  for index, start in enumerate(chunks):
    path = os.path.join(cand_dir, f"chunk_{index:05d}.json")
    if not os.path.exists(path):
      chunk = _sample_chunk(
        prompts[start : start + config.prompts_per_chunk],
        config.prompts_per_chunk,
        evaluate,
        sample_fn,
        score_fn,
        sft,
        jax.random.fold_in(key, index),
        n_samples,
        mesh,
        rules,
      )
      if is_primary:
        utils.write_json_atomic(path, chunk)
      logging.info("Best-of-n: sampled and scored chunk %d/%d", index + 1, len(chunks))
    else:
      with open(path) as f:
        chunk = json.load(f)
    results.append(chunk)
  cand = {
    k: np.concatenate([np.asarray(c[k]) for c in results]) for k in results[0] if k != "texts"
  }
  texts = [t for c in results for t in c["texts"]]  # [P * N], prompt-major

  # --------------------------------------------------------- the n curve
  # Every line is recomputed from the candidates, so an earlier attempt's lines go.
  writer = metrics.MetricWriter(
    workdir, resume_step=-1, exporter=common.make_exporter(config, workdir)
  )
  first = evaluate(sft.params, 0)
  metrics.check_finite(0, first, context="eval")
  writer.write(0, first)
  scores, gold = jnp.asarray(cand["scores"]), jnp.asarray(cand["gold"])
  last: dict[str, float] = {}
  for n in ns:
    # One actual draw (the best of the first n samples) for the win rate and the samples file.
    pick = np.asarray(best_of_n.best_index(scores[:, :n]))
    rows = np.arange(len(prompts)) * n_samples + pick
    kl = float(best_of_n.analytic_kl(n))
    line = evaluate.report(
      n,
      [texts[i] for i in rows],
      cand["gold"].reshape(-1)[rows],
      cand["scores"].reshape(-1)[rows],
      np.full(len(prompts), kl),
      cand["lengths"].reshape(-1)[rows],
      1.0 - cand["has_eos"].reshape(-1)[rows],
    )
    line["eval/gold_reward_draw"] = line["eval/gold_reward"]
    line["eval/gold_reward"] = float(jnp.mean(best_of_n.expected_best_of_n(scores, gold, n)))
    line["eval/proxy_reward"] = float(jnp.mean(best_of_n.expected_best_of_n(scores, scores, n)))
    line["eval/response_length"] = float(
      jnp.mean(best_of_n.expected_best_of_n(scores, jnp.asarray(cand["lengths"], jnp.float32), n))
    )
    line["bon/n"] = float(n)
    metrics.check_finite(n, line, context="eval")
    writer.write(n, line)
    last = line
  writer.close()
  rl_common.write_summary(
    workdir,
    "best_of_n",
    time.perf_counter() - clock,
    evaluator=evaluate.judge.name,
    n=ns[-1],
    num_samples=n_samples,
  )
  return last


def _sample_chunk(prompts, chunk_size, evaluate, sample_fn, score_fn, sft, key, n, mesh, rules):
  """N samples for each prompt of the chunk: texts, RM scores, gold, lengths, EOS flags."""
  tok = sft.tokenizer
  count = len(prompts)
  # A short last chunk is padded with copies of its first prompt: one compiled shape.
  padded = list(prompts) + [prompts[0]] * (chunk_size - count)
  tokens, mask = common.left_pad_prompts(tok, padded, evaluate.tokens.shape[1])
  tokens, mask = np.repeat(tokens, n, axis=0), np.repeat(mask, n, axis=0)
  with sharding.use_mesh(mesh, rules):
    out = sample_fn(
      sft.params,
      sharding.global_from_full(tokens, mesh),
      sharding.global_from_full(mask, mesh),
      key,
    )
    full = jnp.concatenate([jnp.asarray(tokens), out.tokens], axis=1)
    fmask = jnp.concatenate([jnp.asarray(mask), out.response_mask], axis=1)
    scores = score_fn(full, fmask, out.response_mask)
  keep = count * n
  texts = tok.decode_batch(sharding.fetch(out.tokens)[:keep])
  scores = np.asarray(sharding.fetch(scores))[:keep]
  # The judge's scores; with the proxy as judge, the reward model's own.
  if evaluate.judge.fn is None:
    gold = scores.astype(np.float64)
  else:
    gold = evaluate.judge.fn([p for p in prompts for _ in range(n)], texts)
  return {
    "texts": texts,
    "scores": scores.reshape(count, n).tolist(),
    "gold": np.asarray(gold, np.float64).reshape(count, n).tolist(),
    "lengths": np.asarray(sharding.fetch(out.lengths))[:keep].reshape(count, n).tolist(),
    "has_eos": np.asarray(sharding.fetch(out.has_eos), np.float64)[:keep]
    .reshape(count, n)
    .tolist(),
  }
