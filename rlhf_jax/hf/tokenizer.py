"""A Hugging Face tokenizer (`tokenizer.json`) behind the interface of `data.tokenizer`.

Read with the `tokenizers` library, so every model family's pre-tokenizer, merges and
added tokens behave exactly as in `transformers`. The special ids follow the model's
`tokenizer_config.json` (and `generation_config.json` for EOS):

- BOS: `bos_token`, unless it is missing or the same token as EOS (GPT-2's
  `<|endoftext|>` is both; such models start sequences without one); this framework adds
  BOS and EOS itself, so text is always encoded without the tokenizer's own specials;
- EOS: `eos_token` (else the first of generation_config's `eos_token_id`);
- PAD: `pad_token` when it differs from EOS (padding masks must never hide an EOS); else
  the first id past the tokenizer when the model's embedding table has rows the
  tokenizer never produces; else an error that names `pad_token`, since no id is then
  free to mean padding. PAD positions are always masked, so that id is never trained on.

`save(path)` writes the directory this was read from (its tokenizer files) to `path`,
the form a workdir and an export keep it in.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax import errors
from rlhf_jax.data.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")  # fmt: skip
DIRNAME = "tokenizer"  # where a workdir keeps a Hugging Face tokenizer


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as error:
    raise errors.DataError(path, 0, f"not readable JSON: {error}") from None
  if not isinstance(data, dict):
    raise errors.DataError(path, 0, "expected a JSON object")
  return data


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class HfTokenizer:
  """See the module docstring. `model_vocab_size`: rows of the model's embedding table."""

  filename = DIRNAME

  def __init__(self, directory: str, *, model_vocab_size: int | None = None):
    from tokenizers import Tokenizer as FastTokenizer

    self.directory = directory
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise errors.DataError(path, 0, "no such file (only tokenizer.json tokenizers are read)")
    try:
      self._tok = FastTokenizer.from_file(path)
    except Exception as error:  # the Rust library raises its own exception type
      raise errors.DataError(path, 0, f"not a readable tokenizer.json: {error}") from None
    config_path = os.path.join(directory, "tokenizer_config.json")
    self.config = _read_json(config_path)
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    self._size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(field: str) -> int | None:
      text = _token_text(self.config.get(field))
      if text is None:
        return None
      found = self._tok.token_to_id(text)
      if found is None:
        raise errors.DataError(config_path, 0, f"{field} {text!r} is not in tokenizer.json")
      return found

    eos = token_id("eos_token")
    if eos is None:
      ids = generation.get("eos_token_id")
      eos = ids[0] if isinstance(ids, list) and ids else ids
    if not isinstance(eos, int):
      raise errors.DataError(config_path, 0, "no eos_token (nor generation_config eos_token_id)",
                             field="eos_token")  # fmt: skip
    bos = token_id("bos_token")
    pad = token_id("pad_token")
    self._eos = eos
    self._bos = bos if bos is not None and bos != eos else -1
    if pad is None or pad == eos:
      if model_vocab_size is not None and model_vocab_size > self._size:
        pad = self._size
      else:
        raise errors.DataError(
          config_path, 0, "the tokenizer has no pad_token distinct from its eos_token and the "
          "model has no embedding row past the tokenizer's ids to pad with",
          field="pad_token", hint="Add a pad_token to tokenizer_config.json.",
        )  # fmt: skip
    self._pad = pad
    self.model_vocab_size = model_vocab_size or self._size
    self.chat_template, template_source = self._chat_template()
    self.chat_format = None  # data.chat.TemplateFormat when there is a template
    if self.chat_template is not None:
      self.chat_format = self._template_format(template_source, generation.get("eos_token_id"))

  def _template_format(self, source: str, generation_eos):
    """The chat template as a `chat.TemplateFormat` (compiled when first used).

    EOS is `eos_token`, unless the template ends an assistant turn with another token that
    generation_config.json also lists as an EOS (Gemma's `<end_of_turn>`, where `eos_token`
    is `<eos>`): then that one, so replies end and sampling stops where turns end.
    """
    from rlhf_jax.data import chat

    special = {}
    for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
      text = _token_text(self.config.get(field))
      if text is not None:
        special[field] = text
    fmt = chat.TemplateFormat(
      self.chat_template,
      special_tokens=special,
      bos_text=self.id_to_piece(self._bos) if self._bos >= 0 else "",
      eos_text=self.id_to_piece(self._eos),
      source=source,
    )
    ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    others = [i for i in ids if isinstance(i, int) and i != self._eos and 0 <= i < self._size]
    if others:
      try:
        turn_end = fmt.turn_end()
      except errors.DataError:
        return fmt  # a broken template is reported when chat data uses it
      if not turn_end.startswith(fmt.eos_text):
        for other in others:
          if turn_end.startswith(self.id_to_piece(other)):
            self._eos = other
            fmt.eos_text = self.id_to_piece(other)
            break
    return fmt

  def _chat_template(self) -> tuple[str | None, str]:
    """(the Jinja chat template or None, the file it is in)."""
    path = os.path.join(self.directory, "chat_template.jinja")
    if os.path.exists(path):
      with open(path) as f:
        return f.read(), path
    template = self.config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    path = os.path.join(self.directory, "tokenizer_config.json")
    return (template if isinstance(template, str) else None), path

  def __repr__(self) -> str:
    return f"HfTokenizer(vocab_size={self.vocab_size}, directory={self.directory!r})"

  # ---------------------------------------------------------------- the interface

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer produces are in [0, vocab_size) (the model may have more rows)."""
    return self._size

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def unk_id(self) -> int:
    return -1

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode takes one str, got {type(text).__name__}; use encode_batch")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return (
      ([self._bos] if add_bos and self._bos >= 0 else []) + ids + ([self._eos] if add_eos else [])
    )

  def encode_batch(
    self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of str, not one str; use encode")
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode(self, ids) -> str:
    """As `Tokenizer.decode`: PAD and BOS skipped, stops at the first EOS; ids the tokenizer
    never produces (embedding rows past it) are skipped too."""
    array = np.asarray(ids)
    if array.ndim != 1:
      raise ValueError(f"decode takes ids of shape [T], got {array.shape}; use decode_batch")
    if array.size == 0:
      return ""
    eos = np.flatnonzero(array == self._eos)
    if eos.size:
      array = array[: eos[0]]
    # BOS too: the SentencePiece tokenizer's decode drops it (a control piece).
    keep = (array != self._pad) & (array != self._bos) & (array >= 0) & (array < self._size)
    array = array[keep]
    return self._tok.decode(array.tolist(), skip_special_tokens=False)

  # Ids [B, T] (a 2-D array or ragged lists) to B texts: the SentencePiece tokenizer's,
  # which only calls `decode` per row.
  decode_batch = Tokenizer.decode_batch

  def id_to_piece(self, token_id: int) -> str:
    piece = self._tok.id_to_token(int(token_id))
    if piece is None:
      raise IndexError(f"id {token_id} is outside [0, {self._size})")
    return piece

  def piece_to_id(self, piece: str) -> int:
    found = self._tok.token_to_id(piece)
    return -1 if found is None else found

  def save(self, path: str) -> None:
    """Copies the tokenizer files into the directory `path` (replaced atomically)."""
    if os.path.abspath(path) == os.path.abspath(self.directory):
      return
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in TOKENIZER_FILES:
      source = os.path.join(self.directory, name)
      if os.path.exists(source):
        shutil.copyfile(source, os.path.join(tmp, name))
    if os.path.isdir(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
