"""Records too long for `max_len`: counted per file, reported, and left out before training.

A row is `[BOS] + prompt + response + [EOS]` (a chat record: its context pieces and
replies, `loader.sft_rows`); a prompt (the context before the first target) too long loses
its start (`truncated`), a row whose targets alone do not fit is `dropped`
(`loader.fit_lengths`). Trainers check every record once before their first step:

    kept, report = lengths.check(source, lengths.sft_fit(tok), what="SFT examples",
                                 max_len=config.max_len)
    train_source = lengths.Subset(source, kept)   # only rows with target tokens

and write the report into `<workdir>/data_info.json`: per input file the records,
the dropped and the truncated ones, and where the first dropped ones are
(file:line). More than `WARN_FRACTION` dropped is a warning; none left is an
error naming the files and the key to raise, instead of training on rows of
padding at loss 0. One 1 MB string is no longer silently lost: it is counted,
named and left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data import loader
from rlhf_jax.data.loader import fit_rows
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import DataError

WARN_FRACTION = 0.01  # dropped records above this fraction of a split are worth a warning
_MAX_LISTED = 5
_CHUNK = 4096

# records -> (dropped [N] bool, truncated [N] bool, tokens needed [N] int), optionally with a
# fourth [N] int: the tokens each kept row takes (what sequence packing needs).
FitFn = Callable[[Sequence[Mapping[str, Any]]], tuple[np.ndarray, ...]]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _fit(tokenizer: Tokenizer, max_len: int, prompts, responses):
  bos = 1 if tokenizer.bos_id >= 0 else 0
  p = np.asarray([len(ids) for ids in tokenizer.encode_batch([_text(t) for t in prompts])])
  r = np.asarray([len(ids) for ids in tokenizer.encode_batch([_text(t) for t in responses])])
  dropped, truncated, _ = fit_rows(p, r, max_len, bos)
  needed = bos + np.minimum(p, 1) + r + 1  # the shortest row that keeps the record
  return dropped, truncated, needed


def sft_fit(
  tokenizer: Tokenizer, max_len: int, train_on: str = "assistant", add_bos: bool = True
) -> FitFn:
  """How SFT records (`{prompt, response}` or chat `messages`) fit as rows of `sft_collate`.

  The fourth array is each kept row's length in tokens (max_len for a truncated one), from
  the same token layout as the collate (`loader.sft_sequences`), so a packer can place rows
  without tokenizing the records again.
  """

  def fit(records):
    sequences = loader.sft_sequences(records, tokenizer, train_on)
    bos = 1 if add_bos and tokenizer.bos_id >= 0 else 0
    lead = np.asarray([loader.first_target(t) for _, t in sequences], np.int64)
    rest = np.asarray([len(ids) for ids, _ in sequences], np.int64) - lead
    dropped, truncated, kept = loader.fit_lengths(lead, rest, max_len, bos)
    needed = bos + np.minimum(lead, 1) + rest  # the shortest row that keeps the record
    length = np.where(dropped, 0, bos + kept + rest)
    return dropped, truncated, needed, length

  return fit


def pair_fit(tokenizer: Tokenizer, max_len: int) -> FitFn:
  """How preference records fit: both the chosen and the rejected row must."""

  def fit(records):
    prompts = [r["prompt"] for r in records]
    sides = [
      _fit(tokenizer, max_len, prompts, [r[s] for r in records]) for s in ("chosen", "rejected")
    ]
    (d1, t1, n1), (d2, t2, n2) = sides
    return d1 | d2, t1 | t2, np.maximum(n1, n2)

  return fit


def _read(source: Any, indices: list[int]) -> list[Any]:
  if hasattr(source, "__getitems__"):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


def check(
  source: Any,
  fit: FitFn,
  *,
  what: str,
  max_len: int,
  key: str = "config.max_len",
) -> tuple[np.ndarray, dict[str, Any]]:
  """Which records of `source` fit, and the report of those that do not.

  Args:
    source: random-access records; a built source (`builders.RecordSource`) names
      each record's file and line, any other is counted as one "<what>" file.
    fit: `sft_fit(...)` or `pair_fit(...)`.
    what: the records, for messages ("training pairs").
    max_len: the row length the records must fit.
    key: the config key of `max_len`, for messages.
  Returns:
    kept: [K] int64 indices of the records that fit, in order.
    report: {"max_len", "records", "kept", "dropped", "truncated", "files":
      {path: {"records", "dropped", "truncated"}}, "first_dropped": [file:line, ...]}.
  Raises:
    DataError: no record fits; the message names the files, the shortest row
      needed and the key to raise.
  """
  kept, report, _ = _check(source, fit, what=what, max_len=max_len, key=key)
  return kept, report


def _check(
  source: Any, fit: FitFn, *, what: str, max_len: int, key: str
) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
  """`check`, and the kept rows' lengths when `fit` gives them (else None)."""
  n = len(source)
  has_files = hasattr(source, "file_of")
  files: dict[str, dict[str, int]] = {}
  kept: list[np.ndarray] = []
  row_lengths: list[np.ndarray] = []
  first: list[str] = []
  shortest = None
  dropped_total = truncated_total = 0
  for start in range(0, n, _CHUNK):
    indices = list(range(start, min(n, start + _CHUNK)))
    records = _read(source, indices)
    dropped, truncated, needed, *length = fit(records)
    kept.append(np.asarray(indices, np.int64)[~dropped])
    if length:
      row_lengths.append(np.asarray(length[0], np.int64)[~dropped])
    dropped_total += int(dropped.sum())
    truncated_total += int(truncated.sum())
    shortest = int(needed.min()) if shortest is None else min(shortest, int(needed.min()))
    for j, i in enumerate(indices):
      name = source.file_of(i) if has_files else f"<{what}>"
      counts = files.setdefault(name, {"records": 0, "dropped": 0, "truncated": 0})
      counts["records"] += 1
      counts["dropped"] += int(dropped[j])
      counts["truncated"] += int(truncated[j])
      if dropped[j] and len(first) < _MAX_LISTED:
        where = source.where(i, records[j]) if hasattr(source, "where") else f"{what} {i}"
        first.append(f"{where} (needs {int(needed[j])} tokens)")
  kept_indices = np.concatenate(kept) if kept else np.zeros(0, np.int64)
  report = {
    "max_len": max_len,
    "records": n,
    "kept": len(kept_indices),
    "dropped": dropped_total,
    "truncated": truncated_total,
    "files": files,
    "first_dropped": first,
  }
  if n and not len(kept_indices):
    raise DataError(
      ", ".join(sorted(files)),
      0,
      f"none of the {n} {what} fits {key}={max_len} (BOS + prompt + response + EOS; the "
      f"shortest needs {shortest} tokens)",
      hint=f"Raise {key}, or give shorter records.",
    )
  if dropped_total > WARN_FRACTION * n:
    logging.warning(
      "%d of %d %s (%.1f%%) do not fit %s=%d and are left out; first: %s. Counts per file are "
      "in data_info.json.",
      dropped_total,
      n,
      what,
      100.0 * dropped_total / n,
      key,
      max_len,
      "; ".join(first),
    )
  elif dropped_total:
    logging.info("%d of %d %s do not fit %s=%d: left out.", dropped_total, n, what, key, max_len)
  kept_lengths = np.concatenate(row_lengths) if row_lengths else None
  return kept_indices, report, kept_lengths


