"""Tests for rlhf_jax.data.tokenizer: training, special ids, decode rules, I/O, pad_batch."""

import io
import os
import random
import re

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from rlhf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, pad_batch

_WORDS = (
  "the a cat dog bird sat ran flew on under over mat tree house red blue green "
  "big small happy sad quickly slowly and but café naïve"
).split()


def _corpus(num_sentences: int = 300, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [
    " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(num_sentences)
  ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  return _corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]) -> Tokenizer:
  return Tokenizer.train(corpus, vocab_size=128)


def _train_raw_spm(**options) -> bytes:
  """A model trained by SentencePiece directly, bypassing Tokenizer's checks."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_corpus(100)),
    model_writer=writer,
    vocab_size=64,
    hard_vocab_limit=False,
    num_threads=1,
    minloglevel=2,
    **options,
  )
  return writer.getvalue()


# ------------------------------------------------------------------ training


def test_special_ids_fixed_distinct_and_pad_is_not_eos(tokenizer: Tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert (PAD_ID, EOS_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3)
  assert tokenizer.pad_id != tokenizer.eos_id
  pieces = [tokenizer.id_to_piece(i) for i in range(4)]
  assert pieces == ["<pad>", "</s>", "<s>", "<unk>"]
  assert tokenizer.piece_to_id("</s>") == 1
  assert tokenizer.piece_to_id("no-such-piece") == tokenizer.unk_id


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
@pytest.mark.parametrize("vocab_size", [64, 300])
def test_small_vocab_round_trip(corpus: list[str], model_type: str, vocab_size: int):
  tok = Tokenizer.train(corpus, vocab_size, model_type=model_type)
  # hard_vocab_limit=False: a small corpus may give fewer pieces, never more.
  assert 4 < tok.vocab_size <= vocab_size
  held_out = _corpus(20, seed=1)
  for text in corpus[:20] + held_out:
    ids = tok.encode(text)
    assert tok.unk_id not in ids, text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  assert tok.decode_batch(tok.encode_batch(held_out)) == held_out
  assert tok.encode_batch(held_out) == [tok.encode(t) for t in held_out]


def test_encode_adds_bos_and_eos(tokenizer: Tokenizer):
  ids = tokenizer.encode("the cat sat")
  assert tokenizer.encode("the cat sat", add_bos=True, add_eos=True) == [2, *ids, 1]
  assert tokenizer.encode_batch(["the cat sat"], add_eos=True) == [[*ids, 1]]


def test_tiny_corpus_trains(corpus: list[str]):
  for model_type in ("unigram", "bpe"):
    tok = Tokenizer.train(["hi there", "a b c"], vocab_size=64, model_type=model_type)
    assert tok.decode(tok.encode("hi there")) == "hi there"
    assert tok.pad_id == PAD_ID and tok.eos_id == EOS_ID


def test_train_errors_are_clear(corpus: list[str]):
  with pytest.raises(ValueError, match="vocab_size=8"):
    Tokenizer.train(corpus, vocab_size=8)  # fewer pieces than distinct characters
  with pytest.raises(ValueError, match="no non-empty texts"):
    Tokenizer.train([], vocab_size=64)
  with pytest.raises(ValueError, match="model_type"):
    Tokenizer.train(corpus, vocab_size=64, model_type="word")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="pad_id"):
    Tokenizer.train(corpus, vocab_size=64, pad_id=1)
  with pytest.raises(TypeError, match=r"texts\[1\] is int"):
    Tokenizer.train(["a b", 7], vocab_size=64)  # type: ignore[list-item]


def test_iterator_exception_reaches_caller(corpus: list[str]):
  def broken():
    yield from corpus[:10]
    raise KeyError("source went away")

  with pytest.raises(KeyError, match="source went away"):
    Tokenizer.train(broken(), vocab_size=64)


def test_user_defined_symbol_is_one_id(corpus: list[str]):
  tok = Tokenizer.train(corpus, 128, user_defined_symbols=("<sep>",))
  assert tok.piece_to_id("<sep>") == 4
  assert 4 in tok.encode("the cat<sep>the dog")
  assert tok.decode(tok.encode("the cat<sep>the dog")) == "the cat<sep>the dog"


def test_training_is_deterministic(corpus: list[str]):
  for model_type in ("unigram", "bpe"):
    first = Tokenizer.train(corpus, 128, model_type=model_type).serialized()
    second = Tokenizer.train(iter(corpus), 128, model_type=model_type).serialized()
    assert first == second
    # The comparison is sensitive: a different corpus gives different bytes.
    other = Tokenizer.train(_corpus(seed=7), 128, model_type=model_type).serialized()
    assert other != first


# ------------------------------------------------------------------ decoding


def test_decode_skips_pad_and_stops_at_eos(tokenizer: Tokenizer):
  kept = tokenizer.encode("the cat sat on the mat")
  after = tokenizer.encode("the dog ran")
  ids = [0, 0, *kept[:2], 0, *kept[2:], 1, *after, 0, 1]
  assert tokenizer.decode(ids) == "the cat sat on the mat"
  assert tokenizer.decode(np.asarray(ids, np.int32)) == "the cat sat on the mat"
  assert tokenizer.decode([1, *after]) == ""
  assert tokenizer.decode([]) == ""
  assert tokenizer.decode([2, *kept]) == "the cat sat on the mat"  # BOS is not text


def test_decode_accepts_jax_arrays(tokenizer: Tokenizer):
  import jax.numpy as jnp

  ids = [*tokenizer.encode("a red bird"), 1, *tokenizer.encode("flew")]
  assert tokenizer.decode(jnp.asarray(ids, jnp.int32)) == "a red bird"
  batch = jnp.asarray([ids, [0, 0, *ids[:-2]]], jnp.int32)
  assert tokenizer.decode_batch(batch) == ["a red bird", "a red bird"]


def test_decode_rejects_bad_input(tokenizer: Tokenizer):
  with pytest.raises(ValueError, match=f"id {tokenizer.vocab_size} is outside"):
    tokenizer.decode([5, tokenizer.vocab_size])
  with pytest.raises(ValueError, match="decode_batch"):
    tokenizer.decode(np.zeros((2, 3), np.int32))
  with pytest.raises(TypeError, match="integer"):
    tokenizer.decode(np.array([1.0, 2.0]))
  with pytest.raises(TypeError, match="encode_batch"):
    tokenizer.encode(["the cat"])  # type: ignore[arg-type]
  with pytest.raises(IndexError, match="outside"):
    tokenizer.id_to_piece(tokenizer.vocab_size)


def test_left_padded_prompts_decode_back(tokenizer: Tokenizer):
  texts = ["the cat", "a big green tree over the house", "sad"]
  tokens, mask = pad_batch(tokenizer.encode_batch(texts), 16, tokenizer.pad_id, "left")
  assert tokens[:, -1].tolist() != [tokenizer.pad_id] * 3
  assert tokenizer.decode_batch(tokens) == texts
  assert mask.sum(axis=1).tolist() == [len(ids) for ids in tokenizer.encode_batch(texts)]


# ----------------------------------------------------------------------- I/O


def test_save_load_from_bytes_equivalence(tokenizer: Tokenizer, corpus: list[str], tmp_path):
  path = tmp_path / "sub" / "tok.model"
  trained = Tokenizer.train(corpus, 128, model_path=path)
  assert path.read_bytes() == trained.serialized()
  assert os.listdir(path.parent) == ["tok.model"]  # no temp file left behind

  loaded = Tokenizer.load(path)
  restored = Tokenizer.from_bytes(trained.serialized())
  saved_path = tmp_path / "again.model"
  restored.save(str(saved_path))
  again = Tokenizer.load(str(saved_path))
  texts = _corpus(10, seed=3)
  for tok in (loaded, restored, again):
    assert tok.serialized() == trained.serialized()
    assert tok.vocab_size == trained.vocab_size
    assert tok.encode_batch(texts) == trained.encode_batch(texts)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)


def test_save_replaces_existing_file(tokenizer: Tokenizer, tmp_path):
  path = tmp_path / "tok.model"
  path.write_bytes(b"old contents")
  tokenizer.save(path)
  assert path.read_bytes() == tokenizer.serialized()
  assert os.listdir(tmp_path) == ["tok.model"]


def test_missing_file_names_path(tmp_path):
  path = tmp_path / "absent.model"
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
    Tokenizer.load(path)


@pytest.mark.parametrize("contents", ["garbage", "truncated", "empty"])
def test_corrupt_file_names_path(tokenizer: Tokenizer, tmp_path, contents: str):
  data = {
    "garbage": b"this is not a sentencepiece model",
    "truncated": tokenizer.serialized()[:200],
    "empty": b"",
  }[contents]
  path = tmp_path / f"{contents}.model"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=re.escape(str(path))):
    Tokenizer.load(path)


def test_model_without_pad_pads_past_its_pieces(tmp_path):
  """Llama 2 / Mistral-style models (pad_id=-1) pad with the first id past the pieces."""
  path = tmp_path / "nopad.model"
  path.write_bytes(_train_raw_spm(pad_id=-1))
  raw = spm.SentencePieceProcessor(model_file=str(path))
  assert raw.pad_id() == -1
  tok = Tokenizer.load(path)
  assert tok.has_added_pad and tok.pad_id == tok.num_pieces == raw.vocab_size()
  assert tok.vocab_size == raw.vocab_size() + 1  # a model's embedding gets a row for it
  assert (tok.eos_id, tok.bos_id, tok.unk_id) == (raw.eos_id(), raw.bos_id(), raw.unk_id())
  assert tok.id_to_piece(tok.pad_id) == "<pad>" and tok.piece_to_id("<pad>") == tok.pad_id
  texts = [*_corpus(20, seed=4), "", "  the cat  ", "naïve ✓ 42"]
  ids = tok.encode_batch(texts)
  assert ids == [raw.encode(t) for t in texts]
  assert all(tok.pad_id not in row for row in ids)  # never a real token
  assert tok.decode_batch(ids) == [raw.decode(row) for row in ids]
  assert tok.encode("the cat", add_bos=True, add_eos=True) == raw.encode(
    "the cat", add_bos=True, add_eos=True
  )
  for side in ("left", "right"):
    tokens, mask = pad_batch(ids, 16, tok.pad_id, side)
    np.testing.assert_array_equal(tokens == tok.pad_id, ~mask)
    assert tok.decode_batch(tokens) == [raw.decode(row) for row in ids]  # PAD is dropped
  with pytest.raises(ValueError, match=f"id {tok.vocab_size} is outside"):
    tok.decode([5, tok.vocab_size])
  # Save and load keep the model as it was, and so the same PAD.
  tok.save(tmp_path / "again.model")
  for again in (Tokenizer.load(tmp_path / "again.model"), Tokenizer.from_bytes(tok.serialized())):
    assert again.serialized() == path.read_bytes()
    assert (again.pad_id, again.vocab_size) == (tok.pad_id, tok.vocab_size)


def test_pad_past_the_pieces_is_never_a_training_target():
  """An SFT batch pads with it outside both masks, so its embedding row gets no gradient."""
  import jax

  from rlhf_jax import models, sharding
  from rlhf_jax.data.loader import sft_collate
  from rlhf_jax.trainers.sft import sft_loss

  tok = Tokenizer.from_bytes(_train_raw_spm(pad_id=-1))
  examples = [{"prompt": "the cat", "response": "sat on the mat"},
              {"prompt": "a dog", "response": "ran"}]  # fmt: skip
  batch = sft_collate(examples, tok, 16)
  tokens = batch["tokens"]
  assert (tokens == tok.pad_id).any()
  assert not (batch["loss_mask"] & (tokens == tok.pad_id)).any()
  np.testing.assert_array_equal(batch["input_mask"], tokens != tok.pad_id)
  cfg = models.get_model_config("tiny", vocab_size=tok.vocab_size, num_layers=1,
                                tie_embeddings=False)  # fmt: skip
  module = models.LanguageModel(cfg)
  params = sharding.unbox(jax.jit(lambda k: models.init_params(module, k))(jax.random.key(0)))
  grads = jax.jit(jax.grad(lambda p: sft_loss(module, p, batch)[0]))(params)
  embedding = np.asarray(grads["trunk"]["embedding"])
  assert embedding.shape[0] == tok.vocab_size
  assert not embedding[tok.pad_id].any() and embedding[tok.bos_id].any()


def test_model_without_eos_is_rejected(tmp_path):
  path = tmp_path / "noeos.model"
  path.write_bytes(_train_raw_spm(eos_id=-1))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no EOS piece"):
    Tokenizer.load(path)


def test_model_with_pad_equal_eos_is_rejected(tmp_path):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(_train_raw_spm(pad_id=0, eos_id=1, bos_id=2, unk_id=3))
  Tokenizer.from_bytes(proto.SerializeToString())  # valid before the edit
  proto.trainer_spec.pad_piece = "</s>"
  path = tmp_path / "pad_is_eos.model"
  path.write_bytes(proto.SerializeToString())
  processor = spm.SentencePieceProcessor(model_file=str(path))
  assert processor.pad_id() == processor.eos_id() == 1
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*same id 1 for PAD and EOS"):
    Tokenizer.load(path)


# ------------------------------------------------------------------ pad_batch


def test_pad_batch_right():
  tokens, mask = pad_batch([[5, 6, 7], [8], []], 4, 0, "right")
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(
    mask,
    [[True, True, True, False], [True, False, False, False], [False, False, False, False]],
  )
  assert tokens.dtype == np.int32 and mask.dtype == np.bool_


def test_pad_batch_left():
  tokens, mask = pad_batch([[5, 6, 7], [8], [9, 9, 9, 9]], 4, 0, "left")
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8], [9, 9, 9, 9]])
  np.testing.assert_array_equal(
    mask,
    [[False, True, True, True], [False, False, False, True], [True, True, True, True]],
  )
  assert tokens.dtype == np.int32 and mask.dtype == np.bool_


def test_pad_batch_mask_comes_from_lengths_not_pad_value():
  # EOS-as-pad bug guard: an id equal to pad_id inside a sequence stays masked in.
  tokens, mask = pad_batch([[4, 1], [1]], 3, 1, "right")
  np.testing.assert_array_equal(tokens, [[4, 1, 1], [1, 1, 1]])
  np.testing.assert_array_equal(mask, [[True, True, False], [True, False, False]])


def test_pad_batch_errors():
  with pytest.raises(ValueError, match="row 1 has length 4, longer than the padded length 3"):
    pad_batch([[1, 2], [1, 2, 3, 4]], 3, 0, "right")
  with pytest.raises(ValueError, match="side"):
    pad_batch([[1]], 3, 0, "middle")  # type: ignore[arg-type]
  tokens, mask = pad_batch([], 5, 0, "left")
  assert tokens.shape == (0, 5) and mask.shape == (0, 5)
