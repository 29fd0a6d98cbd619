"""SentencePiece tokenizer with a PAD id that is never EOS, and batch padding.

The classic RLHF bug is a tokenizer whose pad id equals its eos id: every
mask built as `tokens != pad_id` then hides the EOS the policy was supposed
to learn to emit, and responses never end. Models trained here always use
the fixed layout PAD=0, EOS=1, BOS=2, UNK=3, and every loaded model is
checked for a PAD distinct from EOS. A loaded model without a PAD piece
(pad_id=-1, as Llama 2 and Mistral ship theirs) pads with the first id past
its pieces: `vocab_size` counts that id, so a model's embedding table gets a
row for it, SentencePiece never produces it, and `decode` drops it.

The serialized model proto (`Tokenizer.serialized()`) is the whole
tokenizer, so a checkpoint can embed it and restore with `from_bytes`.

Shape legend: B batch, T length.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import sentencepiece as spm

from rlhf_jax import utils

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

# Options that `train` owns: overriding them would break the fixed special-id
# layout, the in-memory training, or determinism.
_RESERVED_TRAINER_OPTIONS = frozenset(
  {
    "input",
    "model_prefix",
    "sentence_iterator",
    "model_writer",
    "vocab_size",
    "model_type",
    "pad_id",
    "eos_id",
    "bos_id",
    "unk_id",
    "pad_piece",
    "eos_piece",
    "bos_piece",
    "unk_piece",
    "num_threads",
    "character_coverage",
    "user_defined_symbols",
  }
)


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` so readers see either the old file or the whole new one."""
  with utils.atomic_open(path, "wb") as f:
    f.write(data)


