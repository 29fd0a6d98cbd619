"""Statistics over seeds: intervals of a mean, paired and Welch differences, Holm's correction.

A sweep has few seeds per setting (often 3), so every interval here is a Student-t
interval, whose quantile grows as the seeds get fewer (4.30 at n = 3 for 95%), rather
than a normal one. Two settings run on the same seed values share their upstream
randomness (data order, initial policy, sampling), so their difference is taken per
seed and tested with a paired t test: the seed's own effect, often larger than the one
being measured, cancels. Without two shared seeds the comparison falls back to Welch's
unpaired t test. A family of comparisons (every pair of settings, or each against a
baseline) is corrected with Holm-Bonferroni.

Non-finite values (a diverged run's NaN) are left out of every statistic and counted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

nan = float("nan")


def _finite(values: Iterable[float]) -> tuple[np.ndarray, int]:
  """The finite values as a float array, and how many were not finite."""
  arr = np.asarray(list(values), dtype=np.float64).ravel()
  keep = np.isfinite(arr)
  return arr[keep], int(arr.size - keep.sum())


def t_quantile(confidence: float, df: float) -> float:
  """The two-sided Student-t critical value for `confidence` with `df` degrees of freedom."""
  return float(sps.t.ppf(0.5 + confidence / 2, df))


def summarize(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
  """The mean of `values` with its Student-t confidence interval.

  Args:
    values: one number per seed.
    confidence: the interval's coverage.
  Returns:
    n (the finite values), n_nan (the non-finite ones, NaN or inf, left out), mean,
    std (ddof=1), sem (std / sqrt(n)), half_width (t quantile * sem), low and high
    (mean -/+ half_width), and confidence. std, sem and the interval are NaN when
    n < 2; mean is NaN when n == 0.
  """
  arr, n_nan = _finite(values)
  n = int(arr.size)
  mean = float(arr.mean()) if n else nan
  if n >= 2:
    std = float(arr.std(ddof=1))
    sem = std / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * sem
  else:
    std = sem = half = nan
  return {
    "n": n,
    "n_nan": n_nan,
    "mean": mean,
    "std": std,
    "sem": sem,
    "half_width": half,
    "low": mean - half,
    "high": mean + half,
    "confidence": confidence,
  }


def bootstrap_interval(
  values: Iterable[float], confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0
) -> tuple[float, float]:
  """A percentile-bootstrap interval of the mean, deterministic for a `seed`.

  A cross-check, not a replacement for `summarize`'s t interval: with 3 seeds a
  resample can only draw from 3 values, so the bootstrap interval is too narrow (it
  cannot reach beyond the observed extremes) and the t interval is the one to trust.
  The bootstrap earns its keep from about 10-20 seeds, or for a skewed metric.

  Args:
    values: one number per seed; non-finite ones are left out.
    confidence: the interval's coverage.
    n_resamples: the number of resamples.
    seed: the resampling generator's seed.
  Returns:
    (low, high); (nan, nan) without a finite value.
  """
  arr, _ = _finite(values)
  if arr.size == 0:
    return nan, nan
  rng = np.random.default_rng(seed)
  means = arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))].mean(axis=1)
  alpha = 1.0 - confidence
  low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
  return float(low), float(high)


def _finite_items(values: Mapping[Hashable, float]) -> dict[Hashable, float]:
  out = {}
  for key, value in values.items():
    try:
      value = float(value)
    except (TypeError, ValueError):
      continue
    if math.isfinite(value):
      out[key] = value
  return out


def _t_test(mean: float, se: float, df: float, confidence: float) -> dict[str, Any]:
  """p value, interval and resolution of a t statistic mean / se; se == 0 is decided exactly."""
  alpha = 1.0 - confidence
  if se == 0.0:
    # No spread at all: a nonzero difference is certain, a zero one is no evidence.
    p = 0.0 if mean != 0.0 else 1.0
    low = high = mean
  else:
    p = float(2.0 * sps.t.sf(abs(mean / se), df))
    half = t_quantile(confidence, df) * se
    low, high = mean - half, mean + half
  return {"se": se, "df": df, "low": low, "high": high, "p_value": p, "resolved": p < alpha}


def paired_difference(
  a: Mapping[Hashable, float], b: Mapping[Hashable, float], confidence: float = 0.95
) -> dict[str, Any]:
  """The difference a - b of two settings' means, paired on their shared seeds when it can be.

  With 2 or more shared seeds: a paired t test on the per-seed differences a[s] - b[s]
  over the shared seeds (seeds only one side has are left out). Otherwise Welch's
  unpaired t test over all the values of each side. Non-finite values are left out
  first, as if that seed had not run.

  Args:
    a: seed key (any hashable, e.g. a tuple of seed values) -> metric value.
    b: the same for the other setting.
    confidence: the interval's coverage; "resolved" is p < 1 - confidence, the same as
      the interval excluding 0.
  Returns:
    paired (bool); test ("paired t", "Welch t" or None); n (the shared seeds when
    paired, else [n_a, n_b]); mean (of a - b); std (of one seed's difference: of the
    per-seed differences when paired, sqrt(var_a + var_b) for Welch); se (of the mean
    difference); df; low and high (the interval of the difference); p_value
    (two-sided); resolved; reason (None, or why no test could be made: then p_value
    and the interval are NaN and resolved is False). When the differences have no
    spread (all equal) p is 0 if they are nonzero, else 1.
  """
  a, b = _finite_items(a), _finite_items(b)
  shared = [key for key in a if key in b]
  if len(shared) >= 2:
    diffs = np.array([a[key] - b[key] for key in shared])
    n = len(shared)
    mean = float(diffs.mean())
    std = float(diffs.std(ddof=1))
    out = {"paired": True, "test": "paired t", "n": n, "mean": mean, "std": std}
    out.update(_t_test(mean, std / math.sqrt(n), n - 1, confidence))
    out["reason"] = None
    return out

  va, vb = np.array(list(a.values())), np.array(list(b.values()))
  na, nb = int(va.size), int(vb.size)
  mean = float(va.mean() - vb.mean()) if na and nb else nan
  out = {"paired": False, "n": [na, nb], "mean": mean}
  if na < 2 or nb < 2:
    out.update(
      test=None,
      std=nan,
      se=nan,
      df=nan,
      low=nan,
      high=nan,
      p_value=nan,
      resolved=False,
      reason=(
        f"too few seeds: {len(shared)} shared (pairing needs 2), "
        f"{na} and {nb} in all (Welch needs 2 on each side)"
      ),
    )
    return out
  var_a, var_b = float(va.var(ddof=1)), float(vb.var(ddof=1))
  sa, sb = var_a / na, var_b / nb
  se2 = sa + sb
  # Welch-Satterthwaite degrees of freedom; irrelevant when se2 == 0 (decided exactly).
  df = se2**2 / (sa**2 / (na - 1) + sb**2 / (nb - 1)) if se2 > 0 else float(na + nb - 2)
  out.update(test="Welch t", std=math.sqrt(var_a + var_b))
  out.update(_t_test(mean, math.sqrt(se2), df, confidence))
  out["reason"] = None
  return out


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p values, in the input's order.

  The k-th smallest of m p values is multiplied by m - k + 1, then made monotone (each
  adjusted value is at least the one before it in sorted order) and capped at 1.
  Rejecting where the adjusted p < alpha controls the family-wise error rate at alpha.
  NaN stays NaN and does not count in m.
  """
  p = np.asarray(p_values, dtype=np.float64)
  out = np.full(p.shape, nan)
  valid = np.flatnonzero(~np.isnan(p))
  m = valid.size
  if m:
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
  return [float(x) for x in out]


