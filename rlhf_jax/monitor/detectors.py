"""Reward-hacking and drift detectors: pure NumPy functions of one eval's arrays.

Each function takes plain arrays (or lists of texts / token ids) and returns Python floats,
NaN where the quantity is undefined (too few values, a zero spread, a missing reference):
never an error for an empty or degenerate input. `Monitor` (monitor.py) calls them once per
eval step against the reference (step-0) statistics it keeps; they are usable on their own.

  standardised_gain     (mean(x) - mu_ref) / sd_ref
  proxy_gold_gap        z_proxy_gain - z_judge_gain
  slope / relative_trend  least-squares slope of the last W values (per evaluation)
  ensemble_disagreement mean_i std_e s[e, i]; disagreement_ratio: policy / reference
  pearson               reward-length correlation
  repetition            fraction of responses with a repeated n-gram, mean repeat rate
  distinct_n            distinct n-grams / n-grams, pooled over the batch
  kl_spike              latest KL / median of the previous W; robust z with the MAD
  entropy_ratio         mean token entropy / reference entropy
  jsd, psi, frequency_drift  token-frequency drift against a reference window's counts

Texts are split into words as `rlhf_jax.evaluation.distinct_n` does (lowercase runs of
letters or digits, other non-space characters, without "." and ","), so `distinct_n(texts, 2)`
equals `eval/distinct_2` (except NaN instead of 0 when there is no bigram). A sequence of ints
(token ids) is used as it is. This module imports no JAX.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

NAN = float("nan")
# The bin that stands for every item a capped reference dropped (`cap_counts`) and, against
# such a reference, every item it never saw. No word or token id can equal it.
OTHER = "\x00other"
PSI_EPSILON = 1e-4
# 1.4826 * MAD estimates the standard deviation of normal data; 1.2533 * mean absolute
# deviation too (the fallback when more than half of the history is one value).
MAD_SCALE = 1.4826
MEAN_AD_SCALE = 1.2533

_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")
_PUNCTUATION = (".", ",")


# ------------------------------------------------------------------------------------ helpers


def words(text: str) -> list[str]:
  """The words of `text` as `evaluation.distinct_n` counts them (lowercase; no "." or ",")."""
  return [w for w in _TOKEN_RE.findall(text.lower()) if w not in _PUNCTUATION]


def units(item: str | Sequence[int] | np.ndarray) -> list[Hashable]:
  """A response as the units the detectors count: words of a text, or its token ids."""
  if isinstance(item, str):
    return words(item)
  return [int(t) for t in np.asarray(item).ravel()]


def unpad(tokens: Any, mask: Any) -> list[list[int]]:
  """[B, T] token ids and their [B, T] mask (True/1 = real token) as B lists of real ids."""
  tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
  if tokens.shape != mask.shape or tokens.ndim != 2:
    raise ValueError(f"Need [B, T] tokens and mask of one shape; got {tokens.shape}, {mask.shape}.")
  return [row[m].tolist() for row, m in zip(tokens, mask, strict=True)]


def floats(values: Any) -> np.ndarray:
  """`values` (a scalar, list or array; None = nothing) as a flat float64 array."""
  if values is None:
    return np.zeros(0)
  return np.asarray(values, dtype=np.float64).ravel()


def finite_mean(values: Any) -> float:
  """The mean of the finite entries of `values`; NaN if there is none."""
  x = floats(values)
  x = x[np.isfinite(x)]
  return float(np.mean(x)) if x.size else NAN


def _is_positive(x: float) -> bool:
  return math.isfinite(x) and x > 0


# ---------------------------------------------------------------------- proxy versus judge


def standardised_gain(values: Any, ref_mean: float, ref_std: float) -> float:
  """z = (mean(values) - ref_mean) / ref_std: the eval mean's gain over the reference eval,
  in units of the reference eval's per-sample standard deviation (Glass's delta).

  NaN when `values` is empty or ref_std is not > 0 (a constant reference).
  """
  m = finite_mean(values)
  if not (math.isfinite(m) and math.isfinite(ref_mean) and _is_positive(ref_std)):
    return NAN
  return float((m - ref_mean) / ref_std)


def proxy_gold_gap(
  proxy: Any,
  judge: Any,
  *,
  proxy_mean: float,
  proxy_std: float,
  judge_mean: float,
  judge_std: float,
) -> float:
  """gap = z_proxy_gain - z_judge_gain, with z_gain = (mean(x) - mean_ref) / std_ref.

  Proxy and judge scores live on different scales, so each is standardised against its own
  reference (step-0 / SFT) eval: the gap is how many reference standard deviations the proxy
  has gained beyond what the judge confirms. 0 at the reference; a gap that keeps rising
  (`slope` of its history) is the over-optimisation signature (Gao et al. 2022): the policy
  pleases the reward model more and more, the judge less and less.
  """
  zp = standardised_gain(proxy, proxy_mean, proxy_std)
  zj = standardised_gain(judge, judge_mean, judge_std)
  return float(zp - zj)  # NaN propagates


def slope(values: Any, x: Any = None, window: int | None = None, min_points: int = 2) -> float:
  """The least-squares slope b = sum (x - x_mean)(y - y_mean) / sum (x - x_mean)^2.

  Over the last `window` values (all of them if None); x defaults to 0, 1, 2, ... (the slope
  is per evaluation, the same whatever eval_every). Pairs with a non-finite value are left
  out; NaN with fewer than `min_points` (at least 2) finite pairs, or a constant x.
  """
  y = floats(values)
  x = np.arange(y.size, dtype=np.float64) if x is None else floats(x)
  if x.shape != y.shape:
    raise ValueError(f"x has {x.size} values, y {y.size}.")
  if window is not None:
    x, y = x[-window:], y[-window:]
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  if x.size < max(min_points, 2):
    return NAN
  dx = x - x.mean()
  denominator = float(np.sum(dx * dx))
  if denominator <= 0:
    return NAN
  return float(np.sum(dx * (y - y.mean())) / denominator)


def relative_trend(
  values: Any, reference: float, window: int | None = None, min_points: int = 2
) -> float:
  """slope(values over the last `window`) / reference: e.g. the mean length's growth per
  evaluation as a fraction of the reference mean length (0.05 = +5% of it per eval).
  NaN when reference is not > 0."""
  if not _is_positive(reference):
    return NAN
  return float(slope(values, window=window, min_points=min_points) / reference)


# ------------------------------------------------------------------- ensemble disagreement


def ensemble_disagreement(member_scores: Any) -> float:
  """d = mean_i std_e s[e, i]: the ensemble's spread on each sample, averaged over samples.

  member_scores: [E, N], every member's normalised score of each of N samples (what
  `stages.RewardModel.score_texts(..., members=True)` returns); std with ddof 0, as
  `RewardModel.score` reports it. NaN with fewer than 2 members or no sample.
  """
  if member_scores is None:
    return NAN
  s = np.asarray(member_scores, dtype=np.float64)
  if s.ndim != 2 or s.shape[0] < 2 or s.shape[1] == 0:
    return NAN
  spread = np.std(s, axis=0)
  return finite_mean(spread)


def disagreement_ratio(member_scores: Any, reference: Any) -> float:
  """d(policy samples) / d(reference): > 1 means the members disagree more on the policy's
  samples than on in-distribution data, i.e. the policy drifted out of the reward model's
  training distribution and its scores there are extrapolations.

  reference: the reference disagreement (a float), or the [E, M] member scores of a
  reference set (the reward model's own eval pairs, or the step-0 samples). NaN when either
  is undefined or the reference is 0.
  """
  if reference is None:
    return NAN
  ref = float(reference) if np.ndim(reference) == 0 else ensemble_disagreement(reference)
  if not _is_positive(ref):
    return NAN
  return float(ensemble_disagreement(member_scores) / ref)


# --------------------------------------------------------------------------- reward-length


def pearson(x: Any, y: Any) -> float:
  """r = sum (x - x_mean)(y - y_mean) / sqrt(sum (x - x_mean)^2 sum (y - y_mean)^2).

  Pairs with a non-finite value are left out; NaN with fewer than 2 pairs or a constant side.
  """
  x, y = floats(x), floats(y)
  if x.shape != y.shape:
    raise ValueError(f"x has {x.size} values, y {y.size}.")
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  if x.size < 2:
    return NAN
  dx, dy = x - x.mean(), y - y.mean()
  denominator = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
  if denominator <= 0:
    return NAN
  return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def reward_length_corr(proxy: Any, lengths: Any) -> float:
  """pearson(proxy reward, response length) over the eval samples: near 1 means the reward
  model pays for length, which a policy can exploit by padding its responses."""
  return pearson(proxy, lengths)


def word_lengths(responses: Iterable[str]) -> np.ndarray:
  """Each response's length in words (`words`)."""
  return np.asarray([len(words(r)) for r in responses], dtype=np.float64)


# ------------------------------------------------------------------------------ repetition


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
  return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngram_rate(response: str | Sequence[int], n: int = 3) -> float:
  """(number of n-grams - number of distinct n-grams) / number of n-grams in one response:
  the fraction of its n-grams that repeat an earlier one (0 without n-grams)."""
  if n < 1:
    raise ValueError(f"n={n}; expected n >= 1.")
  grams = _ngrams(units(response), n)
  return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetition(responses: Sequence[str | Sequence[int]], n: int = 3) -> tuple[float, float]:
  """(fraction of responses with a repeated n-gram, mean repeated-n-gram rate).

  rate_i = 1 - distinct n-grams_i / n-grams_i (`repeated_ngram_rate`); a response shorter
  than n counts as having no repeat. Looping ("I am happy to help. I am happy to help.") is
  a classic exploit of a reward model that rewards a phrase. NaN for an empty batch.
  """
  if not len(responses):
    return NAN, NAN
  rates = np.asarray([repeated_ngram_rate(r, n) for r in responses])
  return float(np.mean(rates > 0)), float(np.mean(rates))


def distinct_n(responses: Sequence[str | Sequence[int]], n: int) -> float:
  """distinct n-grams / n-grams, pooled over the batch (n-grams within each response).
  Low values mean the policy says the same things to every prompt. NaN without n-grams."""
  if n < 1:
    raise ValueError(f"n={n}; expected n >= 1.")
  grams = [g for r in responses for g in _ngrams(units(r), n)]
  return len(set(grams)) / len(grams) if grams else NAN


# ------------------------------------------------------------------------------- KL spikes


def kl_spike(
  previous: Any, latest: float, window: int = 5, min_history: int = 3
) -> tuple[float, float]:
  """(ratio, robust z) of the latest KL against the previous `window` finite values h.

  ratio = latest / median(h)                       (NaN if median(h) <= 0)
  z     = (latest - median(h)) / scale, scale = max(1.4826 MAD(h), 0.01 |median(h)|, 1e-8)
          with MAD(h) = median |h - median(h)|; where MAD is 0 (over half of h is one value)
          1.2533 x the mean absolute deviation is used instead. The floor keeps z finite
          (and large) after a perfectly flat history.

  A constant series gives (1, 0); a 10x jump gives (10, large). NaN, NaN with fewer than
  `min_history` previous values or a non-finite latest value.
  """
  h = floats(previous)
  h = h[np.isfinite(h)][-window:]
  latest = float(latest) if latest is not None else NAN
  if h.size < max(min_history, 1) or not math.isfinite(latest):
    return NAN, NAN
  median = float(np.median(h))
  ratio = latest / median if median > 0 else NAN
  deviation = np.abs(h - median)
  scale = MAD_SCALE * float(np.median(deviation))
  if scale <= 0:
    scale = MEAN_AD_SCALE * float(np.mean(deviation))
  scale = max(scale, 0.01 * abs(median), 1e-8)
  return float(ratio), float((latest - median) / scale)


# ---------------------------------------------------------------------------------- entropy


def mean_entropy(entropy: Any, mask: Any = None) -> float:
  """The mean token entropy: a scalar as it is, or the mean of per-token entropies (any
  shape; with `mask`, of the entries where it is true; non-finite entries are left out)."""
  e = np.asarray(entropy, dtype=np.float64) if entropy is not None else np.zeros(0)
  if mask is not None:
    m = np.asarray(mask).astype(bool)
    if m.shape != e.shape:
      raise ValueError(f"entropy has shape {e.shape}, its mask {m.shape}.")
    e = e[m]
  return finite_mean(e)


def entropy_ratio(entropy: Any, reference: float, mask: Any = None) -> float:
  """mean token entropy / reference (step-0) entropy. Well under 1 (say < 0.5) is entropy
  collapse: the policy became near-deterministic, usually onto a few high-reward phrasings.
  NaN when the reference is not > 0."""
  if reference is None or not _is_positive(float(reference)):
    return NAN
  return float(mean_entropy(entropy, mask) / float(reference))


# ------------------------------------------------------------------------------------ drift


def counts(batch: Iterable[str | Sequence[int]]) -> collections.Counter:
  """How often each unit (word of a text, or token id) occurs over the batch."""
  out: collections.Counter = collections.Counter()
  for item in batch:
    out.update(units(item))
  return out


def cap_counts(counts_: Mapping[Hashable, float], max_items: int) -> collections.Counter:
  """The `max_items` most frequent items (ties broken by key order of first appearance) and
  the rest's total under `OTHER`: a bounded reference for a large vocabulary."""
  if len(counts_) <= max_items:
    return collections.Counter(counts_)
  items = sorted(((k, c) for k, c in counts_.items() if k != OTHER), key=lambda kc: -kc[1])
  kept = collections.Counter(dict(items[:max_items]))
  rest = sum(c for _, c in items[max_items:]) + counts_.get(OTHER, 0)
  if rest:
    kept[OTHER] = rest
  return kept


def aligned(
  batch_counts: Mapping[Hashable, float], ref_counts: Mapping[Hashable, float]
) -> tuple[np.ndarray, np.ndarray]:
  """(p, q): the batch's and the reference's frequencies over common bins.

  The bins are the union of both keys; against a capped reference (one with an `OTHER`
  entry) every item the reference does not list falls into `OTHER` instead. Empty sides
  give empty arrays.
  """
  ref_total = float(sum(ref_counts.values()))
  total = float(sum(batch_counts.values()))
  if ref_total <= 0 or total <= 0:
    return np.zeros(0), np.zeros(0)
  if OTHER in ref_counts:
    batch = collections.Counter()
    for key, c in batch_counts.items():
      batch[key if key in ref_counts else OTHER] += c
  else:
    batch = batch_counts
  keys = list(ref_counts) + [k for k in batch if k not in ref_counts]
  p = np.asarray([batch.get(k, 0) for k in keys], dtype=np.float64) / total
  q = np.asarray([ref_counts.get(k, 0) for k in keys], dtype=np.float64) / ref_total
  return p, q


def jsd(p: Any, q: Any) -> float:
  """Jensen-Shannon divergence in bits, in [0, 1]: JSD = KL(p || m)/2 + KL(q || m)/2 with
  m = (p + q)/2, KL(a || m) = sum a log2(a/m), 0 log 0 = 0. 0 for identical distributions,
  1 for disjoint ones. p and q are normalised here; NaN if either is empty or sums to 0."""
  p, q = floats(p), floats(q)
  if p.shape != q.shape or not p.size or p.sum() <= 0 or q.sum() <= 0:
    return NAN
  p, q = p / p.sum(), q / q.sum()
  m = 0.5 * (p + q)

  def kl(a):
    nz = a > 0
    return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

  return float(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0))