class Tokenizer:
  """A validated SentencePiece model: EOS exists and PAD differs from it.

  Build one with `Tokenizer.train`, `Tokenizer.load` or `Tokenizer.from_bytes`.
  """

  filename = "tokenizer.model"  # a stage keeps its tokenizer under this name

  def __init__(self, model_proto: bytes, *, source: str = "<in-memory model>"):
    """Parses and validates a serialized SentencePiece ModelProto.

    A model without a PAD piece pads with the first id past its pieces (see
    the module docstring).

    Args:
      model_proto: the bytes of a `.model` file.
      source: where the bytes came from (a path), used in error messages.

    Raises:
      ValueError: the bytes are not a SentencePiece model, or its special
        pieces are unusable (no EOS, PAD == EOS, or ids that collide).
    """
    self._source = source
    if not model_proto:
      # Checked first: asking an empty model for its size logs a C++ error.
      raise ValueError(f"{source}: not a valid SentencePiece model (the file is empty)")
    try:
      processor = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
    except RuntimeError as error:
      raise ValueError(f"{source}: not a valid SentencePiece model ({error})") from error
    if processor.vocab_size() == 0:
      # An empty proto parses cleanly into a model with no pieces.
      raise ValueError(f"{source}: not a valid SentencePiece model (it has no pieces)")
    pad_id, eos_id = processor.pad_id(), processor.eos_id()
    if eos_id < 0:
      raise ValueError(f"{source}: SentencePiece model has no EOS piece (eos_id=-1).")
    if pad_id == eos_id:
      raise ValueError(
        f"{source}: SentencePiece model uses the same id {pad_id} for PAD and EOS; padding "
        "masks would hide every EOS. Retrain with distinct ids (Tokenizer.train does)."
      )
    specials = [i for i in (pad_id, eos_id, processor.bos_id(), processor.unk_id()) if i >= 0]
    if len(set(specials)) != len(specials):
      raise ValueError(f"{source}: SentencePiece special ids collide: {specials}")
    self._processor = processor
    self._num_pieces = processor.vocab_size()
    # No PAD piece: pad with an id no text encodes to (see the module docstring).
    self._pad_id = pad_id if pad_id >= 0 else self._num_pieces
    self._pad_piece = processor.id_to_piece(pad_id) if pad_id >= 0 else self._free_piece("<pad>")

  def _free_piece(self, name: str) -> str:
    """`name`, or a variant of it, that is no piece of the model (to name the added PAD)."""
    while self._processor.piece_to_id(name) != self._processor.unk_id():  # UNK: no such piece
      name = name[:-1] + "_>"
    return name

  # ---------------------------------------------------------------- building

  @classmethod
  def train(
    cls,
    texts: Iterable[str],
    vocab_size: int,
    *,
    model_type: Literal["unigram", "bpe"] = "unigram",
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (),
    model_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **trainer_options: Any,
  ) -> Tokenizer:
    """Trains a model in memory from a text iterator; same input, same bytes.

    Args:
      texts: training sentences, one string each; consumed once.
      vocab_size: target vocabulary size, including the 4 special pieces. It
        is a soft limit: a corpus too small to fill it gives a smaller vocab
        instead of an error. It must still cover the distinct characters.
      model_type: "unigram" or "bpe".
      character_coverage: fraction of characters that get their own piece;
        the rest map to UNK. 1.0 suits small alphabets.
      user_defined_symbols: pieces that always encode as one id (ids 4, 5, ...).
      model_path: if given, the `.model` file is also written there atomically.
      seed: SentencePiece's random seed. It is process-global in the library.
      **trainer_options: further SentencePieceTrainer flags (e.g.
        byte_fallback=True, normalization_rule_name="identity"); flags that
        fix the special ids or threading are refused.

    Returns:
      The trained Tokenizer with PAD=0, EOS=1, BOS=2, UNK=3.

    Raises:
      ValueError: bad arguments, no non-empty text, or SentencePiece refused
        the settings (most often vocab_size below the character count).
    """
    if model_type not in ("unigram", "bpe"):
      raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if isinstance(texts, str):
      raise TypeError("texts must be an iterable of strings, not a single string")
    if isinstance(user_defined_symbols, str):
      raise TypeError("user_defined_symbols must be a sequence of strings, not one string")
    reserved = sorted(_RESERVED_TRAINER_OPTIONS.intersection(trainer_options))
    if reserved:
      raise ValueError(f"Tokenizer.train sets these SentencePiece options itself: {reserved}")

    # SentencePiece turns an exception inside the iterator into an opaque
    # RuntimeError; keep the original so the caller sees the real cause.
    failures: list[Exception] = []
    num_nonempty = 0

    def sentences() -> Iterator[str]:
      nonlocal num_nonempty
      try:
        for index, text in enumerate(texts):
          if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
          num_nonempty += bool(text.strip())
          yield text
      except Exception as error:
        failures.append(error)
        raise

    minloglevel = trainer_options.pop("minloglevel", 1)  # 1: warnings, not the INFO flood
    spm.set_random_generator_seed(seed)
    model_writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model_writer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=list(user_defined_symbols),
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        # A soft limit, so a few hundred short sentences with vocab 64..300
        # train instead of failing with "Vocabulary size too high".
        hard_vocab_limit=False,
        # One thread: multi-threaded EM sums floats in a racy order, which
        # changes piece scores between runs.
        num_threads=1,
        # Keep every sentence in order; sampling would depend on the seed.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=minloglevel,
        **trainer_options,
      )
    except (RuntimeError, ValueError) as error:
      if failures:
        raise failures[0] from None
      if num_nonempty == 0:
        raise ValueError("Tokenizer.train got no non-empty texts") from error
      raise ValueError(
        f"SentencePiece training failed (vocab_size={vocab_size}, model_type={model_type!r}, "
        f"character_coverage={character_coverage}): {error}"
      ) from error

    tokenizer = cls(model_writer.getvalue(), source="<Tokenizer.train>")
    if model_path is not None:
      tokenizer.save(model_path)
    return tokenizer

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Reads a `.model` file; errors name the path."""
    path = os.fspath(path)
    try:
      with open(path, "rb") as f:
        model_proto = f.read()
    except FileNotFoundError as error:
      raise FileNotFoundError(f"SentencePiece model file not found: {path}") from error
    return cls(model_proto, source=path)

  @classmethod
  def from_bytes(cls, serialized_model_proto: bytes) -> Tokenizer:
    """Restores a tokenizer from `serialized()` bytes (e.g. from a checkpoint)."""
    return cls(serialized_model_proto, source="<serialized model proto>")

  def serialized(self) -> bytes:
    """The model proto bytes: the exact contents of a `.model` file."""
    return self._processor.serialized_model_proto()

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the `.model` file atomically (temp file, then os.replace)."""
    _atomic_write(path, self.serialized())

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, source={self._source!r})"

  @property
  def source(self) -> str:
    """Where the model came from (its path, or a description), for error messages."""
    return self._source

  # -------------------------------------------------------------- special ids

  @property
  def vocab_size(self) -> int:
    """Number of ids, all in [0, vocab_size): the pieces, plus the PAD past them for a
    model without a PAD piece."""
    return self._num_pieces + self.has_added_pad

  @property
  def num_pieces(self) -> int:
    """Number of pieces in the SentencePiece model (`vocab_size` less an added PAD)."""
    return self._num_pieces

  @property
  def has_added_pad(self) -> bool:
    """Whether PAD is the id past the pieces (the model has no PAD piece)."""
    return self._pad_id == self._num_pieces

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  @property
  def bos_id(self) -> int:
    """BOS id, or -1 for a loaded model that has none."""
    return self._processor.bos_id()

  @property
  def unk_id(self) -> int:
    return self._processor.unk_id()

  # -------------------------------------------------------- encode and decode

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text to ids, shape [T], optionally wrapped in BOS ... EOS."""
    if not isinstance(text, str):
      # SentencePiece would silently batch-encode a list.
      raise TypeError(f"encode takes one str, got {type(text).__name__}; use encode_batch")
    return self._processor.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(
    self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    """Texts to ragged ids, B lists of shape [T_b]; pad with `pad_batch`."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of str, not one str; use encode")
    texts = list(texts)
    for index, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
    if not texts:
      return []
    return self._processor.encode(texts, out_type=int, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Sequence[int] | npt.ArrayLike) -> str:
    """Ids [T] (list, numpy or jax array) to text.

    PAD ids are skipped wherever they are (left-padded prompts put them
    first), and decoding stops at the first EOS: what a policy samples after
    EOS is not part of its response.
    """
    array = np.asarray(ids)
    if array.ndim != 1:
      raise ValueError(f"decode takes ids of shape [T], got {array.shape}; use decode_batch")
    if array.size == 0:
      return ""
    if not np.issubdtype(array.dtype, np.integer):
      raise TypeError(f"decode takes integer ids, got dtype {array.dtype}")
    eos_positions = np.flatnonzero(array == self.eos_id)
    if eos_positions.size:
      array = array[: eos_positions[0]]
    array = array[array != self.pad_id]
    out_of_range = array[(array < 0) | (array >= self.vocab_size)]
    if out_of_range.size:
      # Typically a model whose vocab was padded past the tokenizer's.
      raise ValueError(f"id {int(out_of_range[0])} is outside [0, {self.vocab_size})")
    return self._processor.decode(array.tolist())

  def decode_batch(self, batch: Sequence[Sequence[int]] | npt.ArrayLike) -> list[str]:
    """Ids [B, T] (ragged lists or a 2-D array) to B texts, as `decode`."""
    if isinstance(batch, np.ndarray) or hasattr(batch, "__array__"):
      batch = np.asarray(batch)
      if batch.ndim != 2:
        raise ValueError(f"decode_batch takes ids of shape [B, T], got {batch.shape}")
    return [self.decode(row) for row in batch]

  def id_to_piece(self, token_id: int) -> str:
    """The piece string of one id (e.g. "▁the", "</s>"); an added PAD is named "<pad>"
    (or a variant that no piece uses)."""
    token_id = int(token_id)
    if not 0 <= token_id < self.vocab_size:
      raise IndexError(f"id {token_id} is outside [0, {self.vocab_size})")
    if token_id == self._pad_id:
      return self._pad_piece
    return self._processor.id_to_piece(token_id)

  def piece_to_id(self, piece: str) -> int:
    """The id of a piece (or of the added PAD's name); unknown pieces give `unk_id`."""
    if piece == self._pad_piece:
      return self._pad_id
    return self._processor.piece_to_id(piece)


