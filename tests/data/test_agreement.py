"""Tests for rlhf_jax.data.agreement against hand-worked and published examples."""

import math

import numpy as np
import pytest

from rlhf_jax.data import agreement, testbed
from rlhf_jax.data.agreement import A_WINS, B_WINS, MISSING, TIE

M = MISSING


# ------------------------------------------------------------------------- Cohen's kappa


def test_cohen_kappa_wikipedia_two_by_two():
  # Wikipedia, "Cohen's kappa": 50 proposals, 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no.
  # p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4.
  a = [0] * 20 + [0] * 5 + [1] * 10 + [1] * 15
  b = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
  assert agreement.cohen_kappa(a, b) == pytest.approx(0.4)
  assert agreement.cohen_kappa(b, a) == pytest.approx(0.4)


def test_cohen_kappa_three_categories_by_hand():
  # Confusion [[2, 1, 0], [0, 2, 0], [1, 0, 1]]: n = 7, p_o = 5/7, rows (3, 2, 2), columns
  # (3, 3, 1): p_e = (9 + 6 + 2) / 49 = 17/49, kappa = (35/49 - 17/49) / (32/49) = 18/32.
  a = [0, 0, 0, 1, 1, 2, 2]
  b = [0, 0, 1, 1, 1, 0, 2]
  assert agreement.cohen_kappa(a, b) == pytest.approx(18 / 32)
  assert agreement.cohen_kappa(a, a) == 1.0
  # Systematic disagreement is below chance.
  assert agreement.cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_cohen_kappa_undefined_cases_are_nan():
  # Both raters always "tie": chance agreement is 1, kappa is 0/0.
  assert math.isnan(agreement.cohen_kappa([2, 2, 2], [2, 2, 2]))
  assert math.isnan(agreement.cohen_kappa([], []))
  with pytest.raises(ValueError, match="one length"):
    agreement.cohen_kappa([0, 1], [0])
  with pytest.raises(ValueError, match="MISSING"):
    agreement.cohen_kappa([0, M], [0, 1])


def test_cohen_kappa_matches_sklearn():
  from sklearn import metrics

  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(5, 60))
    a = rng.integers(3, size=n)
    b = np.where(rng.random(n) < rng.random(), a, rng.integers(3, size=n))
    if len(set(a) | set(b)) < 2:
      continue
    assert agreement.cohen_kappa(a, b, 3) == pytest.approx(metrics.cohen_kappa_score(a, b))


def test_cohen_kappa_matrix_uses_shared_items_and_min_shared():
  labels = np.array(
    [
      [0, 0, M],
      [1, 1, 1],
      [0, 1, 0],
      [2, 2, M],
      [M, 0, 0],
    ]
  )
  kappa, shared = agreement.cohen_kappa_matrix(labels, 3, min_shared=1)
  assert shared.tolist() == [[4, 4, 2], [4, 5, 3], [2, 3, 3]]
  assert kappa[0, 1] == pytest.approx(agreement.cohen_kappa([0, 1, 0, 2], [0, 1, 1, 2], 3))
  assert kappa[1, 2] == pytest.approx(agreement.cohen_kappa([1, 1, 0], [1, 0, 0], 3))
  assert kappa[0, 1] == kappa[1, 0]
  assert np.isnan(np.diag(kappa)).all()
  # Raters 0 and 2 share two items: NaN when three are required, the others still count.
  kappa3, _ = agreement.cohen_kappa_matrix(labels, 3, min_shared=3)
  assert math.isnan(kappa3[0, 2]) and not math.isnan(kappa3[1, 2])


# ------------------------------------------------------------------------- Fleiss' kappa

# Wikipedia, "Fleiss' kappa": 14 raters put 10 subjects into 5 categories.
WIKIPEDIA_FLEISS = np.array(
  [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
  ]
)


def test_fleiss_kappa_wikipedia_example():
  # Published: P_bar = 0.378, P_e = 0.213, kappa = 0.210.
  assert agreement.fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_two_raters_is_scotts_pi():
  # Items (a, b): (0,0) x3, (0,1), (1,1), (2,2): p_o = 5/6; pooled shares (7, 3, 2)/12:
  # P_e = (49 + 9 + 4) / 144 = 62/144; pi = (120/144 - 62/144) / (82/144) = 58/82.
  counts = np.array([[2, 0, 0], [2, 0, 0], [2, 0, 0], [1, 1, 0], [0, 2, 0], [0, 0, 2]])
  assert agreement.fleiss_kappa(counts) == pytest.approx(58 / 82)


