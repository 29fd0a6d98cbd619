"""A deterministic, checkpointable loader over random-access sources, and SFT batches.

    loader = Loader(builder.source("train"), global_batch_size=64, seed=0,
                    collate=functools.partial(sft_collate, tokenizer=tok, max_len=512))
    for batch in global_batches(loader, mesh):   # jax.Arrays sharded over the batch
      ...
      checkpoint["data"] = loader.get_state()      # JSON; restore with set_state

Which examples form batch k depends only on (seed, len(source), global batch
size, drop_remainder, shuffle), never on the number of processes or on
where a run was restarted:

- Epoch e visits the examples in the order
  `np.random.default_rng([seed, e]).permutation(len(source))` (or in source
  order with `shuffle=False`), cut into consecutive global batches. A batch
  never spans two epochs; with `drop_remainder` the last `len % batch`
  examples of each permutation are skipped, a different few each epoch.
- Each process reads only a contiguous slice of every global batch:
  process p of P gets rows [p * B / P, (p + 1) * B / P). Those are exactly
  the rows `jax.make_array_from_process_local_data` gives to p's devices on
  a mesh whose processes own consecutive blocks of the batch axes (the
  usual layout from `jax.make_mesh`), so the assembled global array equals
  the single-process batch row for row.
- The state is (epoch, the next example's position in that epoch's order).
  It advances only once a batch has been produced; restoring it continues
  with exactly the batches an uninterrupted run would have produced.

Shape legend: B batch, T length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import chat
from rlhf_jax.data.tokenizer import Tokenizer, pad_batch

Batch = dict[str, np.ndarray]


class RandomAccessSource(Protocol):
  """Anything with a length and integer indexing: a TFDS data source, a list."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


def stack_collate(examples: Sequence[Mapping[str, Any]]) -> Batch:
  """Stacks each field of dict examples into an array with a leading batch axis."""
  if not examples:
    raise ValueError("cannot collate an empty list of examples")
  return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}


