"""Reward-model math: Bradley-Terry loss, score readout, calibration, correlation.

All pure functions over arrays, float32. docs/rlhf_details.md, reward model section:
the score is read at the last response token (the EOS), the loss is
-log sigmoid(r_chosen - r_rejected - margin), ties are soft 0.5 labels, and an
optional centering term keeps scores near zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def last_token_scores(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Reads per-token scores at each row's last real token.

  Args:
    values: [..., T] per-token scalars from a ScalarModel.
    mask: [..., T] bool, True on real tokens of right-padded rows (the last
      real token is the EOS for a finished response).

  Returns:
    [...] float32 scores. A row with no real token reads position 0.
  """
  last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1) - 1, 0)
  return jnp.take_along_axis(values, last[..., None], axis=-1)[..., 0].astype(jnp.float32)


def bradley_terry_loss(
  chosen: jax.Array,
  rejected: jax.Array,
  *,
  margin: jax.Array | None = None,
  tie: jax.Array | None = None,
  target: jax.Array | None = None,
  weight: jax.Array | None = None,
  center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry preference loss with margins, soft labels, ties and centering.

  With z = r_c - r_r - margin and t the target probability that the chosen
  response is preferred, the loss is the cross-entropy -t log sigmoid(z) -
  (1 - t) log sigmoid(-z). A hard label (t = 1, the default) gives
  -log sigmoid(r_c - r_r - margin). A tie has t = 0.5 and no margin:
  -0.5 log sigmoid(d) - 0.5 log sigmoid(-d), minimised at d = 0. A soft
  label (e.g. from the rater's stated confidence) is minimised at
  sigmoid(z) = t. Centering adds center_coef * sum(w (r_c + r_r)^2) / sum(w),
  weighted like the NLL, so padding slots, dropped pairs and zero bootstrap
  weights neither pull their scores to zero nor dilute the other pairs' pull.

  Args:
    chosen, rejected: [B] float32 scores.
    margin: [B] float32 required score gap (0 for none).
    tie: [B] bool, the pair was labelled a tie (target 0.5, margin 0).
    target: [B] float32 in [0, 1], probability that chosen is preferred
      (1 for none); ties override it with 0.5.
    weight: [B] float32 per-pair weights (e.g. bootstrap weights, 0 on
      padding); the NLL and the centering term are both weighted means.
    center_coef: coefficient of the centering term (~0.01; 0 = off).

  Returns:
    (scalar loss, dict of [B] per-pair terms: "nll", "diff").
  """
  diff = chosen - rejected
  margin = jnp.zeros_like(diff) if margin is None else margin.astype(jnp.float32)
  tie = jnp.zeros(diff.shape, jnp.bool_) if tie is None else tie.astype(jnp.bool_)
  target = jnp.ones_like(diff) if target is None else target.astype(jnp.float32)
  weight = jnp.ones_like(diff) if weight is None else weight.astype(jnp.float32)
  z = jnp.where(tie, diff, diff - margin)
  t = jnp.where(tie, 0.5, target)
  nll = -(t * jax.nn.log_sigmoid(z) + (1.0 - t) * jax.nn.log_sigmoid(-z))
  total = jnp.maximum(jnp.sum(weight), 1e-6)
  loss = jnp.sum(weight * nll) / total
  if center_coef:
    loss = loss + center_coef * jnp.sum(weight * jnp.square(chosen + rejected)) / total
  return loss, {"nll": nll, "diff": diff}


def confidence_targets(
  confidence: np.ndarray, low: float, high: float, *, missing: float = 1.0
) -> np.ndarray:
  """Soft labels from rater-stated confidence: P(chosen preferred) per pair.

  Confidence `low` (a guess) maps to 0.5 and `high` (certain) to 1, linearly
  in between and clipped: on the testbed, where a rater reports
  c = 1 + round(4 |2p - 1|) on 1..5, this inverts the report to p ~ 0.5 + (c - 1) / 8.
  A missing (NaN) confidence gives `missing` (a hard label by default).
  """
  if not high > low:
    raise ValueError(f"confidence range ({low}, {high}): high must exceed low.")
  c = np.asarray(confidence, np.float64)
  t = 0.5 + 0.5 * np.clip((c - low) / (high - low), 0.0, 1.0)
  return np.where(np.isnan(c), missing, t).astype(np.float32)


def preference_accuracy(diff: np.ndarray, tie: np.ndarray | None = None) -> float:
  """Fraction of non-tie pairs with r_chosen > r_rejected (an exact tie counts half)."""
  diff = np.asarray(diff, np.float64)
  keep = np.ones(diff.shape, bool) if tie is None else ~np.asarray(tie, bool)
  d = diff[keep]
  if d.size == 0:
    return float("nan")
  return float(np.mean((d > 0) + 0.5 * (d == 0)))


def expected_calibration_error(diff: np.ndarray, tie=None, num_bins: int = 10) -> float:
  """ECE of the Bradley-Terry probability p = sigmoid(r_c - r_r) on non-tie pairs.

  The predicted label is the side with p >= 0.5 and its confidence max(p, 1-p);
  pairs are binned by confidence into `num_bins` equal-width bins over
  [0.5, 1], and ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|.
  """
  diff = np.asarray(diff, np.float64)
  keep = np.ones(diff.shape, bool) if tie is None else ~np.asarray(tie, bool)
  d = diff[keep]
  if d.size == 0:
    return float("nan")
  p = 1.0 / (1.0 + np.exp(-d))
  confidence = np.maximum(p, 1.0 - p)
  correct = (p >= 0.5).astype(np.float64)  # the label says chosen won
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = index == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(ece)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share the mean rank), as Spearman's rho needs."""
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i : j + 1]] = 0.5 * (i + j)
    i = j + 1
  return ranks


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return pearson(_ranks(x), _ranks(y))


def normalization(scores: np.ndarray) -> tuple[float, float]:
  """(gain, bias) with gain * scores + bias of mean 0 and std 1 (docs/rlhf_details.md)."""
  scores = np.asarray(scores, np.float64)
  std = float(scores.std())
  gain = 1.0 / std if std > 0 else 1.0
  return gain, -float(scores.mean()) * gain
