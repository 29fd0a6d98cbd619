"""Which pairs are worth a rater's time: active selection of preference pairs.

The feedback loop (`trainers/loop.py`) samples K responses per prompt from the current
policy; every pair of them is a candidate. A strategy picks `n` candidates to label:

  random                 uniformly, without replacement.
  ensemble_disagreement  the largest spread, across the reward-model ensemble's members, of
                         the score difference s_e(a) - s_e(b): where the members disagree,
                         a label teaches the most (query by committee).
  uncertainty            the ensemble-mean preference p = sigmoid(mean_e(s_e(a) - s_e(b)))
                         closest to 1/2: the pairs the model cannot call.
  diverse                greedy farthest-point coverage of the pairs' bag-of-words features
                         (the words in which a and b differ, and the prompt's), so the
                         labels spread over what the policy writes rather than bunch.

The strategies that read scores need a reward model (`scores`, [E, P, K] normalised member
scores); ensemble_disagreement needs E >= 2. Ties in a strategy's criterion are broken by a
seeded random order, so a selection is a pure function of its inputs and seed.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("random", "ensemble_disagreement", "uncertainty", "diverse")
NEEDS_SCORES = ("ensemble_disagreement", "uncertainty")

_WORD = re.compile(r"[\w']+")


def candidate_pairs(responses: Sequence[Sequence[str]]) -> np.ndarray:
  """[N, 3] int (prompt index, i, j), i < j, over every prompt's responses: each pair of
  distinct, non-empty texts once (a pair of equal texts carries no preference)."""
  out = []
  for p, texts in enumerate(responses):
    seen: set[tuple[str, str]] = set()
    for i, j in itertools.combinations(range(len(texts)), 2):
      a, b = texts[i], texts[j]
      if not a.strip() or not b.strip() or a == b or (a, b) in seen or (b, a) in seen:
        continue
      seen.add((a, b))
      out.append((p, i, j))
  return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _top(criterion: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of the n largest values of `criterion`, ties in a random order."""
  order = rng.permutation(len(criterion))
  ranked = order[np.argsort(-criterion[order], kind="stable")]
  return np.sort(ranked[:n])


def _features(prompts: Sequence[str], responses, pairs: np.ndarray) -> np.ndarray:
  """[N, V] L2-normalised counts of the words a and b do not share, plus the prompt's."""
  rows = []
  for p, i, j in pairs:
    a = collections.Counter(_WORD.findall(responses[p][i].lower()))
    b = collections.Counter(_WORD.findall(responses[p][j].lower()))
    diff = (a - b) + (b - a)
    diff.update({f"prompt:{w}": 1 for w in _WORD.findall(prompts[p].lower())})
    rows.append(diff)
  vocab = {w: k for k, w in enumerate(sorted(set().union(*rows)))} if rows else {}
  x = np.zeros((len(rows), max(len(vocab), 1)), np.float64)
  for r, counts in enumerate(rows):
    for w, c in counts.items():
      x[r, vocab[w]] = c
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 0, norms, 1.0)


def farthest_points(features: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Greedy k-center: a random first point, then each time the point farthest (1 - cosine)
  from every point chosen so far. Returns the n indices, sorted."""
  count = len(features)
  n = min(n, count)
  if n == 0:
    return np.zeros(0, np.int64)
  chosen = [int(rng.integers(count))]
  distance = 1.0 - features @ features[chosen[0]]
  # A random tie-break among equally far points: a tiny, fixed jitter.
  jitter = rng.random(count) * 1e-9
  for _ in range(n - 1):
    distance[chosen[-1]] = -np.inf
    nxt = int(np.argmax(distance + jitter))
    chosen.append(nxt)
    distance = np.minimum(distance, 1.0 - features @ features[nxt])
  return np.sort(np.asarray(chosen, np.int64))


def select(
  strategy: str,
  pairs: np.ndarray,
  n: int,
  rng: np.random.Generator,
  *,
  scores: np.ndarray | None = None,
  prompts: Sequence[str] = (),
  responses: Sequence[Sequence[str]] = (),
) -> tuple[np.ndarray, np.ndarray]:
  """(indices into `pairs` of the n chosen, sorted; the strategy's criterion for every
  candidate, NaN for random). `scores`: [E, P, K] member scores for the score strategies;
  `prompts`/`responses` (the texts) for diverse."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown selection strategy {strategy!r}; one of {STRATEGIES}")
  n = min(n, len(pairs))
  criterion = np.full(len(pairs), np.nan)
  if strategy == "random":
    return np.sort(rng.choice(len(pairs), size=n, replace=False)), criterion
  if strategy == "diverse":
    return farthest_points(_features(prompts, responses, pairs), n, rng), criterion
  if scores is None:
    raise ValueError(f"strategy {strategy!r} needs reward-model scores")
  p, i, j = pairs.T
  diff = scores[:, p, i] - scores[:, p, j]  # [E, N]
  if strategy == "ensemble_disagreement":
    if scores.shape[0] < 2:
      raise ValueError("ensemble_disagreement needs a reward model of 2 or more members")
    criterion = diff.std(axis=0)
  else:  # uncertainty: closeness of the mean preference to 1/2
    preference = 1.0 / (1.0 + np.exp(-diff.mean(axis=0)))
    criterion = -np.abs(preference - 0.5)
  return _top(criterion, n, rng), criterion