class Loader:
  """Iterates this process's share of each global batch, for one or more epochs.

  `next(loader)` returns `collate([transform(example) for each local row])`.
  """

  def __init__(
    self,
    source: RandomAccessSource,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    collate: Callable[[list[Any]], Batch] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    """Args:
    source: random-access examples (`len(source)`, `source[i]`); a
      `__getitems__(indices)` method, as TFDS array_record sources have,
      is used to read a process's rows in one call.
    global_batch_size: B, rows summed over all processes.
    seed: fixes the order of every epoch.
    shuffle: reshuffle each epoch; False keeps source order (evaluation).
    drop_remainder: skip an epoch's last partial batch. Keep True for
      multi-process training: `host_to_global` needs equal shares.
    num_epochs: stop after this many epochs; None repeats forever.
    transform: applied to each example after reading (e.g. tokenize).
    collate: list of transformed examples -> dict of [B_local, ...] arrays;
      default `stack_collate`.
    process_index, process_count: this process and how many read; default
      `jax.process_index()` and `jax.process_count()`.
    """
    num_examples = len(source)
    if global_batch_size <= 0:
      raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if num_examples == 0:
      raise ValueError("the source has no examples")
    if drop_remainder and num_examples < global_batch_size:
      # Every epoch would be empty and an infinite loader would spin forever.
      raise ValueError(
        f"the source has {num_examples} examples, fewer than one global batch of "
        f"{global_batch_size} (drop_remainder=True)"
      )
    if not isinstance(seed, int | np.integer) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if num_epochs is not None and num_epochs < 0:
      raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by {process_count} processes"
      )
    self._source = source
    self._num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.num_epochs = num_epochs
    self.process_index = process_index
    self.process_count = process_count
    self._transform = transform
    self._collate = collate or stack_collate
    self._epoch = 0
    self._position = 0
    self._order_epoch = -1
    self._order = np.empty(0, np.int64)

  # ------------------------------------------------------------- properties

  @property
  def num_examples(self) -> int:
    return self._num_examples

  @property
  def local_batch_size(self) -> int:
    """Rows this process gets in each full batch."""
    return self.global_batch_size // self.process_count

  @property
  def batches_per_epoch(self) -> int:
    full, rest = divmod(self._num_examples, self.global_batch_size)
    return full + (1 if rest and not self.drop_remainder else 0)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from (0-based)."""
    return self._epoch

  # ------------------------------------------------------------------- order

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[len(source)] int64: the order in which epoch `epoch` visits the examples."""
    if epoch != self._order_epoch:
      if self.shuffle:
        # Seeded by (seed, epoch), not by a generator carried across epochs,
        # so any epoch's order is recomputed from the state alone.
        rng = np.random.default_rng([self.seed, epoch])
        self._order = rng.permutation(self._num_examples)
      else:
        self._order = np.arange(self._num_examples)
      self._order_epoch = epoch
    return self._order

  def _local_slice(self, batch_size: int) -> slice:
    # Integer division spreads a partial last batch as evenly as it can;
    # for a full batch every process gets exactly B / P contiguous rows.
    start = batch_size * self.process_index // self.process_count
    stop = batch_size * (self.process_index + 1) // self.process_count
    return slice(start, stop)

  def _batch_size_at(self, position: int) -> int:
    """Rows of the batch starting at `position` of an epoch; 0 when the epoch is done."""
    size = min(self._num_examples - position, self.global_batch_size)
    return size if size == self.global_batch_size or not self.drop_remainder else 0

  def _next_indices(self) -> tuple[np.ndarray, int, int]:
    """(global indices of the next batch, epoch and position of the batch after it)."""
    epoch, position = self._epoch, self._position
    # Only a state from set_state can point past an epoch's last batch.
    while self._batch_size_at(position) == 0:
      epoch, position = epoch + 1, 0
    if self.num_epochs is not None and epoch >= self.num_epochs:
      raise StopIteration
    size = self._batch_size_at(position)
    indices = self.epoch_order(epoch)[position : position + size]
    position += size
    if self._batch_size_at(position) == 0:
      # Step over the dropped remainder now, so the state and `epoch` name
      # the epoch the next batch really comes from.
      epoch, position = epoch + 1, 0
    return indices, epoch, position

  # ---------------------------------------------------------------- iterate

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> Batch:
    global_indices, epoch, position = self._next_indices()
    local = [int(i) for i in global_indices[self._local_slice(len(global_indices))]]
    getitems = getattr(self._source, "__getitems__", None)
    examples = getitems(local) if getitems is not None else [self._source[i] for i in local]
    if self._transform is not None:
      examples = [self._transform(e) for e in examples]
    batch = self._collate(list(examples))
    # Advance only once the batch exists: an exception while reading leaves
    # the state at this batch, so a retry or a saved state does not skip it.
    self._epoch, self._position = epoch, position
    return batch

  # ------------------------------------------------------------------- state

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: the next batch starts at `position` of `epoch`."""
    return {
      "seed": self.seed,
      "epoch": self._epoch,
      "position": self._position,
      "num_examples": self._num_examples,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a `get_state()` dict; the next batch is the one that followed it.

    Raises:
      ValueError: the state is malformed, or was saved with another seed or
        a source of another length (its positions would mean other examples).
    """
    missing = {"seed", "epoch", "position"} - set(state)
    if missing:
      raise ValueError(f"loader state lacks {sorted(missing)}: {dict(state)}")
    seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
    if seed != self.seed:
      raise ValueError(f"loader state has seed {seed}, but this loader has seed {self.seed}")
    num_examples = int(state.get("num_examples", self._num_examples))
    if num_examples != self._num_examples:
      raise ValueError(
        f"loader state is for a source of {num_examples} examples, but this source has "
        f"{self._num_examples}; the data changed since the state was saved"
      )
    if epoch < 0 or not 0 <= position <= self._num_examples:
      raise ValueError(f"loader state out of range: epoch {epoch}, position {position}")
    self._epoch, self._position = epoch, position


def global_batches(batches: Iterator[Batch], mesh: jax.sharding.Mesh) -> Iterator[Any]:
  """Yields each host batch as global jax.Arrays, batch axis over (data, fsdp).

  The loader is pulled one batch at a time, so `loader.get_state()` taken
  after a step matches the batches that step consumed.
  """
  for batch in batches:
    yield sharding.host_to_global(batch, mesh)


