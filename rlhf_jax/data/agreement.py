"""Rater agreement on preference labels: Cohen's and Fleiss' kappa, Krippendorff's alpha.

Pure NumPy; works on any preference records with rater ids (the schema of preferences.py,
the testbed's raw records, anything with prompt/chosen/rejected/tie/rater_id).

Items and labels. An item is an unordered pair of responses to a prompt. It is identified
by `pair_id` when a record has one (together with its `anchor` flag: the testbed numbers
anchor pairs and ordinary pairs separately), else by (prompt, {chosen, rejected}). Within an
item the two texts get a canonical order, A the smaller string and B the larger, and a
rater's label is one of three categories: A_WINS, B_WINS or TIE. A rater who labelled an
item twice counts once, with the first label (`num_duplicate_labels` says how often that
happened); records without a rater id are left out (`num_unattributed`).

The label table is an int array `labels[I, R]` (I items, R raters) holding a category or
MISSING. The statistics take such tables, so they also work for other nominal data:

  raw_agreement         pooled over items: agreeing pairs of labels / all pairs of labels.
  cohen_kappa           two raters, items both labelled: (p_o - p_e) / (1 - p_e) with p_e
                        from each rater's own category frequencies.
  fleiss_kappa          (P_bar - P_e) / (1 - P_e) over items with >= 2 labels. P_i is the
                        agreeing fraction of item i's pairs of labels and P_e = sum_k p_k^2
                        with p_k the pooled share of category k over those items. With the
                        same number of raters on every item (e.g. the anchors) this is
                        Fleiss (1971); with unequal numbers it is its usual generalisation.
  krippendorff_alpha    nominal alpha from the coincidence matrix: 1 - (n - 1) *
                        (n - sum_k o_kk) / (n^2 - sum_k n_k^2); handles missing labels,
                        uses items with >= 2 labels.
  majority_agreement    per rater, over items it shares with others: 1 if its label is the
                        most common label of the *other* raters (leave-one-out), 0 if not,
                        1/m when m categories tie for most common (the chance a random
                        tie-break would agree).
  peer_agreement        per rater: the mean, over its items with other labels, of the
                        fraction of the other raters who gave the same label.

Anchors are the items flagged `anchor` in any record, or, if none is flagged, the items
labelled by every rater (with at least two raters). A statistic that has no data, or whose
chance agreement is 1 (everyone used one category), is NaN. A pair of raters sharing fewer
than `min_shared` items gets a NaN kappa, and a rater with fewer than `min_items` items to
compare gets NaN per-rater agreements (default MIN_SHARED_ITEMS = 5 for both: below that
a single label swings the number by 20 points or more).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

A_WINS, B_WINS, TIE = 0, 1, 2
CATEGORIES = ("a_wins", "b_wins", "tie")
MISSING = -1
MIN_SHARED_ITEMS = 5
PAIR_KEYS = ("auto", "text", "pair_id")


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """Preference labels as a table; see `label_table`.

  Attributes:
    labels: [I, R] int8, A_WINS / B_WINS / TIE or MISSING.
    raters: the R rater ids as strings, in natural order ("2" before "10").
    items: the I item keys, in order of first appearance.
    anchor: [I] bool, items flagged `anchor` in any record.
    num_duplicate_labels: repeat labels of an item by the same rater, left out.
    num_unattributed: records without a rater id, left out.
  """

  labels: np.ndarray
  raters: tuple[str, ...]
  items: tuple[Any, ...]
  anchor: np.ndarray
  num_duplicate_labels: int = 0
  num_unattributed: int = 0


def rater_key(rater_id: str) -> tuple[int, int, str]:
  """Sort key putting integer ids in numeric order before other ids."""
  text = str(rater_id)
  try:
    return (0, int(text), text)
  except ValueError:
    return (1, 0, text)


def _rater_id(record: Mapping[str, Any]) -> str | None:
  rater = record.get("rater_id")
  if rater is None or rater == "":
    return None
  return str(rater)


def _item_key(record: Mapping[str, Any], pair_key: str) -> tuple:
  pair_id = record.get("pair_id")
  has_id = pair_id is not None and pair_id != ""
  if pair_key == "pair_id" and not has_id:
    raise ValueError(f"pair_key='pair_id' but a record has no pair_id: {record.get('prompt')!r}")
  if has_id and pair_key != "text":
    return ("pair_id", bool(record.get("anchor", False)), str(pair_id))
  a, b = sorted((record["chosen"], record["rejected"]))
  return ("text", record["prompt"], a, b)


def preference_category(record: Mapping[str, Any]) -> int:
  """A_WINS, B_WINS or TIE, with A the smaller of the two texts (as strings)."""
  if record.get("tie", False):
    return TIE
  return A_WINS if record["chosen"] < record["rejected"] else B_WINS


def label_table(records: Sequence[Mapping[str, Any]], *, pair_key: str = "auto") -> LabelTable:
  """The [items, raters] label table of preference records (see the module docstring).

  Args:
    records: dicts with prompt, chosen, rejected, and optionally tie, rater_id, pair_id,
      anchor.
    pair_key: "auto" (pair_id when a record has one, else the texts), "text" (always the
      texts), or "pair_id" (every record must have one).
  Raises:
    ValueError: one pair_id used for different pairs of texts, or a bad pair_key.
  """
  if pair_key not in PAIR_KEYS:
    raise ValueError(f"pair_key must be one of {PAIR_KEYS}, got {pair_key!r}")
  item_index: dict[tuple, int] = {}
  item_texts: list[tuple[str, frozenset[str]]] = []
  anchor: list[bool] = []
  labels: dict[tuple[int, str], int] = {}
  duplicates = unattributed = 0
  for record in records:
    rater = _rater_id(record)
    if rater is None:
      unattributed += 1
      continue
    key = _item_key(record, pair_key)
    texts = (record["prompt"], frozenset((record["chosen"], record["rejected"])))
    index = item_index.setdefault(key, len(item_index))
    if index == len(item_texts):
      item_texts.append(texts)
      anchor.append(False)
    elif item_texts[index] != texts:
      # Category A/B would mean different texts for different raters: refuse, not guess.
      raise ValueError(
        f"pair_id {key[2]!r} (anchor={key[1]}) labels different pairs: prompt "
        f"{item_texts[index][0]!r} and {texts[0]!r}, or other responses; give each pair its "
        "own pair_id, or identify pairs by their texts (pair_key='text')"
      )
    anchor[index] |= bool(record.get("anchor", False))
    if (index, rater) in labels:
      duplicates += 1
      continue
    labels[(index, rater)] = preference_category(record)
  raters = tuple(sorted({r for _, r in labels}, key=rater_key))
  column = {r: j for j, r in enumerate(raters)}
  table = np.full((len(item_index), len(raters)), MISSING, dtype=np.int8)
  for (index, rater), category in labels.items():
    table[index, column[rater]] = category
  return LabelTable(
    labels=table,
    raters=raters,
    items=tuple(item_index),
    anchor=np.asarray(anchor, dtype=bool),
    num_duplicate_labels=duplicates,
    num_unattributed=unattributed,
  )


# ----------------------------------------------------------------------- panel statistics


def _num_categories(labels: np.ndarray, num_categories: int | None) -> int:
  if num_categories is not None:
    return num_categories
  return max(int(labels.max(initial=MISSING)) + 1, 1)


def category_counts(labels: np.ndarray, num_categories: int | None = None) -> np.ndarray:
  """[I, K] int: how many raters put item i in category k. labels: [I, R] with MISSING."""
  labels = np.asarray(labels)
  k = _num_categories(labels, num_categories)
  return np.stack([(labels == c).sum(axis=1) for c in range(k)], axis=1).astype(np.int64)


def raw_agreement(labels: np.ndarray) -> float:
  """Agreeing pairs of labels over all pairs of labels of the same item, pooled over items."""
  counts = category_counts(labels)
  m = counts.sum(axis=1)
  pairs = (m * (m - 1)).sum()
  return float((counts * (counts - 1)).sum() / pairs) if pairs else math.nan


def cohen_kappa(a: Sequence[int], b: Sequence[int], num_categories: int | None = None) -> float:
  """Cohen's kappa of two raters' labels of the same items. a, b: [N] ints (no MISSING)."""
  a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"need two label vectors of one length, got {a.shape} and {b.shape}")
  n = len(a)
  if n == 0:
    return math.nan
  if min(a.min(), b.min()) < 0:
    raise ValueError("labels must be categories >= 0 (drop MISSING first)")
  k = num_categories or int(max(a.max(), b.max())) + 1
  confusion = np.zeros((k, k), dtype=np.int64)
  np.add.at(confusion, (a, b), 1)
  # Integer products: p_e == 1 exactly when both raters used one and the same category.
  chance = int((confusion.sum(axis=1) * confusion.sum(axis=0)).sum())
  if chance == n * n:
    return math.nan
  observed = int(np.trace(confusion))
  return (observed * n - chance) / (n * n - chance)


def cohen_kappa_matrix(
  labels: np.ndarray, num_categories: int | None = None, min_shared: int = MIN_SHARED_ITEMS
) -> tuple[np.ndarray, np.ndarray]:
  """Cohen's kappa of every pair of raters over the items both labelled.

  Args:
    labels: [I, R] with MISSING.
    num_categories: K; by default one more than the largest label.
    min_shared: pairs sharing fewer items get NaN.
  Returns:
    kappa [R, R] float64, symmetric, NaN on the diagonal; shared [R, R] int64, items both
    labelled (the diagonal: items each rater labelled).
  """
  labels = np.asarray(labels)
  k = _num_categories(labels, num_categories)
  present = labels != MISSING
  shared = present.T.astype(np.int64) @ present.astype(np.int64)
  num_raters = labels.shape[1]
  kappa = np.full((num_raters, num_raters), math.nan)
  for i in range(num_raters):
    for j in range(i + 1, num_raters):
      if shared[i, j] >= max(min_shared, 1):
        both = present[:, i] & present[:, j]
        kappa[i, j] = kappa[j, i] = cohen_kappa(labels[both, i], labels[both, j], k)
  return kappa, shared


def fleiss_kappa(counts: np.ndarray) -> float:
  """Fleiss' kappa from [I, K] category counts; items with < 2 labels are left out.

  With unequal labels per item, P_i uses each item's own count and p_k is pooled over the
  items used (see the module docstring).
  """
  counts = np.asarray(counts, dtype=np.float64)
  m = counts.sum(axis=1)
  counts, m = counts[m >= 2], m[m >= 2]
  if not len(m):
    return math.nan
  p_item = ((counts * (counts - 1)).sum(axis=1)) / (m * (m - 1))
  p_category = counts.sum(axis=0) / m.sum()
  chance = float((p_category**2).sum())
  if math.isclose(chance, 1.0):
    return math.nan
  return (float(p_item.mean()) - chance) / (1.0 - chance)


def krippendorff_alpha(labels: np.ndarray, num_categories: int | None = None) -> float:
  """Krippendorff's alpha for nominal labels [I, R] with MISSING (items with < 2 ignored)."""
  counts = category_counts(labels, num_categories).astype(np.float64)
  m = counts.sum(axis=1)
  counts, m = counts[m >= 2], m[m >= 2]
  if not len(m):
    return math.nan
  # Coincidence matrix o[c, k]: ordered pairs of labels (c, k) from different raters of one
  # item, each item weighted 1 / (m - 1) so that it contributes m pairable values.
  weighted = counts / (m - 1)[:, None]
  coincidences = weighted.T @ counts - np.diag(weighted.sum(axis=0))
  n_category = coincidences.sum(axis=1)
  n = n_category.sum()
  expected_disagreement = n * n - (n_category**2).sum()
  # Zero (up to rounding) when every label is in one category: no variation to agree on.
  if expected_disagreement <= 1e-9 * n * n:
    return math.nan
  observed_disagreement = n - np.trace(coincidences)
  return float(1.0 - (n - 1) * observed_disagreement / expected_disagreement)