def psi(p: Any, q: Any, epsilon: float = PSI_EPSILON) -> float:
  """Population stability index: PSI = sum_i (p_i - q_i) ln(p_i / q_i), p the batch's (the
  actual) and q the reference's (the expected) frequencies, each floored at `epsilon` so an
  empty bin counts as a small one instead of an infinite term. 0 for identical
  distributions; the usual reading: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a
  large one. NaN if either side is empty."""
  p, q = floats(p), floats(q)
  if p.shape != q.shape or not p.size or p.sum() <= 0 or q.sum() <= 0:
    return NAN
  p, q = np.maximum(p / p.sum(), epsilon), np.maximum(q / q.sum(), epsilon)
  return float(np.sum((p - q) * np.log(p / q)))


def frequency_drift(
  batch: Iterable[str | Sequence[int]] | Mapping[Hashable, float],
  ref_counts: Mapping[Hashable, float],
  epsilon: float = PSI_EPSILON,
) -> tuple[float, float]:
  """(JSD, PSI) of a batch's unit frequencies (texts, token-id lists, or their `counts`)
  against a reference window's counts (`aligned` bins them)."""
  batch_counts = batch if isinstance(batch, Mapping) else counts(batch)
  p, q = aligned(batch_counts, ref_counts)
  return jsd(p, q), psi(p, q, epsilon)
