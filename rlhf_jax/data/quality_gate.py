"""The rater quality gate: which raters to trust, and whether a batch of labels is usable.

Built on the agreement report (`agreement.panel_report`), so it needs nothing but the
labels: per rater, agreement with the leave-one-out majority of the other raters, agreement
on the anchor pairs every rater sees, Cohen's kappa to the panel (the mean of the rater's
pairwise kappas with the others, over raters who share enough items), and the median time
between its labels (off by default). A threshold of 0 switches its check off. A rater is
flagged when any of these that could be computed falls below its threshold; a rater with
too few comparable items is flagged only when `flag_unknown` says so (a new rater is not
yet known to be careless). By `exclude`, flagged raters' labels are left out of training.
The batch as a whole fails when the panel's raw agreement, over the raters kept, is under
`min_panel_agreement`: too noisy to learn from, whoever is to blame.

    gate = quality_gate.check(records, config.gate)
    if not gate["passed"]: stop and show gate["reasons"]
    kept = quality_gate.keep(records, gate)

On the testbed, where it is known who the careless raters are, `scored` adds the gate's
precision and recall against them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import config_spec as cs
from rlhf_jax.data import agreement

# (report field per rater, gate threshold field): the per-rater statistics the gate reads.
CHECKS = (
  ("majority_agreement", "min_majority_agreement"),
  ("anchor_majority_agreement", "min_anchor_agreement"),
  ("kappa_to_panel", "min_kappa"),
  ("median_seconds", "min_median_seconds"),
)


def default_config() -> ml_collections.ConfigDict:
  """The gate's thresholds (see BUILD_NOTES.md for how they were set on the testbed)."""
  gate = ml_collections.ConfigDict()
  gate.min_majority_agreement = 0.55  # agreement with the others' majority, shared items
  gate.min_anchor_agreement = 0.55  # the same on the anchor pairs
  # Mean Cohen's kappa with the other raters; off by default: over a few shared items it
  # punishes raters who declare ties (a tie against a win counts as a disagreement).
  gate.min_kappa = 0.0
  # Median seconds between a rater's consecutive labels (their `time` fields); 0 is off.
  # Careless raters answer fast: one of the cues real annotation teams screen on.
  gate.min_median_seconds = 0.0
  gate.min_items = 5  # fewer comparable items: the statistic is unknown (NaN)
  gate.flag_unknown = False  # flag raters with no statistic at all
  gate.exclude = True  # leave flagged raters' labels out of training
  gate.min_panel_agreement = 0.55  # raw agreement of the kept raters; below: the batch fails
  return gate


CONFIG_SPEC = cs.Spec(
  {
    "min_majority_agreement": cs.Float(min=0, max=1),
    "min_anchor_agreement": cs.Float(min=0, max=1),
    "min_kappa": cs.Float(min=-1, max=1),
    "min_median_seconds": cs.Float(min=0),
    "min_items": cs.Int(min=1),
    "flag_unknown": cs.Bool(),
    "exclude": cs.Bool(),
    "min_panel_agreement": cs.Float(min=0, max=1),
  }
)


def _finite(value: Any) -> bool:
  return isinstance(value, int | float) and math.isfinite(value)


def kappa_to_panel(matrix: np.ndarray) -> np.ndarray:
  """[R] each rater's mean finite pairwise kappa with the others (NaN when it has none)."""
  matrix = np.asarray(matrix, dtype=np.float64)
  out = np.full(len(matrix), math.nan)
  for r in range(len(matrix)):
    row = np.delete(matrix[r], r)
    row = row[np.isfinite(row)]
    if len(row):
      out[r] = float(row.mean())
  return out