def pad_batch(
  seqs: Sequence[Sequence[int]],
  length: int,
  pad_id: int,
  side: Literal["left", "right"],
) -> tuple[np.ndarray, np.ndarray]:
  """Pads ragged id lists to a fixed length.

  Left padding is for prompts fed to generation, so every prompt ends at the
  same position and new tokens are appended after it; right padding is for
  training sequences. The mask comes from the lengths, not from comparing to
  `pad_id`, so it stays right even if a sequence contains that id.

  Args:
    seqs: B sequences of ids, each of length at most `length`.
    length: T, the padded length.
    pad_id: the id written into padding positions.
    side: "left" (pad before the ids) or "right" (pad after them).

  Returns:
    tokens: [B, T] int32, ids with `pad_id` in the padding.
    mask: [B, T] bool, True on real ids.

  Raises:
    ValueError: a sequence is longer than `length`, or bad `side`/`length`.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  if length < 0:
    raise ValueError(f"length must be >= 0, got {length}")
  tokens = np.full((len(seqs), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(seqs), length), dtype=np.bool_)
  for row, seq in enumerate(seqs):
    ids = np.asarray(seq, dtype=np.int32)
    if ids.ndim != 1:
      raise ValueError(f"row {row} must be a flat list of ids, got shape {ids.shape}")
    n = ids.shape[0]
    if n > length:
      raise ValueError(f"row {row} has length {n}, longer than the padded length {length}")
    start = length - n if side == "left" else 0
    tokens[row, start : start + n] = ids
    mask[row, start : start + n] = True
  return tokens, mask
