"""The synthetic human-feedback testbed: a small language, a gold reward, a rater panel.

    from rlhf_jax.data import testbed

    config = testbed.default_config()
    examples = testbed.sft_examples(5000, seed=0)               # SFT corpus
    g = testbed.gold_reward("Review of the blue kettle:", "It boils water quickly.")
    records = testbed.preference_pairs(4000, seed=0)           # panel labels, anchors first
    testbed.noise_ceiling(records)["bayes_accuracy"]           # best any reward model can do

Modules: lexicon (words, attributes, grammar), language (the generator), gold (the gold
reward, its formula in the docstring), raters (the panel), ceiling (noise ceiling and
agreement), datasets (records for SFT and preference data), evaluation (distinct-n, length,
win rate), config (every knob).
"""

from rlhf_jax.data.testbed.ceiling import anchor_agreement, noise_ceiling
from rlhf_jax.data.testbed.config import default_config
from rlhf_jax.data.testbed.datasets import (
  preference_pairs,
  prompts,
  sft_examples,
  sft_jsonl_paths,
  write_sft_jsonl,
)
from rlhf_jax.data.testbed.evaluation import distinct_n, length_stats, win_rate
from rlhf_jax.data.testbed.gold import gold_components, gold_reward, gold_rewards
from rlhf_jax.data.testbed.language import Language
from rlhf_jax.data.testbed.lexicon import is_well_formed, num_words, parse_prompt
from rlhf_jax.data.testbed.raters import Rater, RaterPanel, preference_probability

__all__ = [
  "Language",
  "Rater",
  "RaterPanel",
  "anchor_agreement",
  "default_config",
  "distinct_n",
  "gold_components",
  "gold_reward",
  "gold_rewards",
  "is_well_formed",
  "length_stats",
  "noise_ceiling",
  "num_words",
  "parse_prompt",
  "preference_pairs",
  "preference_probability",
  "prompts",
  "sft_examples",
  "sft_jsonl_paths",
  "win_rate",
  "write_sft_jsonl",
]