def median_seconds(records: Sequence[Mapping[str, Any]], min_items: int) -> dict[str, float]:
  """{rater: median gap between its consecutive labels' `time`} (NaN with too few times)."""
  times: dict[str, list[float]] = {}
  for record in records:
    rater, when = record.get("rater_id"), record.get("time")
    if rater not in ("", None) and _finite(when):
      times.setdefault(str(rater), []).append(float(when))
  out = {}
  for rater, values in times.items():
    gaps = np.diff(np.sort(values))
    out[rater] = float(np.median(gaps)) if len(gaps) >= min_items else math.nan
  return out


def check(records: Sequence[Mapping[str, Any]], gate) -> dict[str, Any]:
  """The gate's verdict on preference records with rater ids.

  Returns a plain dict: `raters` {id: {statistic: value, "flagged": bool, "why": [...]}} ,
  `flagged` and `excluded` (rater ids), `panel_agreement` (raw agreement over the raters
  kept), `passed`, `reasons` (one line each for a failed batch), and the full agreement
  `report` it was computed from.
  """
  records = list(records)
  report = agreement.panel_report(records, min_shared=gate.min_items)
  kappas = kappa_to_panel(np.asarray(report["cohen_kappa"]["matrix"], dtype=np.float64))
  speeds = median_seconds(records, gate.min_items)
  thresholds = {stat: float(gate[field]) for stat, field in CHECKS}
  raters: dict[str, dict[str, Any]] = {}
  for j, (rater, stats) in enumerate(report["per_rater"].items()):
    values = {
      "num_labels": stats["num_labels"],
      "majority_agreement": stats["majority_agreement"],
      "anchor_majority_agreement": stats["anchor_majority_agreement"],
      "kappa_to_panel": float(kappas[j]),
      "median_seconds": speeds.get(rater, math.nan),
    }
    why = [
      f"{stat} {values[stat]:.3f} < {threshold:g}"
      for stat, threshold in thresholds.items()
      if threshold > 0 and _finite(values[stat]) and values[stat] < threshold
    ]
    if gate.flag_unknown and not any(_finite(values[stat]) for stat in thresholds):
      why.append("no statistic could be computed (too few shared items)")
    raters[rater] = {**values, "flagged": bool(why), "why": why}
  flagged = [r for r, v in raters.items() if v["flagged"]]
  excluded = flagged if gate.exclude else []
  kept = keep(records, {"excluded": excluded})
  table = agreement.label_table(kept)
  panel_agreement = agreement.raw_agreement(table.labels)
  reasons = []
  if _finite(panel_agreement) and panel_agreement < gate.min_panel_agreement:
    reasons.append(
      f"panel agreement {panel_agreement:.3f} of the raters kept is under "
      f"min_panel_agreement={gate.min_panel_agreement:g}"
    )
  if not kept:
    reasons.append("every rater was excluded: no label is left to train on")
  return {
    "passed": not reasons,
    "reasons": reasons,
    "flagged": flagged,
    "excluded": excluded,
    "num_records": len(records),
    "num_kept": len(kept),
    "panel_agreement": panel_agreement,
    "thresholds": {field: gate[field] for field in CONFIG_SPEC.fields},
    "raters": raters,
    "report": report,
  }


def keep(records: Sequence[Mapping[str, Any]], gate: Mapping[str, Any]) -> list:
  """The records whose rater the gate did not exclude (unattributed records are kept)."""
  excluded = {str(r) for r in gate["excluded"]}
  return [
    r
    for r in records
    if str(r.get("rater_id", "")) not in excluded or r.get("rater_id") in ("", None)
  ]


def scored(gate: Mapping[str, Any], careless: Sequence[str]) -> dict[str, Any]:
  """Precision and recall of the flagged raters against the known careless ones (testbed)."""
  careless = {str(r) for r in careless}
  flagged = {str(r) for r in gate["flagged"]}
  hits = len(flagged & careless)
  return {
    "careless": sorted(careless, key=agreement.rater_key),
    "flagged": sorted(flagged, key=agreement.rater_key),
    "precision": hits / len(flagged) if flagged else math.nan,
    "recall": hits / len(careless) if careless else math.nan,
  }