def test_fleiss_kappa_unequal_raters_by_hand():
  # Item 1: three labels (2 A, 1 B): P_1 = (2*1 + 0) / (3*2) = 1/3. Item 2: two A: P_2 = 1.
  # Item 3: one label, left out. P_bar = 2/3; pooled p = (4/5, 1/5): P_e = 17/25.
  # kappa = (2/3 - 17/25) / (8/25) = (50 - 51) / 75 / (8/25) = -1/24.
  counts = np.array([[2, 1, 0], [2, 0, 0], [0, 0, 1]])
  assert agreement.fleiss_kappa(counts) == pytest.approx(-1 / 24)
  assert math.isnan(agreement.fleiss_kappa(np.array([[1, 0], [0, 1]])))  # No item with 2+.
  assert math.isnan(agreement.fleiss_kappa(np.array([[3, 0], [2, 0]])))  # One category.


# ------------------------------------------------------------------ Krippendorff's alpha


def test_krippendorff_alpha_wikipedia_example():
  # Wikipedia, "Krippendorff's alpha": 3 coders, 15 units, missing values; nominal 0.691.
  coders = [
    [M, M, M, M, M, 3, 4, 1, 2, 1, 1, 3, 3, M, 3],
    [1, M, 2, 1, 3, 3, 4, 3, M, M, M, M, M, M, M],
    [M, M, 2, 1, 3, 4, 4, M, 2, 1, 1, 3, 3, M, 4],
  ]
  assert agreement.krippendorff_alpha(np.array(coders).T) == pytest.approx(0.691, abs=5e-4)


def test_krippendorff_alpha_krippendorff_2011_example():
  # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers, 12 units,
  # nominal alpha = 0.743.
  observers = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, M, M, M],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, M, 3],
    [M, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, M],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, M],
  ]
  assert agreement.krippendorff_alpha(np.array(observers).T) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_two_coders_relates_to_scotts_pi():
  # No missing data, two coders, N units (n = 2N values): alpha = 1 - (n - 1)/n * (1 - pi).
  rng = np.random.default_rng(1)
  a = rng.integers(3, size=30)
  b = np.where(rng.random(30) < 0.7, a, rng.integers(3, size=30))
  labels = np.stack([a, b], axis=1)
  pi = agreement.fleiss_kappa(agreement.category_counts(labels, 3))
  n = 60
  assert agreement.krippendorff_alpha(labels, 3) == pytest.approx(1 - (n - 1) / n * (1 - pi))
  # Units with one value carry no pairable information.
  padded = np.concatenate([labels, [[0, M], [M, 2]]])
  assert agreement.krippendorff_alpha(padded, 3) == pytest.approx(
    agreement.krippendorff_alpha(labels, 3)
  )
  assert math.isnan(agreement.krippendorff_alpha(np.array([[1, 1], [1, M]])))


# ------------------------------------------------------------------ raw and per-rater


def test_raw_agreement_pools_pairs_over_items():
  # Item 1: labels (0, 0, 1): 1 agreeing pair of 3. Item 2: (2, 2): 1 of 1. Item 3: one label.
  labels = np.array([[0, 0, 1], [2, 2, M], [M, M, 1]])
  assert agreement.raw_agreement(labels) == pytest.approx(2 / 4)
  assert math.isnan(agreement.raw_agreement(np.array([[0, M], [M, 1]])))


