"""Tests for the testbed language: determinism, splits, well-formed output, SFT coverage."""

import json

import numpy as np
import pytest

from rlhf_jax.data import testbed
from rlhf_jax.data.testbed import lexicon
from rlhf_jax.data.testbed.language import Language


@pytest.fixture(scope="module")
def corpus():
  """3000 SFT examples with their gold components."""
  examples = testbed.sft_examples(3000, seed=0)
  return examples, [testbed.gold_components(e["prompt"], e["response"]) for e in examples]


def test_same_seed_same_data_other_seed_other_data():
  assert testbed.sft_examples(200, seed=3) == testbed.sft_examples(200, seed=3)
  assert testbed.sft_examples(200, seed=3) != testbed.sft_examples(200, seed=4)
  assert testbed.prompts("train", 50, seed=3) == testbed.prompts("train", 50, seed=3)
  assert testbed.prompts("train", 50, seed=3) != testbed.prompts("train", 50, seed=4)


def test_eval_split_names_only_held_out_items():
  train = {lexicon.parse_prompt(p) for p in testbed.prompts("train", 2000, seed=0)}
  held_out = {lexicon.parse_prompt(p) for p in testbed.prompts("eval", 500, seed=0)}
  config = testbed.default_config().language
  assert len(train) == config.num_categories * (
    config.items_per_category - config.eval_items_per_category
  )
  assert len(held_out) == config.num_categories * config.eval_items_per_category
  assert not train & held_out


def test_prompts_follow_the_templates():
  for prompt in testbed.prompts("train", 100, seed=1):
    colour, category = lexicon.parse_prompt(prompt)
    assert prompt.endswith(f" the {colour} {category}:")
    assert prompt[0].isupper()


def test_generated_responses_are_well_formed_and_score_in_range(corpus):
  examples, components = corpus
  max_sentences = testbed.default_config().language.max_sentences
  for example, c in zip(examples, components, strict=True):
    response = example["response"]
    assert c["well_formed"], response
    assert c["num_unknown"] == 0, response
    assert response.endswith(".") and not response.endswith(" .")
    assert 1 <= response.count(".") <= max_sentences * 2, response  # repetition may double
    assert 3 <= c["length"] <= 40, response
    assert -4.5 <= c["total"] <= 3.0, response


def test_sft_corpus_covers_the_attributes(corpus):
  _, components = corpus

  def fraction(predicate):
    return float(np.mean([predicate(c) for c in components]))

  assert 0.50 <= fraction(lambda c: c["sentiment"] > 0) <= 0.75
  assert 0.12 <= fraction(lambda c: c["sentiment"] < 0) <= 0.35
  assert 0.05 <= fraction(lambda c: c["sentiment"] == 0) <= 0.25
  assert 0.30 <= fraction(lambda c: c["num_specific"] > 0) <= 0.60
  assert 0.30 <= fraction(lambda c: c["num_specific"] == 0 and c["num_off_item"] == 0) <= 0.65
  assert 0.05 <= fraction(lambda c: c["num_off_item"] > 0) <= 0.15
  assert 0.05 <= fraction(lambda c: c["num_repeats"] > 0) <= 0.20
  lengths = np.array([c["length"] for c in components])
  assert lengths.min() <= 4 and lengths.max() >= 20 and lengths.std() > 3


def test_sft_corpus_leaves_room_to_improve(corpus):
  _, components = corpus
  sft_mean = np.mean([c["total"] for c in components])
  language = Language(testbed.default_config().language)
  rng = np.random.default_rng(0)
  best_of_16 = [
    max(testbed.gold_reward(p, language.sample_response(p, rng)) for _ in range(16))
    for p in language.prompts("train", 150, rng)
  ]
  assert sft_mean < 1.0
  assert np.mean(best_of_16) > sft_mean + 1.2


@pytest.mark.parametrize("style", ["positive_specific", "negative", "off_item", "repetitive"])
def test_styles_do_what_they_say(style):
  language = Language(testbed.default_config().language)
  rng = np.random.default_rng(0)
  components = [
    testbed.gold_components(p, language.sample_response(p, rng, style=style))
    for p in language.prompts("train", 200, rng)
  ]
  check = {
    "positive_specific": lambda c: c["sentiment"] > 0 and c["num_specific"] > 0,
    "negative": lambda c: c["sentiment"] < 0,
    "off_item": lambda c: c["num_off_item"] > 0,
    "repetitive": lambda c: c["num_repeats"] > 0,
  }[style]
  assert np.mean([check(c) for c in components]) > 0.9


def test_language_knobs_change_the_language():
  config = testbed.default_config()
  config.language.num_categories = 2
  config.language.items_per_category = 3
  prompts = testbed.prompts("train", 300, seed=0, config=config)
  items = {lexicon.parse_prompt(p) for p in prompts}
  assert {category for _, category in items} == set(lexicon.CATEGORIES[:2])
  assert len(items) == 2 * 2
  config.language.max_sentences = 1
  config.language.features_per_category = 1
  allowed = set()
  for features in lexicon.FEATURES.values():
    allowed.add(next(t for t, s in features.items() if s > 0))
    allowed.add(next(t for t, s in features.items() if s < 0))
  features = set()
  for e in testbed.sft_examples(300, seed=0, config=config):
    assert e["response"].count(".") <= 2  # only the repetitive style repeats a sentence
    units = lexicon.segment(lexicon.tokenize(e["response"]))
    features |= {u.text for u in units if u.kind == "feature"}
  assert features and features <= allowed


@pytest.mark.parametrize(
  ("field", "value"),
  [
    ("num_categories", 9),
    ("items_per_category", 0),
    ("eval_items_per_category", 5),
    ("features_per_category", 0),
    ("style_weights", {"neutral": 0.0}),
  ],
)
def test_invalid_language_config_raises(field, value):
  config = testbed.default_config().language
  config[field] = value
  with pytest.raises(ValueError):
    Language(config)


def test_unknown_split_and_style_raise():
  language = Language(testbed.default_config().language)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="split"):
    language.prompts("test", 1, rng)
  with pytest.raises(ValueError, match="style"):
    language.sample_response("Review of the blue kettle:", rng, style="sarcastic")


def test_write_sft_jsonl(tmp_path):
  paths = testbed.write_sft_jsonl(str(tmp_path), num_train=30, num_eval=10, seed=5)
  assert sorted(paths) == ["eval", "train"]
  rows = {k: [json.loads(line) for line in open(v[0])] for k, v in paths.items()}
  assert len(rows["train"]) == 30 and len(rows["eval"]) == 10
  assert rows["train"] == testbed.sft_examples(30, seed=5)
  held_out = {lexicon.parse_prompt(p) for p in testbed.prompts("eval", 500, seed=0)}
  assert all(lexicon.parse_prompt(r["prompt"]) in held_out for r in rows["eval"])
  assert list(testbed.write_sft_jsonl(str(tmp_path / "x"), 5, 0, seed=5)) == ["train"]


def test_render_and_tokenize_round_trip():
  text = "Overall, the blue kettle creaks when I sit. It is fine."
  assert lexicon.render(lexicon.tokenize(text)) == text
  assert lexicon.is_well_formed(text)
  assert not lexicon.is_well_formed("overall, the blue kettle is fine.")  # lowercase start
  assert not lexicon.is_well_formed("It is fine .")
  assert lexicon.num_words(text) == 11
