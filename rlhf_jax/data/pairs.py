"""Preference pairs for the reward model and DPO: sampling, labelling, collation, targets.

Data code with explicit arguments, shared by the trainers that learn from preferences
(`trainers/reward.py`, `trainers/dpo.py`):

  testbed_pairs(data, dir, generate)   policy samples labelled by the testbed's rater panel,
                                       written as preference files, with the noise ceiling
  file_paths / build                   preference files by split -> built sources and info
  group_collate                        comparison groups -> one batch of rows, comparisons,
                                       label targets (hard, or soft from confidence)
  label_targets, check_confidence      the probability that `chosen` is preferred

`generate(prompts, rng) -> responses` samples from the policy (`stages.Policy.generate`
with the caller's sampling settings), so nothing here depends on a trainer's config.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax import config_spec as cs
from rlhf_jax import distributed, errors, rng, utils
from rlhf_jax.data import chat, preferences
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.rl import reward as reward_lib

Generate = Callable[[list[str], jax.Array], list[str]]
SOFT_LABELS = ("none", "confidence")


def check_pair_data(data, prefix: str) -> None:
  """File-backed preference data names its files (shared with DPO's config check)."""
  if data.source == "jsonl" and not data.train_files:
    raise cs.ConfigError(f"{prefix}.train_files is empty but {prefix}.source='jsonl'.")


def check_confidence_range_field(section, prefix: str) -> None:
  low, high = section.confidence_range
  if not high > low:
    raise cs.ConfigError(
      f"{prefix}.confidence_range={tuple(section.confidence_range)}: high must exceed low."
    )


# The fields of preference-file data, shared with DPO's data section.
PAIR_FILE_FIELDS = {
  "train_files": cs.Seq(cs.Path("file", optional=False)),
  "eval_files": cs.Seq(cs.Path("file", optional=False)),
  "skip_invalid": cs.Bool(),
  "data_dir": cs.Str(),
}


def sample_comparisons(
  generate: Generate, n: int, k: int, split: str, seed: int, testbed_config
) -> list[tuple[str, str, str]]:
  """n (prompt, a, b) triples: k policy samples per testbed prompt, every pair of them.

  Prompts are drawn until n pairs are made (k(k-1)/2 per prompt; the last prompt's pairs
  are cut at n). Sample i of every prompt uses the key fold_in(key(seed), i), so k=2
  gives pairs (sample 0, sample 1), and a larger k extends the same samples.
  """
  from rlhf_jax.data import testbed

  if k < 2:
    raise ValueError(f"responses_per_prompt={k}; need at least 2.")
  pairs = list(itertools.combinations(range(k), 2))
  prompts = testbed.prompts(split, -(-n // len(pairs)), seed, testbed_config)
  key = jax.random.key(seed)
  samples = [generate(prompts, jax.random.fold_in(key, i)) for i in range(k)]
  triples = [(p, samples[a][j], samples[b][j]) for j, p in enumerate(prompts) for a, b in pairs]
  return triples[:n]


def testbed_pairs(data, pair_dir: str, generate: Generate) -> tuple[dict[str, list[str]], dict]:
  """Policy samples labelled by the testbed's rater panel, as preference files in `pair_dir`.

  `data` holds num_train, num_eval, seed, responses_per_prompt and testbed (the knobs);
  `generate(prompts, rng)` samples one response per prompt from the policy. Training
  pairs are k = responses_per_prompt samples per prompt and all their pairs, with the
  anchor pairs every rater sees first; eval pairs are plain pairs (seed + 1). Returns the
  files by split and the noise ceiling of each split. Files already made are reused: the
  ceiling is written last, so a run stopped before it makes all three again (same samples
  and labels: fixed seeds).
  """
  from rlhf_jax.data import testbed

  paths = {s: [os.path.join(pair_dir, f"pairs_{s}.jsonl")] for s in ("train", "eval")}
  ceiling_path = os.path.join(pair_dir, "noise_ceiling.json")
  ceilings = {}
  done = all(os.path.exists(p) for p in (paths["train"][0], paths["eval"][0]))
  if not (done and _read_json(ceiling_path) is not None):
    os.makedirs(pair_dir, exist_ok=True)
    panel = testbed.RaterPanel(data.testbed)
    for split, n, seed, k in (
      ("train", data.num_train, rng.seed(data.seed, "train_pairs"), data.responses_per_prompt),
      ("eval", data.num_eval, rng.seed(data.seed, "eval_pairs"), 2),
    ):
      triples = sample_comparisons(generate, n, k, split, seed, data.testbed)
      label_rng = np.random.default_rng([seed, 7])
      records = panel.label_anchors(label_rng) if split == "train" else []
      records += panel.label(triples, label_rng)
      ceilings[split] = testbed.noise_ceiling([r for r in records if not r.get("anchor")])
      if jax.process_index() == 0:
        # Policy samples can be empty (EOS first) or identical; such pairs carry no
        # preference a file could hold, so they are left out and counted.
        written = preferences.write_preference_jsonl(records, paths[split][0], skip_invalid=True)
        ceilings[split]["num_pairs_skipped"] = len(records) - written
    if jax.process_index() == 0:
      utils.write_json_atomic(ceiling_path, ceilings)
  distributed.barrier("reward-pairs")  # the others read what process 0 wrote
  return paths, _read_json(ceiling_path)


def file_paths(train_files, eval_files) -> dict[str, list[str]]:
  """Preference files by split ("eval" only when there are eval files)."""
  paths = {"train": list(train_files)}
  if eval_files:
    paths["eval"] = list(eval_files)
  return paths


def build(
  paths: dict[str, list[str]], data_dir: str, skip_invalid: bool, info=None, tokenizer=None
):
  """(train source, eval source or None, info) of the preference files by split, built
  once as array_record datasets in `data_dir` (preferences.build_preferences). Chat
  prompts are rendered in `tokenizer`'s chat format (`chat.format_for`)."""
  builder = preferences.build_preferences(paths, data_dir, skip_invalid=skip_invalid)
  train = builder.source("train")
  evals = builder.source("eval") if "eval" in paths else None
  for source in (train, evals):
    if source is not None:
      source.render = chat.format_for(tokenizer).render_prompt
  info = dict(info or {})
  info.update(
    content_hash=builder.content_hash,
    paths=paths,
    skipped=builder.num_skipped,
    num_train=len(train),
    num_eval=len(evals) if evals is not None else 0,
  )
  return train, evals, info


def _read_json(path):
  """The JSON in `path`, or None when it is missing or damaged (then it is made again)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def label_targets(confidence, soft_labels, confidence_range) -> np.ndarray:
  """Per comparison, the probability that the chosen response is preferred.

  1 everywhere for hard labels (soft_labels="none"); with "confidence", the rater's
  stated confidence mapped onto [1/2, 1] over `confidence_range`, clipped
  (`reward_lib.confidence_targets`; NaN, a record without one, keeps the hard label).
  Trainers refuse out-of-range confidences first (`check_confidence`).
  """
  if soft_labels not in SOFT_LABELS:
    raise ValueError(f"config.soft_labels={soft_labels!r}; expected one of {SOFT_LABELS}.")
  c = np.asarray(confidence, np.float64)
  if soft_labels == "none":
    return np.ones(c.shape, np.float32)
  return reward_lib.confidence_targets(c, *confidence_range)


def where_of(source, what: str = "record"):
  """f(i) naming record i: its file and line for a built source, else `what` and i."""
  if hasattr(source, "where"):
    return source.where
  return lambda i, record=None: f"{what} {i}"


def check_confidence(confidence, confidence_range, *, where=lambda i: f"record {i}") -> None:
  """Refuses a confidence outside `confidence_range`, naming the record by `where(i)`.

  A file whose raters report confidence on, say, 0..1 would otherwise map every label to
  the 1/2 of a guess. NaN (a record without a confidence) passes.
  """
  c = np.asarray(confidence, np.float64).reshape(-1)
  low, high = confidence_range
  outside = ~np.isnan(c) & ((c < low) | (c > high))
  if outside.any():
    i = int(np.argmax(outside))
    raise errors.ConfigError(
      f"{where(i)}: field 'confidence' = {c[i]} is outside "
      f"config.confidence_range={tuple(confidence_range)}",
      hint="Set config.confidence_range to this data's confidence scale, or "
      "config.soft_labels='none'.",
    )


def check_confidence_range(source, confidence_range) -> None:
  """Refuses, before training, a source with a confidence outside `confidence_range`."""
  confidence = [record_float(r.get("confidence")) for _, r in preferences.iter_records(source)]
  check_confidence(confidence, confidence_range, where=where_of(source, "training record"))


LABEL_FIELDS = ("margin", "target", "tie", "valid")  # per comparison, [G, P] in a batch


def group_collate(
  groups,
  tokenizer,
  max_len,
  *,
  responses=2,
  pairs=1,
  soft_labels="none",
  confidence_range=(1.0, 5.0),
) -> dict[str, np.ndarray]:
  """G comparison groups (lists of same-prompt pair records) -> one batch.

  Each group's distinct responses become rows (BOS + prompt + response + EOS), scored
  once however many comparisons they are in; each record becomes a comparison of two of
  its group's rows. A group has at most `responses` rows and `pairs` comparisons
  (`preferences.comparison_groups` cuts them so); unused slots are padding, with
  `valid` False. Plain pairs are groups of one record (responses=2, pairs=1).

  Returns (R = responses, P = pairs):
    tokens, mask: [G, R, T] rows; an unused row repeats the group's first.
    chosen, rejected: [G, P] int32, rows of the group compared.
    margin [G, P] float32; target [G, P] float32, the probability that chosen is
      preferred: 1 (a hard label), or with soft_labels="confidence" the rater's
      stated confidence mapped onto [0.5, 1] over `confidence_range` (a record
      without a confidence keeps the hard label); tie [G, P] bool; valid [G, P]
      bool, False for padding and for a pair with a row too long for max_len.
  """
  g = len(groups)
  rows, chosen, rejected = [], np.zeros((g, pairs), np.int32), np.zeros((g, pairs), np.int32)
  records = []
  for gi, group in enumerate(groups):
    if len(group) > pairs:
      raise ValueError(f"a group of {len(group)} comparisons; at most {pairs} fit.")
    index: dict[str, int] = {}
    for pi, record in enumerate(group):
      for side, out in (("chosen", chosen), ("rejected", rejected)):
        out[gi, pi] = index.setdefault(record[side], len(index))
      records.append((gi, pi, record))
    if len(index) > responses:
      raise ValueError(f"a group of {len(index)} distinct responses; at most {responses} fit.")
    texts = list(index) + [next(iter(index))] * (responses - len(index))
    rows += [{"prompt": group[0]["prompt"], "response": t} for t in texts]
  batch = loader_lib.sft_collate(rows, tokenizer, max_len)
  dropped = batch["dropped"].reshape(g, responses)
  margin = np.zeros((g, pairs), np.float32)
  confidence = np.full((g, pairs), np.nan)
  tie = np.zeros((g, pairs), np.bool_)
  valid = np.zeros((g, pairs), np.bool_)
  for gi, pi, record in records:
    margin[gi, pi] = float(record.get("margin", 0.0) or 0.0)
    confidence[gi, pi] = record_float(record.get("confidence"))
    tie[gi, pi] = bool(record.get("tie", False))
    # A pair with a row too long for max_len (dropped by the collate) gets weight 0.
    valid[gi, pi] = not (dropped[gi, chosen[gi, pi]] or dropped[gi, rejected[gi, pi]])
  target = label_targets(confidence, soft_labels, confidence_range)
  shape = (g, responses, batch["tokens"].shape[-1])
  return {
    "tokens": batch["tokens"].reshape(shape),
    "mask": batch["input_mask"].reshape(shape),
    "chosen": chosen,
    "rejected": rejected,
    "margin": margin,
    "target": target,
    "tie": tie,
    "valid": valid,
  }


def record_float(value) -> float:
  """An optional numeric record field (margin, confidence) as a float; missing = NaN."""
  return math.nan if value is None else float(value)
