"""Held-out evaluation of a policy, the same for every RL method, with a choice of judge.

Every RL stage (PPO, GRPO, RLOO, DPO, best-of-n) evaluates through `Evaluator`: one
response per held-out prompt (fixed RNG), scored by

  the proxy   the reward the method optimises: the reward model (or, for GRPO/RLOO with a
              host reward function and no reward model, that function);
  the judge   `config.eval.judge`, the stand-in for the truth:
                "gold"            the testbed's gold reward;
                "rm:DIR"          a held-out judge reward model: a finished reward stage,
                                  usually trained on other labels than the proxy (the
                                  "gold reward model" of the over-optimisation literature);
                "pkg.mod:fn"      any function fn(prompts, responses) -> a float each;
                "proxy"           the proxy itself (no independent judge: the figures then
                                  say how well the policy pleases its own reward);
                "auto" (default)  "gold" on testbed prompts, else "proxy".

The metric names are the same whatever the judge (the judge's name is in `summary.json`
under "evaluator"): `eval/gold_reward` is the judge's mean score, `eval/win_rate_vs_sft`
the fraction of prompts where the judge prefers the policy's response to the starting
(SFT) policy's response on the same prompt (ties count half), with a percentile-bootstrap
95% interval over prompts in `eval/win_rate_vs_sft_low` / `_high`; `eval/proxy_reward`,
`eval/kl_to_ref` (sequence KL to the reference, the sum over tokens of log pi - log ref on
the samples), `eval/sqrt_kl`, `eval/response_length` (tokens), `eval/frac_no_eos` and
`eval/distinct_2` complete the line.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_spec as cs
from rlhf_jax import errors, sharding, stages, utils
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.monitor import detectors

JUDGES = ("auto", "gold", "proxy", "rm:DIR", "package.module:function")
NUM_BOOTSTRAP = 1000
LEVEL = 0.95

HostScoreFn = Callable[[list[str], list[str]], Sequence[float]]

EVAL_SPEC = cs.Spec({"num_prompts": cs.Int(min=1), "judge": cs.Str(nonempty=True)})


# ------------------------------------------------------------------------------- statistics


def win_rate_interval(
  a: Sequence[float] | np.ndarray,
  b: Sequence[float] | np.ndarray,
  *,
  level: float = LEVEL,
  num_resamples: int = NUM_BOOTSTRAP,
  seed: int = 0,
) -> tuple[float, float, float]:
  """(win rate of a over b, low, high): ties count half; a percentile bootstrap over items.

  a, b: [N] scores of two responses to the same N prompts. The interval resamples the
  prompts with replacement `num_resamples` times (fixed `seed`, so a rerun reports the same
  interval) and takes the (1 - level)/2 and (1 + level)/2 quantiles of the resampled rates.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f"Need two non-empty [N] arrays of one shape; got {a.shape}, {b.shape}.")
  wins = (a > b) + 0.5 * (a == b)
  rng = np.random.default_rng(seed)
  resampled = wins[rng.integers(0, wins.size, size=(num_resamples, wins.size))].mean(axis=1)
  low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
  return float(wins.mean()), float(low), float(high)


_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")
_PUNCTUATION = (".", ",")


def distinct_n(responses: Sequence[str], n: int) -> float:
  """Distinct word n-grams over all n-grams, pooled over responses (0 if there are none).

  Words are lowercase runs of letters or digits and other non-space characters, without
  "." and ",": on testbed responses, the testbed's own word count.
  """
  if n < 1:
    raise ValueError(f"n={n}; expected n >= 1.")
  grams = []
  for text in responses:
    words = [w for w in _TOKEN_RE.findall(text.lower()) if w not in _PUNCTUATION]
    grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------- judges


@dataclasses.dataclass
class Judge:
  """A named scorer of (prompt, response) texts; `fn` None means the proxy's own scores."""

  name: str
  fn: Callable[[list[str], list[str]], np.ndarray] | None


def import_function(name: str, key: str) -> HostScoreFn:
  """The function "package.module:function" names; ConfigError naming `key` otherwise."""
  if not isinstance(name, str) or name.count(":") != 1:
    raise cs.ConfigError(f"{key}={name!r}: expected 'package.module:function'.")
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise cs.ConfigError(f"{key}={name!r}: cannot import {module_name!r} ({error}).") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise cs.ConfigError(f"{key}={name!r}: {module_name} has no function {attr!r}.")
  return fn