# ---------------------------------------------------------------------- SFT


def fit_lengths(
  lead_lengths: Sequence[int], rest_lengths: Sequence[int], max_len: int, bos_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """How `[BOS] + lead + rest` rows fit in `max_len` tokens.

  `lead` is the context before the row's first target token, `rest` everything from that
  target on (later context and EOS included). The rest is kept whole; the lead loses
  tokens from its start when there is no room, but keeps at least one when it has any (a
  response with no prompt is not an example of answering it). Truncating only the lead
  keeps every target, and the context nearest to the first one.

  Returns:
    dropped [N] bool (the row does not fit), truncated [N] bool (the lead lost tokens),
    kept [N] int (lead tokens kept; 0 for a dropped row).
  """
  lead = np.asarray(lead_lengths, np.int64)
  room = max_len - bos_len - np.asarray(rest_lengths, np.int64)
  dropped = room < np.minimum(1, lead)
  truncated = ~dropped & (lead > room)
  kept = np.where(dropped, 0, np.minimum(lead, np.maximum(room, 0)))
  return dropped, truncated, kept


def fit_rows(
  prompt_lengths: Sequence[int], response_lengths: Sequence[int], max_len: int, bos_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """How `[BOS] + prompt + response + [EOS]` rows fit in `max_len` tokens (`fit_lengths`).

  The response and EOS are kept whole; the prompt loses tokens from its start when
  there is no room, but keeps at least one. Shared by `sft_collate` (through
  `fit_lengths`) and the length reports (`rlhf_jax.data.lengths`), so both count the same
  rows.

  Returns:
    dropped [N] bool (the row does not fit), truncated [N] bool (the prompt lost
    tokens), kept [N] int (prompt tokens kept; 0 for a dropped row).
  """
  rest = np.asarray(response_lengths, np.int64) + 1  # the response and its EOS
  return fit_lengths(prompt_lengths, rest, max_len, bos_len)


def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def record_pieces(
  record: Mapping[str, Any], train_on: str = "assistant", fmt: Any = chat.PLAIN
) -> list[chat.Piece]:
  """The pieces an SFT record is tokenized in (see `chat.sft_pieces`).

  A chat record (a non-empty "messages": a list of turns or its JSON text) gives its
  conversation's pieces in the chat format `fmt` (the tokenizer's chat template, or the
  plain format: `chat.format_for`); a {"prompt", "response"} record is the one-turn case,
  used as it is: the prompt (trained only with `train_on="all"`), then the response as a
  trained reply.
  """
  messages = record.get("messages")
  if messages:
    return fmt.sft_pieces(chat.decode_messages(messages), train_on)
  if train_on not in chat.TRAIN_ON:
    raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(chat.TRAIN_ON)}")
  return [
    chat.Piece(_text(record["prompt"]), train_on == "all", False),
    chat.Piece(_text(record["response"]), True, True),
  ]


def record_prompt(record: Mapping[str, Any], tokenizer: Tokenizer) -> str:
  """The text a policy is asked to continue for an SFT record: a chat record's turns before
  its last reply in the tokenizer's chat format (`chat.format_for`), else its "prompt"."""
  messages = record.get("messages")
  if messages:
    return chat.format_for(tokenizer).last_exchange(chat.decode_messages(messages))[0]
  return _text(record["prompt"])


def sft_sequences(
  examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, train_on: str = "assistant"
) -> list[tuple[list[int], list[bool]]]:
  """Each record's tokens after BOS and which of them are targets, before any truncation.

  Every piece is tokenized on its own (all of them in one `encode_batch` call), so a
  prompt/response record gives `prompt + response + [EOS]` exactly as before chat records
  existed; an EOS follows every reply and is a target when the reply is. Shared by
  `sft_rows` and the length reports (`lengths.sft_fit`).
  """
  if tokenizer.pad_id == tokenizer.eos_id:
    raise ValueError("the tokenizer pads with its EOS id; masks would hide every EOS")
  fmt = chat.format_for(tokenizer)
  pieces = [record_pieces(e, train_on, fmt) for e in examples]
  encoded = iter(tokenizer.encode_batch([p.text for ps in pieces for p in ps]))
  out = []
  for parts in pieces:
    ids: list[int] = []
    targets: list[bool] = []
    for piece in parts:
      piece_ids = next(encoded)
      ids += piece_ids
      targets += [piece.trained] * len(piece_ids)
      if piece.reply:
        ids.append(tokenizer.eos_id)
        targets.append(piece.trained)
    out.append((ids, targets))
  return out


def first_target(targets: Sequence[bool]) -> int:
  """The index of the first target token (the length of the lead), len() when none."""
  for i, target in enumerate(targets):
    if target:
      return i
  return len(targets)


def sft_rows(
  examples: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  max_len: int,
  *,
  add_bos: bool = True,
  train_on: str = "assistant",
) -> tuple[list[tuple[list[int], list[bool]]], np.ndarray, np.ndarray]:
  """The unpadded rows of SFT records: `[BOS] + sft_sequences(...)`, fitted to `max_len`.

  A row too long loses tokens from the start of its lead (the context before its first
  target, `fit_lengths`); a row that cannot fit even so is dropped.

  Returns:
    rows: N (ids, targets) pairs, BOS included (never a target); ([], []) for a dropped row.
    truncated: [N] bool, the row's lead lost tokens from its start.
    dropped: [N] bool, the row does not fit.
  """
  sequences = sft_sequences(examples, tokenizer, train_on)
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
  leads = [first_target(targets) for _, targets in sequences]
  rests = [len(ids) - lead for (ids, _), lead in zip(sequences, leads, strict=True)]
  dropped, truncated, kept = fit_lengths(leads, rests, max_len, len(bos))
  rows = []
  for i, (ids, targets) in enumerate(sequences):
    if dropped[i]:
      rows.append(([], []))
      continue
    start = leads[i] - int(kept[i])
    rows.append(([*bos, *ids[start:]], [False] * len(bos) + targets[start:]))
  return rows, truncated, dropped


def sft_collate(
  examples: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  max_len: int,
  *,
  add_bos: bool = True,
  train_on: str = "assistant",
) -> Batch:
  """Tokenizes SFT records into right-padded training rows, one record per row.

  A prompt/response row is `[BOS] + prompt + response + [EOS]`, prompt and response
  tokenized separately; a chat row (`"messages"`) is `[BOS]`, then each context piece and
  each assistant reply followed by EOS (`chat.sft_pieces`). Too long a row loses tokens
  from the *start* of its context before the first target (the end, next to the reply,
  matters most) and is flagged in `truncated`. If even BOS, one context token and
  everything from the first target on do not fit, the row is dropped: it stays in the
  batch (so shards keep their shape) but is all PAD with both masks False, and flagged in
  `dropped`. Sum the flags for counts. Padding uses the tokenizer's PAD id, never EOS.

  Args:
    examples: B dicts with "prompt" and "response" text (str or UTF-8 bytes), or with
      "messages" (see `record_pieces`).
    tokenizer: supplies the ids; PAD must differ from EOS.
    max_len: T, the padded length.
    add_bos: start each row with BOS (when the tokenizer has one).
    train_on: which tokens are targets: "assistant" (every reply and its EOS), "last"
      (the last reply), "all" (every token after BOS).

  Returns:
    tokens: [B, T] int32, PAD after the row.
    input_mask: [B, T] bool, True on real tokens.
    loss_mask: [B, T] bool, True exactly where `tokens` holds a target (with the default
      `train_on`, a reply token or its EOS), predicted from the position before.
    truncated: [B] bool, the row lost tokens from the start of its context.
    dropped: [B] bool, the row did not fit and is empty.
  """
  rows, truncated, dropped = sft_rows(
    examples, tokenizer, max_len, add_bos=add_bos, train_on=train_on
  )
  tokens, input_mask = pad_batch([ids for ids, _ in rows], max_len, tokenizer.pad_id, "right")
  loss_mask = np.zeros_like(input_mask)
  for i, (_, targets) in enumerate(rows):
    loss_mask[i, : len(targets)] = targets
  return {
    "tokens": tokens,
    "input_mask": input_mask,
    "loss_mask": loss_mask,
    "truncated": truncated,
    "dropped": dropped,
  }