def compare(
  groups: Mapping[str, Mapping[Hashable, float]],
  baseline: str | None = None,
  confidence: float = 0.95,
  max_all_pairs: int = 10,
) -> list[dict[str, Any]]:
  """A family of comparisons between groups, Holm-corrected together.

  Every pair (a the earlier label in `groups`' order, b the later) when `baseline` is
  None and there are at most `max_all_pairs` groups; otherwise each other group (a)
  against the baseline (b), the first group when `baseline` is None, so each difference
  reads as "this group minus the baseline".

  Args:
    groups: label -> {seed key: metric value}.
    baseline: the label every group is compared with, or None.
    confidence: the intervals' coverage; the family is tested at alpha = 1 - confidence.
    max_all_pairs: the most groups compared all against all.
  Returns:
    One dict per comparison: a, b, `paired_difference`'s keys, p_holm (Holm's adjusted p
    over the family's p values) and resolved_holm (p_holm < alpha).
  Raises:
    ValueError: `baseline` is not a label of `groups`.
  """
  labels = list(groups)
  if baseline is not None and baseline not in groups:
    raise ValueError(f"baseline {baseline!r} is not one of the groups {labels}")
  if baseline is None and len(labels) <= max_all_pairs:
    pairs = [(x, y) for i, x in enumerate(labels) for y in labels[i + 1 :]]
  else:
    base = labels[0] if baseline is None else baseline
    pairs = [(x, base) for x in labels if x != base]
  rows = [{"a": x, "b": y, **paired_difference(groups[x], groups[y], confidence)} for x, y in pairs]
  alpha = 1.0 - confidence
  for row, p in zip(rows, holm([row["p_value"] for row in rows]), strict=True):
    row["p_holm"] = p
    row["resolved_holm"] = bool(p < alpha)  # NaN compares False
  return rows


