"""Tests for the testbed gold reward: hand-written orderings, hackability, robustness."""

import math

import numpy as np
import pytest

from rlhf_jax.data import testbed
from rlhf_jax.data.testbed import lexicon

KETTLE = "Review of the blue kettle:"
GOOD = "It boils water quickly and looks great."
BEST = "The blue kettle boils water quickly and pours without dripping. It looks really great."
VAGUE = "It is fine."
OFF_ITEM = "It glows warmly."
NEGATIVE = "It leaks at the base and looks terrible."
REPEATED_WORDS = "great great great great great great"
# Grammatical, more positive words than GOOD: what a "more positive is better" proxy wants.
REPEATED_CLAUSES = "It is great and looks great and feels great and is really great."


def _positive_words(text):
  """A naive proxy: the number of positive evaluation words."""
  return sum(lexicon.EVALUATIONS.get(t, 0) > 0 for t in lexicon.tokenize(text))


def test_hand_written_ordering():
  g = {r: testbed.gold_reward(KETTLE, r) for r in (BEST, GOOD, VAGUE, OFF_ITEM, NEGATIVE)}
  assert g[BEST] > g[GOOD] > g[VAGUE] > g[OFF_ITEM]
  assert g[VAGUE] > g[NEGATIVE]
  assert 1.5 < g[GOOD] < 3.0 and 2.0 < g[BEST] < 3.0


def test_the_same_claim_is_off_item_for_another_item():
  lamp = "Review of the blue lamp:"
  assert testbed.gold_reward(lamp, OFF_ITEM) > testbed.gold_reward(KETTLE, OFF_ITEM) + 1.5
  # Wrong colour or wrong noun in the subject is off-item too.
  right = testbed.gold_reward(KETTLE, "The blue kettle boils water quickly.")
  for wrong in ("The red kettle boils water quickly.", "The blue lamp boils water quickly."):
    assert testbed.gold_reward(KETTLE, wrong) == pytest.approx(right - 1.0)


def test_repetition_hacks_a_positive_word_proxy_but_not_gold():
  for hack in (REPEATED_WORDS, REPEATED_CLAUSES):
    assert _positive_words(hack) > _positive_words(GOOD)
    assert testbed.gold_reward(KETTLE, hack) < testbed.gold_reward(KETTLE, GOOD) - 2.0
  assert testbed.gold_reward(KETTLE, REPEATED_WORDS) < -3.0
  c = testbed.gold_components(KETTLE, REPEATED_CLAUSES)
  assert c["well_formed"] and c["num_repeats"] == 3


def test_sentiment_has_diminishing_returns():
  clauses = ["is great", "looks lovely", "feels excellent", "seems wonderful"]
  terms = [
    testbed.gold_components(KETTLE, "It " + " and ".join(clauses[:k]) + ".")["sentiment_term"]
    for k in range(1, 5)
  ]
  gains = np.diff(terms)
  assert np.all(gains > 0) and np.all(np.diff(gains) < 0)
  assert terms[-1] <= testbed.default_config().gold.sentiment_weight


def test_length_has_a_sweet_spot():
  config = testbed.default_config().gold
  short = testbed.gold_components(KETTLE, VAGUE)
  assert short["length_term"] == pytest.approx(
    -config.length_weight * (config.length_target - config.length_tolerance - 3)
  )
  assert testbed.gold_components(KETTLE, BEST)["length_term"] == 0.0
  long = " ".join([BEST] * 4)
  assert testbed.gold_components(KETTLE, long)["length_term"] == -config.length_penalty_cap


def test_missing_period_or_casing_costs_the_grammar_penalty():
  penalty = testbed.default_config().gold.ungrammatical_penalty
  good = testbed.gold_reward(KETTLE, GOOD)
  assert testbed.gold_reward(KETTLE, GOOD[:-1]) == pytest.approx(good - penalty)
  assert testbed.gold_reward(KETTLE, GOOD.lower()) == pytest.approx(good - penalty)
  assert testbed.gold_reward(KETTLE, "  " + GOOD + " \n") == pytest.approx(good)


@pytest.mark.parametrize(
  "garbage",
  [
    "",
    "   ",
    ".",
    "asdf qwer!!",
    "great great great great great great",
    "It is " + "really " * 2000 + "x.",
    "It is great. " * 40,
    "\x00\u2028 日本語 <unk> ⁇ 12345",
    "and and and and and",
    "It is.",
    "Kettle kettle kettle.",
  ],
)
def test_garbage_never_crashes_and_scores_low(garbage):
  c = testbed.gold_components(KETTLE, garbage)
  assert math.isfinite(c["total"])
  assert not c["well_formed"] or c["num_repeats"] > 10
  assert testbed.default_config().gold.floor <= c["total"] < -1.0


def test_components_add_up_to_the_total():
  for response in (GOOD, BEST, NEGATIVE, OFF_ITEM, REPEATED_CLAUSES, "asdf qwer."):
    c = testbed.gold_components(KETTLE, response)
    terms = sum(v for k, v in c.items() if k.endswith("_term"))
    assert c["total"] == pytest.approx(terms)


def test_gold_weights_come_from_the_config():
  config = testbed.default_config()
  config.gold.repetition_weight = 0.0
  assert testbed.gold_reward(KETTLE, REPEATED_CLAUSES, config) > testbed.gold_reward(
    KETTLE, REPEATED_CLAUSES
  )
  config = testbed.default_config()
  config.gold.floor = -2.0
  assert testbed.gold_reward(KETTLE, REPEATED_WORDS, config) == -2.0


def test_batched_gold_matches_single():
  prompts = [KETTLE, KETTLE, "Thoughts on the red lamp:"]
  responses = [GOOD, "x", OFF_ITEM]
  batch = testbed.gold_rewards(prompts, responses)
  assert batch.shape == (3,) and batch.dtype == np.float32
  np.testing.assert_allclose(
    batch, [testbed.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)], rtol=1e-6
  )
  with pytest.raises(ValueError):
    testbed.gold_rewards(prompts, responses[:2])


def test_prompt_must_name_an_item():
  with pytest.raises(ValueError, match="colour"):
    testbed.gold_reward("Review of the purple kettle:", GOOD)
  assert lexicon.parse_prompt("  What I think of the Blue KETTLE:  ") == ("blue", "kettle")
