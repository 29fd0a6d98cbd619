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

from rlhf_jax import config_spec as cs
from rlhf_jax.errors import ConfigError


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


def _check_language(section, prefix: str) -> None:
  if not section.eval_items_per_category < section.items_per_category:
    raise ConfigError(
      f"{prefix}.eval_items_per_category={section.eval_items_per_category} must be < "
      f"{prefix}.items_per_category={section.items_per_category} (the train split needs items)."
    )
  if not any(float(w) > 0 for w in dict(section.style_weights).values()):
    raise ConfigError(f"{prefix}.style_weights: at least one weight must be > 0.")


def _check_panel(section, prefix: str) -> None:
  for given in ("taus", "length_biases", "position_biases", "tie_thresholds", "eps"):
    values = section[given]
    if len(values) and len(values) != section.num_raters:
      raise ConfigError(
        f"{prefix}.{given} has {len(values)} values for {prefix}.num_raters="
        f"{section.num_raters} raters (give one per rater, or none)."
      )
  for low, high in (("tau_min", "tau_max"), ("length_bias_min", "length_bias_max")):
    if section[low] > section[high]:
      raise ConfigError(f"{prefix}.{low}={section[low]} must be <= {prefix}.{high}.")
  if section.position_bias_min > section.position_bias_max:
    raise ConfigError(
      f"{prefix}.position_bias_min={section.position_bias_min} must be <= "
      f"{prefix}.position_bias_max."
    )


def _spec() -> cs.Spec:
  probability = cs.Float(min=0, max=1)
  styles = default_config().language.style_weights
  language = cs.Spec(
    {
      "num_categories": cs.Int(min=1, max=8),
      "items_per_category": cs.Int(min=1, max=8),
      "eval_items_per_category": cs.Int(min=0),
      "features_per_category": cs.Int(min=1, max=5),
      "max_sentences": cs.Int(min=1),
      "second_sentence_prob": probability,
      "max_clauses": cs.Int(min=1),
      "extra_clause_prob": probability,
      "opener_prob": probability,
      "intensifier_prob": probability,
      "named_subject_prob": probability,
      "style_weights": cs.Spec({name: cs.Float(min=0) for name in styles}, required=False),
    },
    checks=(_check_language,),
  )
  gold = cs.Spec(
    {
      "sentiment_weight": cs.Float(min=0),
      "sentiment_scale": cs.Float(gt=0),
      "specificity_weight": cs.Float(min=0),
      "specificity_decay": cs.Float(min=0, max=1),
      "off_item_weight": cs.Float(min=0),
      "ungrammatical_penalty": cs.Float(min=0),
      "unknown_weight": cs.Float(min=0),
      "repetition_weight": cs.Float(min=0),
      "length_target": cs.Int(min=1),
      "length_tolerance": cs.Int(min=0),
      "length_weight": cs.Float(min=0),
      "length_penalty_cap": cs.Float(min=0),
      "floor": cs.Float(),
    }
  )
  per_rater = cs.Seq(cs.Float())
  panel = cs.Spec(
    {
      "seed": cs.Int(min=0),
      "num_raters": cs.Int(min=1),
      "tau_min": cs.Float(gt=0),
      "tau_max": cs.Float(gt=0),
      "taus": cs.Seq(cs.Float(min=0)),
      "length_bias_min": cs.Float(),
      "length_bias_max": cs.Float(),
      "length_biases": per_rater,
      "position_bias_min": cs.Float(),
      "position_bias_max": cs.Float(),
      "position_biases": per_rater,
      "tie_fraction": probability,
      "tie_threshold": cs.Float(min=0),
      "tie_thresholds": cs.Seq(cs.Float(min=0)),
      "careless_fraction": probability,
      "careless_eps": probability,
      "eps": cs.Seq(probability),
      "num_anchor_pairs": cs.Int(min=0),
      "start_time": cs.Float(),
      "seconds_per_label": cs.Float(gt=0),
    },
    checks=(_check_panel,),
  )
  return cs.Spec({"language": language, "gold": gold, "panel": panel})


# The declared check of every testbed knob, for trainers that hold this section.
CONFIG_SPEC = _spec()