def fit_gao(d: Iterable[float], gain: Iterable[float], form: str = "rl") -> dict[str, Any]:
  """Least-squares fit of Gao et al. (2022)'s gold-reward curve to (d, gain) points.

  d is sqrt(KL to the initial policy), gain the gold reward over the initial policy's.
  The RL form is gain = d (alpha - beta log d), the best-of-n form gain = d (alpha - beta d);
  both are linear in (alpha, beta), so ordinary least squares fits them (no intercept: the
  gain is 0 at d = 0). Points with d <= 0 or a non-finite value are left out.

  Returns:
    form, n (points used), alpha, beta, r2 (the coefficient of determination of the gains
    about their mean), d_peak and gain_peak (where the fitted curve tops out, and its value
    there; NaN when it does not turn over, beta <= 0). NaN figures with fewer than 3 points.
  """
  if form not in ("rl", "bon"):
    raise ValueError(f"form={form!r}; expected 'rl' or 'bon'.")
  d = np.asarray(list(d), np.float64)
  y = np.asarray(list(gain), np.float64)
  keep = np.isfinite(d) & np.isfinite(y) & (d > 0)
  d, y = d[keep], y[keep]
  out: dict[str, Any] = dict(
    form=form, n=int(d.size), alpha=nan, beta=nan, r2=nan, d_peak=nan, gain_peak=nan
  )
  if d.size < 3:
    return out
  second = -d * np.log(d) if form == "rl" else -d * d
  design = np.stack([d, second], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
  fitted = design @ np.array([alpha, beta])
  total = float(np.sum((y - y.mean()) ** 2))
  out.update(alpha=float(alpha), beta=float(beta))
  out["r2"] = 1.0 - float(np.sum((y - fitted) ** 2)) / total if total > 0 else nan
  if beta > 0:
    peak = math.exp(alpha / beta - 1.0) if form == "rl" else alpha / (2.0 * beta)
    out["d_peak"] = peak
    out["gain_peak"] = gao_curve(peak, alpha, beta, form)
  return out


def gao_curve(d: Any, alpha: float, beta: float, form: str = "rl") -> Any:
  """The fitted gain at d (a number or an array): d (alpha - beta log d), or d (alpha - beta d)."""
  d = np.asarray(d, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    second = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0) if form == "rl" else d * d
  out = alpha * d - beta * second
  return float(out) if out.ndim == 0 else out
