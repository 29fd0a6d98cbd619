"""Sequence packing for SFT: several examples per row of `max_len` tokens, kept apart.

    packs = packing.pack(train_source.row_lengths, max_len, seed)   # once per run
    loader = Loader(packing.PackedSource(train_source, packs), global_batch_size=B, seed=seed,
                    collate=functools.partial(packing.pack_collate, tokenizer=tok,
                                              max_len=max_len))

Rows of short examples are mostly padding (the testbed's SFT rows fill about half of 64
tokens); packing puts several examples into one row and marks each with a segment id (1,
2, ... in the row; 0 is padding). The model then attends only within a segment and
restarts positions at 0 for each one (`models.segment_attention_mask`,
`models.positions_from_segments`), so every example is computed exactly as it would be
alone in a row, and the token-mean loss over a batch of packs equals the loss over the same
examples unpacked.

The packs are computed once per run from the examples' row lengths and a seed, before
the first step, and never change: the loader then treats each pack as one record, so its
checkpointed state (epoch, position among the packs) resumes exactly, and every epoch
visits every example once, in a new order of packs. A resumed run recomputes the same
packs from the same data, tokenizer and seed.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data.tokenizer import Tokenizer, pad_batch

_PACK_STREAM = 0x7061636B  # "pack": seeds the order of equal lengths


def pack(lengths: Sequence[int], max_len: int, seed: int = 0) -> list[np.ndarray]:
  """Best-fit-decreasing packing: lists of example indices whose lengths sum to <= max_len.

  The examples are taken longest first (ties in a seeded random order, so equal lengths
  do not pack in file order); each goes into the open pack with the least room that
  still holds it, or starts a new pack. Like first fit decreasing, best fit decreasing
  needs at most about 11/9 of the optimal number of packs, and with the open packs
  bucketed by their room it places each example in O(log max_len), so a million examples
  pack in seconds.

  Args:
    lengths: [N] tokens each example's row takes, each in [1, max_len].
    max_len: the row length.
    seed: fixes the order of equal lengths; the same inputs always give the same packs.

  Returns:
    The packs, in the order they were opened: int64 arrays of example indices, in the
    order they were placed. Every index in [0, N) is in exactly one pack.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 1:
    raise ValueError(f"lengths must be [N], got shape {lengths.shape}")
  bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"example {i} has length {int(lengths[i])}, outside [1, max_len={max_len}]")
  # A stream of its own, so the tie order is not the loader's order of any epoch.
  shuffled = np.random.default_rng([seed, _PACK_STREAM]).permutation(len(lengths))
  order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
  packs: list[list[int]] = []
  rooms: list[int] = []  # sorted distinct rooms that some open pack has
  open_by_room: dict[int, list[int]] = {}  # room -> open packs with exactly that room
  for index in order.tolist():
    length = int(lengths[index])
    at = bisect.bisect_left(rooms, length)
    if at < len(rooms):
      room = rooms[at]
      holders = open_by_room[room]
      target = holders.pop()
      if not holders:
        del open_by_room[room]
        rooms.pop(at)
    else:
      room, target = max_len, len(packs)
      packs.append([])
    packs[target].append(index)
    left = room - length
    if left:
      if left not in open_by_room:
        open_by_room[left] = []
        bisect.insort(rooms, left)
      open_by_room[left].append(target)
  return [np.asarray(p, np.int64) for p in packs]


def pack_stats(lengths: Sequence[int], packs: Sequence[np.ndarray], max_len: int) -> dict:
  """What packing saves: examples, packs, and the padding fraction packed and unpacked."""
  lengths = np.asarray(lengths, np.int64)
  tokens = int(lengths.sum())
  return {
    "examples": len(lengths),
    "packs": len(packs),
    "examples_per_pack": len(lengths) / max(len(packs), 1),
    "padding_fraction": 1.0 - tokens / max(len(packs) * max_len, 1),
    "unpacked_padding_fraction": 1.0 - tokens / max(len(lengths) * max_len, 1),
  }


class PackedSource:
  """Packs of a random-access source as records: `source[i]` is pack i's list of records."""

  def __init__(self, source: Any, packs: Sequence[np.ndarray]):
    self._source = source
    self._packs = [np.asarray(p, np.int64) for p in packs]

  def __len__(self) -> int:
    return len(self._packs)

  def __getitem__(self, index: int) -> list[Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[list[Any]]:
    # One batched read of every record of these packs (array_record reads in one call).
    members = [self._packs[int(i)] for i in indices]
    flat = [int(j) for m in members for j in m]
    getitems = getattr(self._source, "__getitems__", None)
    records = getitems(flat) if getitems is not None else [self._source[j] for j in flat]
    out, start = [], 0
    for m in members:
      out.append(list(records[start : start + len(m)]))
      start += len(m)
    return out


def pack_collate(
  packs: Sequence[Sequence[Mapping[str, Any]]],
  tokenizer: Tokenizer,
  max_len: int,
  *,
  add_bos: bool = True,
  train_on: str = "assistant",
) -> dict[str, np.ndarray]:
  """Packed training rows: each pack's SFT rows (`loader.sft_rows`) one after another.

  The first token of each example is never a target, even when it would be one alone
  (`train_on="all"` without BOS): in a packed row it would be predicted from the example
  before it, which is not its context; alone in a row, position 0 is never predicted.

  Returns:
    tokens: [B, T] int32, PAD after the last example.
    input_mask: [B, T] bool, True on real tokens.
    loss_mask: [B, T] bool, the targets.
    segment_ids: [B, T] int32, 1, 2, ... for the examples of a row, 0 on padding.

  Raises:
    ValueError: an example does not fit `max_len` or a pack overflows it (the packs
      were made for other lengths: another tokenizer, max_len or train_on).
  """
  flat = [record for p in packs for record in p]
  rows, _, dropped = loader_lib.sft_rows(
    flat, tokenizer, max_len, add_bos=add_bos, train_on=train_on
  )
  if dropped.any():
    raise ValueError(f"{int(dropped.sum())} packed examples do not fit max_len={max_len}")
  ids_rows, target_rows, segment_rows = [], [], []
  rows_iter = iter(rows)
  for p in packs:
    ids: list[int] = []
    targets: list[bool] = []
    segments: list[int] = []
    for segment in range(1, len(p) + 1):
      row_ids, row_targets = next(rows_iter)
      ids += row_ids
      targets += [False, *row_targets[1:]]
      segments += [segment] * len(row_ids)
    if len(ids) > max_len:
      raise ValueError(
        f"a pack of {len(p)} examples takes {len(ids)} tokens, more than max_len={max_len}"
      )
    ids_rows.append(ids)
    target_rows.append(targets)
    segment_rows.append(segments)
  tokens, input_mask = pad_batch(ids_rows, max_len, tokenizer.pad_id, "right")
  loss_mask = np.zeros_like(input_mask)
  segment_ids = np.zeros(tokens.shape, np.int32)
  for i, (targets, segments) in enumerate(zip(target_rows, segment_rows, strict=True)):
    loss_mask[i, : len(targets)] = targets
    segment_ids[i, : len(segments)] = segments
  return {
    "tokens": tokens,
    "input_mask": input_mask,
    "loss_mask": loss_mask,
    "segment_ids": segment_ids,
  }
