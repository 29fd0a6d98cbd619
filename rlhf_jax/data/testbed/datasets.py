"""The testbed's data as plain Python records: prompts, the SFT corpus, preference pairs.

    testbed.prompts("eval", 100, seed=0)            # held-out items
    testbed.sft_examples(5000, seed=0)              # [{"prompt", "response"}, ...]
    testbed.preference_pairs(4000, seed=0)          # anchors + 4000 panel labels

Everything is a function of (arguments, seed, config): the same call gives the same records.
Each function draws from its own seeded stream, so e.g. the SFT corpus and the preference
pairs of one seed are not correlated. TFDS builders wrap these records elsewhere;
`write_sft_jsonl` writes the SFT corpus in the JSONL layout builders.build_sft_jsonl reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import utils
from rlhf_jax.data.testbed.config import default_config
from rlhf_jax.data.testbed.language import Language
from rlhf_jax.data.testbed.raters import RaterPanel

# Stream ids mixed into the seed, one per kind of data.
_PROMPT_STREAM, _SFT_STREAM, _PAIR_STREAM = 11, 12, 13
SOURCES = ("generator",)


def _language(config: ml_collections.ConfigDict | None) -> Language:
  return Language((config if config is not None else default_config()).language)


def prompts(
  split: str, n: int, seed: int, config: ml_collections.ConfigDict | None = None
) -> list[str]:
  """n prompts ("Review of the blue kettle:") of `split`: "train", or "eval" (held-out items)."""
  rng = np.random.default_rng([seed, _PROMPT_STREAM])
  return _language(config).prompts(split, n, rng)


def sft_examples(
  n: int, seed: int, config: ml_collections.ConfigDict | None = None, split: str = "train"
) -> list[dict[str, str]]:
  """n SFT examples {"prompt", "response"}: split prompts, generator responses (style mix)."""
  rng = np.random.default_rng([seed, _SFT_STREAM])
  language = _language(config)
  return [
    {"prompt": p, "response": language.sample_response(p, rng)}
    for p in language.prompts(split, n, rng)
  ]


def preference_pairs(
  n: int,
  seed: int,
  source: str = "generator",
  config: ml_collections.ConfigDict | None = None,
  include_anchors: bool = True,
  split: str = "train",
) -> list[dict[str, Any]]:
  """Panel-labelled pairs: the anchor records (every rater), then n labels of new pairs.

  source="generator": both responses of a pair are independent generator samples for one
  prompt, so no model is needed. Pairs sampled from a policy are labelled the same way:
  RaterPanel(config).label([(prompt, a, b), ...], rng). Record fields: see raters.py.
  """
  if source not in SOURCES:
    raise ValueError(
      f"source={source!r}; expected one of {SOURCES}. To label a policy's samples, call "
      "RaterPanel(config).label([(prompt, a, b), ...], rng)."
    )
  rng = np.random.default_rng([seed, _PAIR_STREAM])
  language = _language(config)
  panel = RaterPanel(config)
  pairs = [
    (p, language.sample_response(p, rng), language.sample_response(p, rng))
    for p in language.prompts(split, n, rng)
  ]
  # Calibration first, as annotation teams run it; the pairs follow on the same clocks.
  anchors = panel.label_anchors(rng) if include_anchors else []
  start = max((r["time"] for r in anchors), default=None)
  return anchors + panel.label(pairs, rng, start_time=start)


def sft_jsonl_paths(directory: str, num_train: int, num_eval: int) -> dict[str, list[str]]:
  """The files `write_sft_jsonl` writes for these counts (without writing them)."""
  counts = {"train": num_train, "eval": num_eval}
  return {
    split: [os.path.join(directory, f"testbed_sft_{split}.jsonl")]
    for split, n in counts.items()
    if n > 0
  }


def write_sft_jsonl(
  directory: str,
  num_train: int,
  num_eval: int,
  seed: int,
  config: ml_collections.ConfigDict | None = None,
) -> dict[str, list[str]]:
  """Writes the SFT corpus as JSONL files: {"train": [path], "eval": [path]} (eval if any).

  The eval examples name the held-out items. Files are written atomically (temp + rename).
  """
  paths = sft_jsonl_paths(directory, num_train, num_eval)
  seeds = {"train": (num_train, seed), "eval": (num_eval, seed + 1)}
  for split, (path,) in paths.items():
    n, split_seed = seeds[split]
    with utils.atomic_open(path) as f:
      for example in sft_examples(n, split_seed, config, split=split):
        f.write(json.dumps(example) + "\n")
  return paths
