"""Active pair selection (rlhf_jax/data/selection.py) on constructed candidates."""

import numpy as np
import pytest

from rlhf_jax.data import selection


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_candidate_pairs_skip_empty_and_equal_texts():
  responses = [["a b", "c d", "a b", " "], ["x", "y"]]
  pairs = selection.candidate_pairs(responses)
  # Prompt 0: (0, 1) only. (0, 2) are equal texts, 3 is empty, and (1, 2) is (0, 1) again
  # (the same two texts in the other order). Prompt 1: (0, 1).
  assert pairs.tolist() == [[0, 0, 1], [1, 0, 1]]


def test_random_selection_is_seeded_and_without_replacement():
  pairs = np.stack([np.zeros(50, int), np.zeros(50, int), np.arange(1, 51)], axis=1)
  a, _ = selection.select("random", pairs, 20, _rng(3))
  b, _ = selection.select("random", pairs, 20, _rng(3))
  assert a.tolist() == b.tolist() and len(set(a.tolist())) == 20
  c, _ = selection.select("random", pairs, 200, _rng(3))  # more than there are: all of them
  assert c.tolist() == list(range(50))


def test_ensemble_disagreement_picks_the_pairs_members_disagree_on():
  # 3 members, 1 prompt, 4 responses. Members agree on responses 0-1 and disagree on 2-3.
  scores = np.array([[[0.0, 1.0, 2.0, -2.0]], [[0.0, 1.0, -2.0, 2.0]], [[0.0, 1.0, 0.0, 0.0]]])
  pairs = selection.candidate_pairs([["r0", "r1", "r2", "r3"]])
  chosen, criterion = selection.select("ensemble_disagreement", pairs, 1, _rng(), scores=scores)
  assert tuple(pairs[chosen[0]]) == (0, 2, 3)
  assert criterion[chosen[0]] == criterion.max()
  # The (0, 1) pair: every member says 0 - 1 = -1, so no spread.
  assert criterion[pairs.tolist().index([0, 0, 1])] == 0.0


def test_ensemble_disagreement_needs_two_members():
  pairs = selection.candidate_pairs([["a", "b"]])
  with pytest.raises(ValueError, match="2 or more members"):
    selection.select("ensemble_disagreement", pairs, 1, _rng(), scores=np.zeros((1, 1, 2)))


def test_uncertainty_picks_the_pairs_nearest_even_odds():
  scores = np.array([[[0.0, 3.0, 0.1, -4.0]]])  # one member
  pairs = selection.candidate_pairs([["a", "b", "c", "d"]])
  chosen, _ = selection.select("uncertainty", pairs, 1, _rng(), scores=scores)
  assert tuple(pairs[chosen[0]]) == (0, 0, 2)  # |0 - 0.1| is the smallest difference


def test_score_strategies_need_scores():
  pairs = selection.candidate_pairs([["a", "b"]])
  with pytest.raises(ValueError, match="needs reward-model scores"):
    selection.select("uncertainty", pairs, 1, _rng())
  with pytest.raises(ValueError, match="unknown selection strategy"):
    selection.select("best", pairs, 1, _rng())


def test_diverse_covers_distinct_pairs_before_near_duplicates():
  # 6 near-identical pairs about kettles and 2 different ones; picking 3 must take both
  # different ones (farthest-point coverage), not three kettle pairs.
  prompts = ["Review of the kettle:"] * 6 + ["Review of the lamp:", "Review of the sofa:"]
  responses = [["it is great", "it is bad"]] * 6 + [
    ["bright warm light", "dim cold glow"],
    ["soft deep cushions", "hard thin frame"],
  ]
  pairs = selection.candidate_pairs(responses)
  for seed in range(5):
    chosen, _ = selection.select(
      "diverse", pairs, 3, _rng(seed), prompts=prompts, responses=responses
    )
    chosen_prompts = {int(pairs[c][0]) for c in chosen}
    assert {6, 7} <= chosen_prompts, (seed, chosen_prompts)


def test_farthest_points_returns_distinct_sorted_indices():
  x = _rng(1).normal(size=(40, 5))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  chosen = selection.farthest_points(x, 10, _rng(2))
  assert len(set(chosen.tolist())) == 10 and chosen.tolist() == sorted(chosen.tolist())
  assert selection.farthest_points(x, 0, _rng(2)).size == 0
