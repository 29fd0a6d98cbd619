"""Every knob of the synthetic human-feedback testbed, as one ConfigDict.

    config = testbed.default_config()
    config.panel.length_bias_max = 0.1     # a length-biased panel
    records = testbed.preference_pairs(4000, seed=0, config=config)

Sections: `language` (what the generator writes), `gold` (weights of the gold reward; the
formula is in gold.py), `panel` (the simulated raters; the model is in raters.py). Trainers
hold this under their own config (e.g. `config.data.testbed`) so that every testbed knob is
an ablation from the command line.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The testbed's defaults: 8 categories x 5 items, a 12-rater panel with mild biases."""
  config = ml_collections.ConfigDict()

  # Language: which part of the fixed lexicon the generator uses, and how it writes.
  config.language = ml_collections.ConfigDict()
  config.language.num_categories = 8  # at most 8
  config.language.items_per_category = 5  # colours per category, at most 8
  config.language.eval_items_per_category = 1  # held-out items per category: the eval split
  config.language.features_per_category = 5  # per sign, at most 5 positive and 3 negative
  config.language.max_sentences = 2
  config.language.second_sentence_prob = 0.4
  config.language.max_clauses = 3  # verb phrases joined by "and"/"but" in one sentence
  config.language.extra_clause_prob = 0.35  # probability of each clause after the first
  config.language.opener_prob = 0.25
  config.language.intensifier_prob = 0.3
  config.language.named_subject_prob = 0.45  # "the kettle" rather than "it"
  # Styles of response and their weights in the SFT corpus and generator-only pairs.
  # Broad on purpose: a policy imitating this mix is mediocre by the gold standard.
  config.language.style_weights = ml_collections.ConfigDict(
    {
      "positive_specific": 0.20,
      "positive_vague": 0.20,
      "neutral": 0.12,
      "negative": 0.16,
      "mixed": 0.12,
      "off_item": 0.10,
      "repetitive": 0.10,
    }
  )

  # Gold reward weights (see gold.py for the formula).
  config.gold = ml_collections.ConfigDict()
  config.gold.sentiment_weight = 1.5
  config.gold.sentiment_scale = 2.0
  config.gold.specificity_weight = 1.5
  config.gold.specificity_decay = 0.5
  config.gold.off_item_weight = 1.0
  config.gold.ungrammatical_penalty = 2.0
  config.gold.unknown_weight = 1.0
  config.gold.repetition_weight = 0.75
  config.gold.length_target = 12
  config.gold.length_tolerance = 4
  config.gold.length_weight = 0.1
  config.gold.length_penalty_cap = 2.0
  config.gold.floor = -6.0

  # Rater panel (see raters.py). Per-rater values are drawn uniformly from [min, max] (tau
  # log-uniformly) with `seed`, unless the explicit tuple of length num_raters is given.
  config.panel = ml_collections.ConfigDict()
  config.panel.seed = 0
  config.panel.num_raters = 12
  config.panel.tau_min = 0.3
  config.panel.tau_max = 1.0
  config.panel.taus = ()
  config.panel.length_bias_min = 0.0  # gold units per word of length difference
  config.panel.length_bias_max = 0.03
  config.panel.length_biases = ()
  config.panel.position_bias_min = 0.0  # gold units in favour of the first shown
  config.panel.position_bias_max = 0.2
  config.panel.position_biases = ()
  config.panel.tie_fraction = 0.25  # raters who declare ties...
  config.panel.tie_threshold = 0.25  # ...when |g(A) - g(B)| is below this
  config.panel.tie_thresholds = ()
  config.panel.careless_fraction = 0.1  # raters who answer at random...
  config.panel.careless_eps = 0.5  # ...with this probability
  config.panel.eps = ()
  config.panel.num_anchor_pairs = 10  # calibration pairs labelled by every rater
  config.panel.start_time = 1.7e9  # simulated unix time of the first label
  config.panel.seconds_per_label = 30.0  # mean; careless raters are three times faster
  return config