def test_majority_and_peer_agreement_by_hand():
  # Four raters, three items.
  labels = np.array(
    [
      [0, 0, 0, 1],  # others of rater 3 say 0: it scores 0; the others score 1.
      [0, 1, 2, 2],  # rater 0: others (1, 2, 2) -> majority 2: 0. rater 2: others (0, 1, 2)
      #                three-way split: 1/3. rater 3: same as rater 2.
      [1, 0, M, M],  # two raters: each has one other, who disagrees: 0.
    ]
  )
  majority, used = agreement.majority_agreement(labels, min_items=1)
  assert used.tolist() == [3, 3, 2, 2]
  np.testing.assert_allclose(majority, [(1 + 0 + 0) / 3, (1 + 0 + 0) / 3, (1 + 1 / 3) / 2, 1 / 6])
  peers, _ = agreement.peer_agreement(labels, min_items=1)
  # Rater 2: item 1 2 of 3 others agree, item 2 1 of 3.
  np.testing.assert_allclose(peers, [(2 / 3) / 3, (2 / 3) / 3, (2 / 3 + 1 / 3) / 2, 1 / 6])
  # Restricted to the first two items (e.g. anchors), and a minimum of three items.
  majority_first, _ = agreement.majority_agreement(labels, np.array([1, 1, 0], bool), 1)
  np.testing.assert_allclose(majority_first, [0.5, 0.5, (1 + 1 / 3) / 2, 1 / 6])
  majority_min3, _ = agreement.majority_agreement(labels, min_items=3)
  assert not np.isnan(majority_min3[:2]).any() and np.isnan(majority_min3[2:]).all()


def test_majority_agreement_matches_testbed_anchor_agreement():
  # Without tie-declaring raters the testbed's own anchor statistics (ties out, an even
  # split counting 1/2) are ours on the anchors: an independent implementation to agree with.
  config = testbed.default_config()
  config.panel.tie_fraction = 0.0
  config.panel.num_anchor_pairs = 12
  records = testbed.preference_pairs(40, seed=3, config=config)
  expected = testbed.anchor_agreement(records)
  report = agreement.panel_report(records)
  ours = {r: s["majority_agreement"] for r, s in report["per_rater"].items()}
  assert ours == pytest.approx(
    {str(r): v for r, v in expected["majority_agreement_by_rater"].items()}
  )
  assert report["panel"]["raw_agreement"] == pytest.approx(expected["pairwise_agreement"])


# ---------------------------------------------------------------------------- the table


def _record(prompt, chosen, rejected, rater, tie=False, **extra):
  return {
    "prompt": prompt,
    "chosen": chosen,
    "rejected": rejected,
    "rater_id": rater,
    "tie": tie,
    **extra,
  }


def test_label_table_identifies_unordered_pairs_and_categories():
  records = [
    _record("p", "x", "y", "r2"),  # x < y: A wins.
    _record("p", "y", "x", "r10"),  # the same pair shown the other way round: B wins.
    _record("p", "x", "y", "r1", tie=True),
    _record("q", "x", "y", 7),  # another prompt is another item.
    _record("p", "x", "y", "r2"),  # a repeat label: left out, counted.
    _record("p", "x", "y", ""),  # no rater: left out, counted.
    _record("p", "x", "y", None),
  ]
  table = agreement.label_table(records)
  assert table.raters == ("7", "r1", "r10", "r2")
  assert table.items == (("text", "p", "x", "y"), ("text", "q", "x", "y"))
  assert table.labels.tolist() == [[M, TIE, B_WINS, A_WINS], [A_WINS, M, M, M]]
  assert (table.num_duplicate_labels, table.num_unattributed) == (1, 2)
  assert table.anchor.tolist() == [False, False]


def test_label_table_uses_pair_id_with_anchor_namespace():
  records = [
    # The testbed numbers anchors and ordinary pairs separately: pair 0 twice.
    _record("p", "a", "b", 0, pair_id=0, anchor=True),
    _record("p", "b", "a", 1, pair_id=0, anchor=True),
    _record("q", "c", "d", 0, pair_id=0, anchor=False),
    # Two separately sampled pairs with equal texts stay two items.
    _record("q", "c", "d", 1, pair_id=1, anchor=False),
  ]
  table = agreement.label_table(records)
  assert len(table.items) == 3
  assert table.labels.tolist() == [[A_WINS, B_WINS], [A_WINS, M], [M, A_WINS]]
  assert table.anchor.tolist() == [True, False, False]
  assert len(agreement.label_table(records, pair_key="text").items) == 2
  conflicting = [*records, _record("z", "a", "b", 2, pair_id=0, anchor=True)]
  with pytest.raises(ValueError, match=r"pair_id '0' .* labels different pairs"):
    agreement.label_table(conflicting)
  with pytest.raises(ValueError, match="has no pair_id"):
    agreement.label_table([_record("p", "a", "b", 0)], pair_key="pair_id")


