"""Synthetic eval sequences for the monitor's tests: an over-optimising run and a benign one.

Over-optimisation (the Gao et al. 2022 picture, exaggerated): the proxy keeps rising and pays
for length, the judge rises for 5 evals then falls, responses grow and loop on a phrase, the
reward-model members disagree more and more, entropy collapses and KL spikes at eval 9.
Benign: proxy and judge rise together, lengths and wording stay put, KL grows slowly.
"""

import itertools

import numpy as np

N = 64  # eval prompts
E = 3  # reward-model members
EVALS = 12
VOCAB = ["".join(w) for w in itertools.product("abcdefghij", "klmnopqrst", "uv")]  # 200
PHRASE = ["great", "answer", "indeed"]
PROMPTS = [f"prompt {i}: tell me about {VOCAB[i]}" for i in range(N)]


def _response(rng, length, loop):
  if not loop:
    return " ".join(rng.choice(VOCAB, size=length))
  head = list(rng.choice(VOCAB, size=length // 4))
  tail = (PHRASE * length)[: length - len(head)]
  return " ".join(head + tail)


def eval_inputs(t: int, kind: str, seed: int = 0) -> dict:
  """The keyword arguments of `Monitor.update` for eval t (step 10 t) of a run of `kind`."""
  rng = np.random.default_rng([seed, t, kind == "overopt"])
  over = kind == "overopt"
  base = 20 + 4 * t if over else 20
  lengths = base + rng.integers(-8, 9, size=N)
  loop_rate = min(0.05 + 0.1 * t, 1.0) if over else 0.0
  responses = [_response(rng, int(n), rng.random() < loop_rate) for n in lengths]
  if over:
    proxy = 0.3 * t + 0.15 * (lengths - base) + rng.normal(0, 0.5, N)
    gold_mean = 0.2 * t if t <= 5 else 1.0 - 0.25 * (t - 5)
    spread = 0.3 * (1 + 0.15 * t)
    kl = 0.5 * t * (10 if t == 9 else 1)
    entropy = 2.0 * (1 - 0.07 * t)
  else:
    proxy = 0.2 * t + 0.02 * (lengths - base) + rng.normal(0, 1.0, N)
    gold_mean = 0.15 * t
    spread = 0.3
    kl = 0.3 * t
    entropy = 2.0 * (1 - 0.01 * t)
  judge = gold_mean + rng.normal(0, 1.0, N)
  members = proxy[None, :] + rng.normal(0, spread, (E, N))
  return dict(
    prompts=PROMPTS,
    responses=responses,
    proxy=proxy,
    judge=judge,
    member_scores=members,
    kl=np.full(N, kl) + rng.normal(0, 0.01, N),
    entropy=entropy,
  )


def run(monitor, kind: str, evals: range = range(EVALS), seed: int = 0) -> list[dict]:
  """The monitor's metrics of each eval of the sequence (eval t at step 10 t)."""
  return [monitor.update(10 * t, **eval_inputs(t, kind, seed)) for t in evals]
