"""A SentencePiece tokenizer (`data.tokenizer.Tokenizer`) as Hugging Face tokenizer files.

`save(tok, out)` writes what `transformers.AutoTokenizer` and `hf.tokenizer.HfTokenizer`
read: `tokenizer.json` (a fast tokenizer built with the `tokenizers` library from the
pieces and settings in the model proto), `tokenizer_config.json`, `special_tokens_map.json`
and the original `tokenizer.model` (for slow tokenizers and serving stacks that read it).

The fast tokenizer encodes as `SentencePieceProcessor.encode` does:

- model: Unigram from the pieces and their scores, or BPE with merges ranked by the score
  of the piece they make (SentencePiece's BPE merges the best-scoring pair first);
  unknown characters become UNK (runs of them one UNK, as in SentencePiece), or bytes
  when the model was trained with `byte_fallback`;
- normalizer, in SentencePiece's order: its precompiled character map (NFKC for the
  default `nmt_nfkc` rule), the removal of leading, trailing and repeated spaces, and
  spaces escaped as "▁";
- pre-tokenizer: Metaspace adds the dummy "▁" prefix to the text without splitting it
  (SentencePiece's model sees the whole text at once), and user-defined pieces are cut
  out whole;
- decoder: "▁" back to spaces, bytes back to characters, UNK to SentencePiece's " ⁇ ",
  less the leading spaces SentencePiece's decoder drops (the dummy prefix).

The control pieces (`<s>`, `</s>`, `<pad>`) and UNK are special tokens; unlike
SentencePiece, the fast tokenizer reads them as such when they occur literally in text.
BOS is prepended by the post-processor (as this framework starts every sequence);
EOS is left to the caller. A model without a PAD piece gets one added past its pieces,
at the id `Tokenizer.pad_id` already gives it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from rlhf_jax import errors
from rlhf_jax.data.tokenizer import Tokenizer

# sentencepiece_model.proto's enums.
_UNIGRAM, _BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_SPACE = "▁"


def _proto(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok.serialized())
  return proto


def fast_tokenizer(tok: Tokenizer):
  """The `tokenizers.Tokenizer` that encodes and decodes as `tok` (see the module docstring).

  Raises:
    DataError: a SentencePiece setting with no Hugging Face equivalent here (a "char" or
      "word" model, whitespace as a suffix), naming the tokenizer's file and the field.
  """
  from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
  )
  from tokenizers import Tokenizer as FastTokenizer

  proto = _proto(tok)
  trainer, spec = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type not in (_UNIGRAM, _BPE):
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
    raise errors.DataError(
      tok.source, 0, f"a SentencePiece {kind} model does not convert to a Hugging Face "
      "tokenizer (only unigram and bpe do)", field="trainer_spec.model_type",
    )  # fmt: skip
  if trainer.treat_whitespace_as_suffix:
    raise errors.DataError(
      tok.source, 0, "a SentencePiece model that treats whitespace as a suffix does not "
      "convert to a Hugging Face tokenizer", field="trainer_spec.treat_whitespace_as_suffix",
    )  # fmt: skip
  pieces = list(proto.pieces)
  byte_fallback = trainer.byte_fallback
  unk_piece = pieces[tok.unk_id].piece

  if trainer.model_type == _UNIGRAM:
    model = models.Unigram(
      [(p.piece, p.score) for p in pieces], unk_id=tok.unk_id, byte_fallback=byte_fallback
    )
  else:
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    # A merge ranks as the piece it makes: SentencePiece merges the best-scoring pair first.
    ranked = sorted(
      (-score, i, piece[:k], piece[k:])
      for piece, (score, i) in normal.items()
      for k in range(1, len(piece))
      if piece[:k] in normal and piece[k:] in normal
    )
    model = models.BPE(
      {p.piece: i for i, p in enumerate(pieces)},
      [(left, right) for _, _, left, right in ranked],
      unk_token=unk_piece,
      fuse_unk=True,
      byte_fallback=byte_fallback,
    )
  fast = FastTokenizer(model)

  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    # Spaces only: SentencePiece leaves other whitespace (newlines, tabs) alone.
    ends, runs = Regex(r"\A +| +\z"), Regex(" {2,}")
    steps += [normalizers.Replace(ends, ""), normalizers.Replace(runs, " ")]
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", _SPACE))
  if spec.add_dummy_prefix:
    # Metaspace adds no prefix to text that starts with "▁"; SentencePiece always does.
    steps.append(normalizers.Replace(Regex(rf"\A{_SPACE}"), _SPACE * 2))
  fast.normalizer = normalizers.Sequence(steps)

  splits = []
  if spec.add_dummy_prefix:
    # "always": "first" skips text whose original start was stripped (" a").
    prefix = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=False)
    splits.append(prefix)
  user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
  if user_defined:
    # SentencePiece emits a user-defined piece whole wherever it occurs.
    pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
    splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
  if splits:
    fast.pre_tokenizer = pre_tokenizers.Sequence(splits)

  # UNK decodes to SentencePiece's surface for it (" ⁇ "), not to its piece.
  steps = [decoders.Replace(_SPACE, " "), decoders.Replace(unk_piece, trainer.unk_surface)]
  if byte_fallback:
    steps.append(decoders.ByteFallback())
  steps.append(decoders.Fuse())
  if spec.add_dummy_prefix:
    pattern = _leading_spaces(trainer.unk_surface, spec.remove_extra_whitespaces)
    steps.append(decoders.Replace(Regex(pattern), ""))
  fast.decoder = decoders.Sequence(steps)

  specials = [p.piece for p in pieces if p.type in (_CONTROL, _UNKNOWN)]
  if tok.has_added_pad:
    specials.append(tok.id_to_piece(tok.pad_id))
  fast.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  pad = fast.token_to_id(tok.id_to_piece(tok.pad_id))
  if pad != tok.pad_id:  # the added PAD lands right past the pieces
    raise AssertionError(f"PAD converted to id {pad}, not {tok.pad_id}")
  if tok.bos_id >= 0:
    bos = tok.id_to_piece(tok.bos_id)
    fast.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.bos_id)]
    )
  return fast


def _leading_spaces(unk_surface: str, all_bare: bool) -> str:
  """A regex of the spaces SentencePiece's decoder drops at the start of a text: the
  dummy prefix, with `all_bare` (remove_extra_whitespaces) also the spaces of bare "▁"
  pieces before the first text, but never UNK's own (its surface is " ⁇ ")."""
  text = unk_surface.lstrip(" ")
  own = " " * (len(unk_surface) - len(text))
  text = re.escape(text)
  if not all_bare:
    return rf"\A (?!{own[1:]}{text})" if own and text else r"\A "
  if not own or not text:
    return r"\A +"
  # All of a run of spaces, unless UNK follows: then all but its own.
  return rf"\A +(?={own}{text})|\A +(?=[^ ]|\z)(?!{text})"


def special_tokens(tok: Tokenizer) -> dict[str, str]:
  """The special tokens as `transformers` names them (`bos_token`, ...) to their pieces."""
  names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.unk_id,
           "pad_token": tok.pad_id}  # fmt: skip
  return {name: tok.id_to_piece(i) for name, i in names.items() if i >= 0}


def save(tok: Tokenizer, out: str) -> None:
  """Writes `tok` into the directory `out` as Hugging Face tokenizer files (see the module
  docstring); the directory must exist."""
  fast = fast_tokenizer(tok)  # first: an unconvertible model writes nothing
  fast.save(os.path.join(out, "tokenizer.json"))
  special = special_tokens(tok)
  config: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    **special,
    "add_bos_token": tok.bos_id >= 0,
    "add_eos_token": False,
    # transformers' default clean-up would turn "a ." into "a." on decode.
    "clean_up_tokenization_spaces": False,
  }
  _write_json(os.path.join(out, "tokenizer_config.json"), config)
  _write_json(os.path.join(out, "special_tokens_map.json"), special)
  tok.save(os.path.join(out, Tokenizer.filename))


def _write_json(path: str, data: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