def test_anchor_items_flagged_or_labelled_by_all():
  flagged = agreement.label_table(
    [_record("p", "a", "b", 0, anchor=True), _record("q", "a", "b", 1)]
  )
  mask, source = agreement.anchor_items(flagged)
  assert (mask.tolist(), source) == ([True, False], "flagged")
  by_all = agreement.label_table(
    [_record("p", "a", "b", 0), _record("p", "a", "b", 1), _record("q", "a", "b", 1)]
  )
  mask, source = agreement.anchor_items(by_all)
  assert (mask.tolist(), source) == ([True, False], "labelled_by_all")
  none = agreement.label_table([_record("p", "a", "b", 0), _record("q", "a", "b", 1)])
  assert agreement.anchor_items(none)[1] == "none"


def test_panel_report_by_hand():
  # Three raters, two anchors labelled by all, one pair labelled by raters 0 and 1.
  records = [
    _record("p1", "a", "b", 0, anchor=True, confidence=4, gold_chosen=1.0, gold_rejected=0.0),
    _record("p1", "a", "b", 1, anchor=True, confidence=2, gold_chosen=1.0, gold_rejected=0.0),
    _record("p1", "b", "a", 2, anchor=True, gold_chosen=0.0, gold_rejected=1.0),
    _record("p2", "c", "d", 0, anchor=True, tie=True),
    _record("p2", "c", "d", 1, anchor=True, tie=True),
    _record("p2", "c", "d", 2, anchor=True, tie=True),
    _record("p3", "e", "f", 0),
    _record("p3", "f", "e", 1),
  ]
  report = agreement.panel_report(records, min_shared=1)
  assert report["counts"] == {
    "records": 8,
    "unattributed": 0,
    "duplicate_labels": 0,
    "raters": 3,
    "items": 3,
    "items_multi_rated": 3,
    "anchor_items": 2,
    "anchor_source": "flagged",
  }
  panel = report["panel"]
  # Pairs of labels: item 1 has 1 agreeing of 3, item 2 3 of 3, item 3 0 of 1.
  assert panel["raw_agreement"] == pytest.approx(4 / 7)
  labels = np.array([[0, 0, 1], [2, 2, 2], [0, 1, M]])
  assert panel["krippendorff_alpha"] == pytest.approx(agreement.krippendorff_alpha(labels, 3))
  # Anchors: counts (2, 1, 0) and (0, 0, 3): P = (1/3, 1), pooled p = (2, 1, 3)/6.
  p_e = (4 + 1 + 9) / 36
  assert panel["fleiss_kappa_anchors"] == pytest.approx((2 / 3 - p_e) / (1 - p_e))
  rater0, rater2 = report["per_rater"]["0"], report["per_rater"]["2"]
  assert rater0["num_labels"] == 3 and rater0["tie_rate"] == pytest.approx(1 / 3)
  assert rater0["mean_confidence"] == 4.0  # Absent confidences are not averaged.
  assert math.isnan(rater2["mean_confidence"])
  # Rater 0: on item 1 the others split (a, b): 1/2; item 2 agrees: 1; item 3 disagrees
  # with its one other rater: 0.
  assert rater0["majority_agreement"] == pytest.approx((1 / 2 + 1 + 0) / 3)
  assert rater0["anchor_majority_agreement"] == pytest.approx((1 / 2 + 1) / 2)
  assert rater0["anchor_agreement"] == pytest.approx((1 / 2 + 1) / 2)
  # Rater 2 is outvoted on item 1 by two others who agree with each other.
  assert rater2["anchor_majority_agreement"] == pytest.approx(1 / 2)
  assert rater2["anchor_agreement"] == pytest.approx(1 / 2)
  # Gold: ties and records without gold rewards are left out.
  assert rater0["gold_agreement"] == 1.0 and rater2["gold_agreement"] == 0.0
  assert report["per_rater"]["1"]["gold_agreement"] == 1.0
  assert report["cohen_kappa"]["raters"] == ["0", "1", "2"]
  assert report["cohen_kappa"]["shared_items"][0][1] == 3