def _rater_mean(scores: list[float], min_items: int) -> float:
  return float(np.mean(scores)) if len(scores) >= max(min_items, 1) else math.nan


def majority_agreement(
  labels: np.ndarray,
  items: np.ndarray | None = None,
  min_items: int = MIN_SHARED_ITEMS,
  num_categories: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Each rater's agreement with the leave-one-out majority of the other raters.

  Args:
    labels: [I, R] with MISSING.
    items: optional [I] bool mask of the items to use (e.g. the anchors).
    min_items: raters with fewer comparable items get NaN.
  Returns:
    agreement [R] float64 (NaN: too few items) and items used [R] int64.
  """
  labels = np.asarray(labels)
  if items is not None:
    labels = labels[np.asarray(items, dtype=bool)]
  counts = category_counts(labels, num_categories)
  agreement = np.full(labels.shape[1], math.nan)
  used = np.zeros(labels.shape[1], dtype=np.int64)
  for r in range(labels.shape[1]):
    mine = labels[:, r]
    rows = np.flatnonzero(mine != MISSING)
    others = counts[rows].copy()
    others[np.arange(len(rows)), mine[rows]] -= 1
    compared = others.sum(axis=1) > 0
    others, own = others[compared], mine[rows][compared]
    is_top = others == others.max(axis=1, keepdims=True)
    scores = is_top[np.arange(len(own)), own] / is_top.sum(axis=1)
    used[r] = len(scores)
    agreement[r] = _rater_mean(list(scores), min_items)
  return agreement, used


def peer_agreement(
  labels: np.ndarray,
  items: np.ndarray | None = None,
  min_items: int = MIN_SHARED_ITEMS,
  num_categories: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Each rater's mean fraction of other raters who gave its label; see majority_agreement."""
  labels = np.asarray(labels)
  if items is not None:
    labels = labels[np.asarray(items, dtype=bool)]
  counts = category_counts(labels, num_categories)
  m = counts.sum(axis=1)
  agreement = np.full(labels.shape[1], math.nan)
  used = np.zeros(labels.shape[1], dtype=np.int64)
  for r in range(labels.shape[1]):
    rows = np.flatnonzero((labels[:, r] != MISSING) & (m >= 2))
    same = counts[rows, labels[rows, r]] - 1
    scores = same / (m[rows] - 1)
    used[r] = len(scores)
    agreement[r] = _rater_mean(list(scores), min_items)
  return agreement, used


def anchor_items(table: LabelTable) -> tuple[np.ndarray, str]:
  """[I] bool mask of the anchor items, and where it came from: "flagged",
  "labelled_by_all" or "none" (see the module docstring)."""
  if table.anchor.any():
    return table.anchor.copy(), "flagged"
  if len(table.raters) >= 2:
    by_all = (table.labels != MISSING).all(axis=1)
    if by_all.any():
      return by_all, "labelled_by_all"
  return np.zeros(len(table.items), dtype=bool), "none"


# ----------------------------------------------------------------------------- the report


def _finite_mean(values: list[float]) -> float:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def _gold_agreement(records: list[Mapping[str, Any]]) -> float:
  """Fraction of non-tie labels whose chosen text has the higher gold reward (equal: 1/2)."""
  scores = []
  for record in records:
    gold = (record.get("gold_chosen"), record.get("gold_rejected"))
    if record.get("tie", False) or any(g is None or not math.isfinite(g) for g in gold):
      continue
    scores.append(0.5 if gold[0] == gold[1] else float(gold[0] > gold[1]))
  return float(np.mean(scores)) if scores else math.nan


def _upper_mean(matrix: np.ndarray) -> float:
  upper = matrix[np.triu_indices(len(matrix), k=1)]
  upper = upper[np.isfinite(upper)]
  return float(upper.mean()) if len(upper) else math.nan


def panel_report(
  records: Sequence[Mapping[str, Any]],
  *,
  pair_key: str = "auto",
  min_shared: int = MIN_SHARED_ITEMS,
) -> dict[str, Any]:
  """Every statistic of this module for a set of preference records, as a plain dict.

  Returns (floats may be NaN; rater ids are strings):
    counts: records, unattributed, duplicate labels, raters, items, items with 2+ labels,
      anchor items and where the anchors came from;
    panel: raw_agreement, fleiss_kappa (all items with 2+ labels), fleiss_kappa_anchors,
      krippendorff_alpha, mean_cohen_kappa (over rater pairs with a kappa);
    per_rater: {rater: num_labels, tie_rate, mean_confidence, majority_agreement,
      majority_items, peer_agreement, anchor_agreement (peer agreement on anchors),
      anchor_majority_agreement, anchor_items, gold_agreement (NaN without gold fields)};
    cohen_kappa: {raters, min_shared, matrix [R][R], shared_items [R][R]}.
  """
  records = list(records)
  table = label_table(records, pair_key=pair_key)
  labels, k = table.labels, len(CATEGORIES)
  anchors, anchor_source = anchor_items(table)
  counts = category_counts(labels, k)
  kappa, shared = cohen_kappa_matrix(labels, k, min_shared)
  majority, majority_items = majority_agreement(labels, None, min_shared, k)
  peers, _ = peer_agreement(labels, None, min_shared, k)
  anchor_peers, anchors_used = peer_agreement(labels, anchors, min_shared, k)
  anchor_majority, _ = majority_agreement(labels, anchors, min_shared, k)

  by_rater: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for record in records:
    rater = _rater_id(record)
    if rater is not None:
      by_rater[rater].append(record)
  per_rater = {}
  for j, rater in enumerate(table.raters):
    own = by_rater[rater]
    per_rater[rater] = {
      "num_labels": len(own),
      "tie_rate": float(np.mean([bool(r.get("tie", False)) for r in own])),
      "mean_confidence": _finite_mean([r.get("confidence") for r in own]),
      "majority_agreement": float(majority[j]),
      "majority_items": int(majority_items[j]),
      "peer_agreement": float(peers[j]),
      "anchor_agreement": float(anchor_peers[j]),
      "anchor_majority_agreement": float(anchor_majority[j]),
      "anchor_items": int(anchors_used[j]),
      "gold_agreement": _gold_agreement(own),
    }
  return {
    "counts": {
      "records": len(records),
      "unattributed": table.num_unattributed,
      "duplicate_labels": table.num_duplicate_labels,
      "raters": len(table.raters),
      "items": len(table.items),
      "items_multi_rated": int(((labels != MISSING).sum(axis=1) >= 2).sum()),
      "anchor_items": int(anchors.sum()),
      "anchor_source": anchor_source,
    },
    "panel": {
      "raw_agreement": raw_agreement(labels),
      "fleiss_kappa": fleiss_kappa(counts),
      "fleiss_kappa_anchors": fleiss_kappa(counts[anchors]),
      "krippendorff_alpha": krippendorff_alpha(labels, k),
      "mean_cohen_kappa": _upper_mean(kappa),
    },
    "per_rater": per_rater,
    "cohen_kappa": {
      "raters": list(table.raters),
      "min_shared": min_shared,
      "matrix": kappa.tolist(),
      "shared_items": shared.tolist(),
    },
  }