def host_scores(fn: HostScoreFn, name: str, prompts: list[str], responses: list[str]):
  """fn(prompts, responses) as [N] float64, checked: one finite float per response."""
  out = fn(prompts, responses)
  try:
    scores = np.asarray(out, dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise errors.TrainingError(f"{name} returned {out!r}, not floats: {error}") from None
  if scores.shape != (len(responses),):
    raise errors.TrainingError(
      f"{name} returned shape {scores.shape} for {len(responses)} responses; "
      "expected one float per response."
    )
  if not np.all(np.isfinite(scores)):
    raise errors.TrainingError(f"{name} returned non-finite scores: {scores}.")
  return scores


def judge_name(config: Any, testbed_prompts: bool) -> str:
  """`config.eval.judge` with "auto" resolved: gold on testbed prompts, else the proxy."""
  name = config.eval.judge
  if name == "auto":
    return "gold" if testbed_prompts else "proxy"
  return name


def check_judge(config: Any, prefix: str, testbed_prompts: bool) -> None:
  """ConfigError naming `<prefix>.eval.judge` for a judge this config cannot use."""
  key = f"{prefix}.eval.judge"
  name = judge_name(config, testbed_prompts)
  if name in ("gold", "proxy"):
    if name == "gold" and not testbed_prompts:
      raise cs.ConfigError(
        f"{key}='gold': the gold reward exists only for the testbed's prompts.",
        hint=f"Set {key} to 'rm:DIR' (a judge reward model), 'package.module:function' or 'proxy'.",
      )
    return
  if name.startswith("rm:"):
    problem = cs.FinishedStage("reward").problem(name[3:])
    if problem or not name[3:]:
      raise cs.ConfigError(f"{key}={name!r}: {problem or 'names no directory'}.")
    return
  if ":" in name:
    import_function(name, key)
    return
  raise cs.ConfigError(f"{key}={name!r}: expected one of {', '.join(JUDGES)}.")


def make_judge(
  config: Any, *, testbed_prompts: bool, mesh, rules, max_len: int, batch_size: int
) -> Judge:
  """The judge `config.eval.judge` names (see the module docstring)."""
  check_judge(config, "config", testbed_prompts)
  name = judge_name(config, testbed_prompts)
  if name == "proxy":
    return Judge("proxy", None)
  if name == "gold":
    from rlhf_jax.data import testbed

    tb = config.data.testbed
    return Judge("gold", lambda p, r: np.asarray(testbed.gold_rewards(p, r, tb), np.float64))
  if name.startswith("rm:"):
    judge_rm = stages.load_reward_model(name[3:], mesh, rules)

    def score(prompts, responses):
      return judge_rm.score_texts(
        prompts, responses, mesh=mesh, rules=rules, max_len=max_len, batch_size=batch_size
      )

    return Judge(f"rm:{os.path.abspath(name[3:])}", score)
  fn = import_function(name, "config.eval.judge")
  return Judge(name, lambda p, r: host_scores(fn, f"config.eval.judge={name!r}", p, r))


# -------------------------------------------------------------------------------- evaluator


class Evaluator:
  """Samples the policy on held-out prompts and reports the eval line (module docstring).

  `proxy_score` is a jittable f(full, fmask, rmask) -> [B] (the reward model on device),
  or None; `proxy_host` a host function of texts (GRPO's reward function), used when
  `proxy_score` is None. The starting policy's samples (the SFT policy's, same RNG) are
  drawn and judged once, for the win rate. Samples go to
  `<workdir>/samples/step_NNNNNNN.jsonl`.
  """

  def __init__(
    self,
    workdir: str,
    *,
    prompts: Sequence[str],
    judge: Judge,
    sft: stages.Policy,
    sample_fn,
    logps_fn,
    proxy_score=None,
    proxy_host: HostScoreFn | None = None,
    prompt_len: int,
    seed: int,
    mesh,
    rules,
    watch=None,
    proxy_members=None,
  ):
    self.workdir = workdir
    self.watch = watch  # rlhf_jax.monitor.watch.Watch: detectors and alerts at every eval
    self.prompts = list(prompts)
    self.judge = judge
    self.sft = sft
    self.mesh, self.rules = mesh, rules
    self.tok = sft.tokenizer
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    # Padded to a multiple of the batch shards with copies of the first prompt (dropped).
    rows = -(-len(self.prompts) // shards) * shards
    padded = self.prompts + [self.prompts[0]] * (rows - len(self.prompts))
    self.tokens, self.mask = prompts_lib.left_pad(self.tok, padded, prompt_len)
    self.rng = jax.random.key(seed)
    self.sample_fn = sample_fn
    self._logps = jax.jit(logps_fn)
    self._entropy = jax.jit(_mean_token_entropy)
    self._proxy = jax.jit(proxy_score) if proxy_score is not None else None
    self._proxy_host = proxy_host
    self._members = jax.jit(proxy_members) if proxy_members is not None else None
    self.sft_texts, sft_arrays = self.sample(sft.params)
    self.sft_judged = self.score(self.sft_texts, sft_arrays["proxy"])

  def score(self, texts: list[str], proxy: np.ndarray) -> np.ndarray:
    """The judge's scores [N] of `texts` (one per held-out prompt)."""
    if self.judge.fn is None:
      return np.asarray(proxy, np.float64)
    return self.judge.fn(self.prompts, texts)

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
      logp, logits = self._logps(params, full, fmask, out.tokens)
      ref, _ = self._logps(self.sft.params, full, fmask, out.tokens)
      kl = jnp.sum((logp - ref) * out.response_mask, axis=-1)
      proxy = self._proxy(full, fmask, out.response_mask) if self._proxy else jnp.zeros_like(kl)
      entropy = self._entropy(logits, out.response_mask)
      members = self._members(full, fmask, out.response_mask) if self._members else None
    n = len(self.prompts)
    tokens = sharding.fetch(out.tokens)
    texts = self.tok.decode_batch(tokens)[:n]
    arrays = dict(
      proxy=proxy, kl=kl, lengths=out.lengths, has_eos=out.has_eos.astype(jnp.float32),
      entropy=entropy, response_mask=out.response_mask,
    )  # fmt: skip
    arrays = {k: np.asarray(sharding.fetch(v))[:n] for k, v in arrays.items()}
    arrays["tokens"] = np.asarray(tokens)[:n]
    if members is not None:
      arrays["members"] = np.asarray(sharding.fetch(members))[:, :n]
    if self._proxy is None and self._proxy_host is not None:
      arrays["proxy"] = host_scores(self._proxy_host, "the reward function", self.prompts, texts)
    return texts, arrays

  def report(self, step: int, texts, judged, proxy, kl, lengths, no_eos) -> dict[str, float]:
    """The eval metrics of `texts` (one per held-out prompt); writes the samples file."""
    if jax.process_index() == 0:
      records = [
        {"step": step, "prompt": p, "response": r, "gold_reward": float(g), "proxy": float(s)}
        for p, r, g, s in zip(self.prompts, texts, judged, proxy, strict=True)
      ]
      path = os.path.join(self.workdir, "samples", f"step_{step:07d}.jsonl")
      utils.write_jsonl_atomic(path, records)
    kl = float(np.mean(kl))
    rate, low, high = win_rate_interval(judged, self.sft_judged)
    return {
      "eval/gold_reward": float(np.mean(judged)),
      "eval/gold_reward_std": float(np.std(judged)),
      "eval/proxy_reward": float(np.mean(proxy)),
      "eval/win_rate_vs_sft": rate,
      "eval/win_rate_vs_sft_low": low,
      "eval/win_rate_vs_sft_high": high,
      "eval/kl_to_ref": kl,
      "eval/sqrt_kl": float(np.sqrt(max(kl, 0.0))),
      "eval/response_length": float(np.mean(lengths)),
      "eval/frac_no_eos": float(np.mean(no_eos)),
      "eval/distinct_2": distinct_n(texts, 2),
    }

  def __call__(self, params, step: int) -> dict[str, float]:
    texts, a = self.sample(params)
    judged = self.score(texts, a["proxy"])
    line = self.report(step, texts, judged, a["proxy"], a["kl"], a["lengths"], 1.0 - a["has_eos"])
    if self.watch is None:
      return line
    n = len(self.prompts)
    monitored = self.watch.observe(
      step, line, params=params, prompts=self.prompts, responses=texts, proxy=a["proxy"],
      judge=judged, lengths=a["lengths"], kl=a["kl"], entropy=a["entropy"],
      member_scores=a.get("members"),
      prompt_tokens=detectors.unpad(self.tokens[:n], self.mask[:n]),
      response_tokens=detectors.unpad(a["tokens"], a["response_mask"]),
    )  # fmt: skip
    return {**line, **monitored}


def _mean_token_entropy(logits, mask):
  """[B] mean entropy (nats, at temperature 1) of the next-token distributions over each
  row's real response tokens."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(entropy * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