def keep_fitting(
  sources: Mapping[str, Any], fit: FitFn, *, what: str, max_len: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """`check` for each split's source (None stays None): the fitting records and the reports.

  Args:
    sources: split name ("train", "eval") -> source or None.
    what: the records, after the split name in messages ("pairs" -> "train pairs").
  Returns:
    ({split: Subset or None}, {split: report}) for data_info.json's "lengths". With a fit
    that gives row lengths (`sft_fit`), each Subset's `row_lengths` holds them.
  """
  kept_sources, reports = {}, {}
  for split, source in sources.items():
    if source is None:
      kept_sources[split] = None
      continue
    kept, reports[split], row_lengths = _check(
      source, fit, what=f"{split} {what}", max_len=max_len, key="config.max_len"
    )
    kept_sources[split] = Subset(source, kept, row_lengths)
  return kept_sources, reports


class Subset:
  """The records of `source` at `indices`, as a random-access source (names them too).

  `row_lengths` ([len] int, or None when unknown): the tokens each record's row takes.
  """

  def __init__(self, source: Any, indices: Sequence[int], row_lengths: Sequence[int] | None = None):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self.row_lengths = None if row_lengths is None else np.asarray(row_lengths, np.int64)
    if self.row_lengths is not None and len(self.row_lengths) != len(self._indices):
      raise ValueError(f"{len(self.row_lengths)} row lengths for {len(self._indices)} records")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._indices[index])]

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    return _read(self._source, [int(self._indices[i]) for i in indices])

  def file_of(self, index: int) -> str:
    inner = int(self._indices[index])
    return self._source.file_of(inner) if hasattr(self._source, "file_of") else ""

  def where(self, index: int, record: Mapping[str, Any] | None = None) -> str:
    inner = int(self._indices[index])
    if hasattr(self._source, "where"):
      return self._source.where(inner, record)
    return f"record {inner}"
