"""SentencePiece tokenizers (data.tokenizer) as Hugging Face tokenizers (rlhf_jax/hf/spm.py),
and the export of a stage trained on the testbed's own vocabulary."""

from __future__ import annotations

import io
import json
import os
import random
import types

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

from rlhf_jax import errors
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.hf import spm as hf_spm
from rlhf_jax.hf.tokenizer import HfTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The model the sentencepiece package ships (tests/fixtures/spm/README.md): unigram, NFKC,
# no PAD piece, as Llama 2's and Mistral's.
SHIPPED = os.path.join(REPO, "tests", "fixtures", "spm", "test_model.model")
_WORDS = "the a cat dog sat on mat red big and café naïve 12 7, . ! ?".split()

# Leading, trailing and repeated spaces, other whitespace, digits, punctuation, non-ASCII
# (known and not), characters outside the vocabulary, a literal "▁", and nothing at all.
TEXTS = [
  "", " ", "   ", "the cat sat", " the cat", "the cat ", "  the   cat  sat  ", "the\tcat\nsat",
  "the cat.\n\nthe dog!", "42 cats, 7 dogs; 3.14?", "café naïve", "ünïcödé ✓ 日本語",
  "\uff21\uff22\uff23 full-width", "xyzzy qqq", "▁the cat", "a\u00a0b", "— «quoted» …",
  "the\r\ncat", "\n", "ﬁ ½", "<sep> and < s >",
]  # fmt: skip


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _raw_spm(vocab_size: int = 64, **options) -> bytes:
  """A model trained by SentencePiece itself, with its default special pieces."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_corpus(100)), model_writer=writer, vocab_size=vocab_size,
    hard_vocab_limit=False, num_threads=1, minloglevel=2, **options,
  )  # fmt: skip
  return writer.getvalue()


@pytest.mark.parametrize(
  "options",
  [
    {"vocab_size": 128},  # the testbed's kind (configs/sft.py: unigram)
    {"vocab_size": 128, "model_type": "bpe"},
    {"vocab_size": 400, "byte_fallback": True},
    {"vocab_size": 400, "model_type": "bpe", "byte_fallback": True},
    {"vocab_size": 128, "user_defined_symbols": ("<sep>",)},
    # As Llama 2 ships its tokenizer.model: no PAD, spaces kept, no character map.
    {"raw": True, "vocab_size": 400, "model_type": "bpe", "byte_fallback": True, "pad_id": -1,
     "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
     "split_digits": True},
  ],
  ids=["unigram", "bpe", "unigram-bytes", "bpe-bytes", "user-defined", "llama2-style"],
)  # fmt: skip
def test_exported_tokenizer_encodes_and_decodes_as_sentencepiece(options, tmp_path):
  transformers = pytest.importorskip("transformers")
  options = dict(options)
  if options.pop("raw", False):
    tok = Tokenizer.from_bytes(_raw_spm(**options))
  else:
    tok = Tokenizer.train(_corpus(), **options)
  out = str(tmp_path)
  hf_spm.save(tok, out)
  assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json",
                                     "tokenizer.model", "tokenizer_config.json"]  # fmt: skip
  assert Tokenizer.load(os.path.join(out, "tokenizer.model")).serialized() == tok.serialized()
  raw = spm.SentencePieceProcessor(model_proto=tok.serialized())
  fast = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  auto = transformers.AutoTokenizer.from_pretrained(out)
  ours = HfTokenizer(out, model_vocab_size=tok.vocab_size)  # as `hf:DIR` reads it back
  for text in TEXTS:
    ids = raw.encode(text)
    assert fast.encode(text, add_special_tokens=False).ids == ids, text
    assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
    assert ours.encode(text, add_bos=True, add_eos=True) == tok.encode(
      text, add_bos=True, add_eos=True
    )
    # BOS first, as this framework starts every sequence; no EOS.
    assert auto(text)["input_ids"] == [tok.bos_id, *ids]
    expected = raw.decode(ids)  # the text, where every character is in the vocabulary
    assert fast.decode(ids, skip_special_tokens=False) == expected, text
    assert auto.decode(ids) == expected, text
    assert ours.decode([*ids, tok.eos_id, 5]) == tok.decode([*ids, tok.eos_id, 5]) == expected
  # Characters outside the vocabulary are UNK, or bytes with byte_fallback.
  unknown = any(tok.unk_id in raw.encode(text) for text in TEXTS)
  assert unknown != bool(options.get("byte_fallback"))
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (
    tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)  # fmt: skip
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_any_ids_decode_as_sentencepiece():
  """Sampled ids need not be a tokenization of anything: bare "▁" pieces and UNK first."""
  for options in ({}, {"model_type": "bpe"}, {"remove_extra_whitespaces": False}):
    tok = Tokenizer.train(_corpus(), 128, **options)
    raw = spm.SentencePieceProcessor(model_proto=tok.serialized())
    fast = hf_spm.fast_tokenizer(tok)
    rng = np.random.default_rng(0)
    space = raw.piece_to_id("▁")
    for _ in range(500):
      ids = rng.integers(4, tok.vocab_size, size=rng.integers(0, 6)).tolist()
      ids = [space] * int(rng.integers(0, 3)) + ids
      if rng.random() < 0.3:
        ids.insert(int(rng.integers(0, len(ids) + 1)), tok.unk_id)
      assert fast.decode(ids, skip_special_tokens=False) == raw.decode(ids), ids


def test_a_model_without_pad_exports_its_pad_past_the_pieces(tmp_path):
  """Llama 2 / Mistral-style: PAD is the id `Tokenizer` adds past the pieces."""
  transformers = pytest.importorskip("transformers")
  tok = Tokenizer.from_bytes(_raw_spm(pad_id=-1))
  assert tok.has_added_pad and tok.pad_id == tok.num_pieces == tok.vocab_size - 1
  hf_spm.save(tok, str(tmp_path))
  with open(tmp_path / "tokenizer_config.json") as f:
    assert json.load(f)["pad_token"] == "<pad>"
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert auto.pad_token_id == tok.pad_id and len(auto) == tok.vocab_size
  ours = HfTokenizer(str(tmp_path), model_vocab_size=tok.vocab_size)
  assert (ours.pad_id, ours.eos_id, ours.bos_id) == (tok.pad_id, tok.eos_id, tok.bos_id)
  ids = tok.encode("the cat sat")
  assert ours.encode("the cat sat") == ids
  assert ours.decode([tok.pad_id, *ids, tok.pad_id]) == "the cat sat"


def test_a_model_that_does_not_convert_is_an_error_naming_the_field(tmp_path):
  path = tmp_path / "char.model"
  path.write_bytes(_raw_spm(model_type="char"))
  with pytest.raises(errors.DataError, match="CHAR model does not convert") as raised:
    hf_spm.save(Tokenizer.load(path), str(tmp_path))
  assert raised.value.field == "trainer_spec.model_type" and raised.value.path == str(path)
  assert os.listdir(tmp_path) == ["char.model"]  # nothing written


def test_reward_model_on_a_tokenizer_without_pad_exports_to_transformers(tmp_path):
  """A reward model on a SentencePiece vocabulary without PAD: the classifier's pad token
  is the id past the pieces, and transformers scores as this framework does."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax

  from rlhf_jax import hf, models, sharding

  tok = Tokenizer.from_bytes(_raw_spm(pad_id=-1))
  cfg = models.get_model_config("tiny", vocab_size=tok.vocab_size, num_layers=1)
  module = models.ScalarModel(cfg, head_init="reward")
  params = sharding.unbox(jax.jit(lambda k: models.init_params(module, k))(jax.random.key(1)))
  rm = types.SimpleNamespace(module=module, tokenizer=tok, gain=1.0, bias=0.0,
                             params=jax.tree.map(lambda x: x[None], params))  # fmt: skip
  out = str(tmp_path)
  assert hf.export_reward_model(rm, out) == "llama"
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert model.config.pad_token_id == auto.pad_token_id == tok.pad_id == tok.num_pieces
  input_ids = auto(["the cat sat on the mat"], return_tensors="np")["input_ids"]
  assert input_ids[0].tolist() == tok.encode("the cat sat on the mat", add_bos=True)
  with torch.no_grad():
    theirs = model(torch.tensor(input_ids)).logits.numpy()[:, 0]
  with open(os.path.join(out, "config.json")) as f:
    offset = json.load(f)["rlhf_jax_score_offset"]
  ours = module.apply({"params": params}, jnp.asarray(input_ids))[:, -1]
  np.testing.assert_allclose(theirs + offset, np.asarray(ours), atol=1e-4)


@pytest.mark.slow
def test_a_shipped_model_without_pad_reads_and_exports_as_sentencepiece(tmp_path):
  transformers = pytest.importorskip("transformers")
  tok = Tokenizer.load(SHIPPED)
  raw = spm.SentencePieceProcessor(model_file=SHIPPED)
  assert raw.pad_id() == -1 and tok.pad_id == raw.vocab_size() == tok.vocab_size - 1
  hf_spm.save(tok, str(tmp_path))
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  story = ("I saw a girl with a telescope. It was a fine day, and the master said to me: "
           "\"Do not be idle!\" 1,200 yen.")  # fmt: skip
  for text in [*TEXTS, story]:
    ids = raw.encode(text)
    assert tok.encode(text) == ids and auto(text, add_special_tokens=False)["input_ids"] == ids
    assert auto.decode(ids) == raw.decode(ids) == tok.decode(ids), text
  assert auto.pad_token_id == tok.pad_id


def test_sft_stage_on_the_testbed_tokenizer_exports_to_transformers(tmp_path):
  """A stage trained here on a SentencePiece model a user brings (`tokenizer.path`: the
  shipped one, without PAD) exports; transformers loads the model and the tokenizer, and
  computes this framework's logits for an encoded prompt."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rlhf_jax import config_utils, hf, sharding, stages

  workdir, out = str(tmp_path / "sft"), str(tmp_path / "hf")
  config = config_utils.load_config(os.path.join(REPO, "configs/sft.py:runlocal"))
  # As small as the SFT trainer runs (tests/trainers/test_stage_export.py).
  config.update(total_steps=2, log_every=1, batch_size=8, eval_every=1000, checkpoint_every=1000)
  config.optim.warmup_steps = 1
  config.model.num_layers = 1
  config.data.update(num_train=200, num_eval=8)
  config.eval.num_samples = 0
  config.tokenizer.path = SHIPPED
  config_utils.run(config, workdir)
  policy = stages.load_policy(workdir, sharding.make_mesh((1, -1, 1)))
  tok = policy.tokenizer
  assert isinstance(tok, Tokenizer) and tok.pad_id == 1000  # past the shipped model's pieces
  assert policy.module.config.vocab_size >= 1001

  assert hf.export_stage(workdir, out) == "llama"
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  auto = transformers.AutoTokenizer.from_pretrained(out)
  prompt = "Review of the lamp:  it glows, 5 stars!"
  input_ids = auto(prompt, return_tensors="np")["input_ids"]
  assert input_ids[0].tolist() == tok.encode(prompt, add_bos=True)
  with torch.no_grad():
    theirs = model(torch.tensor(input_ids)).logits.numpy()
  ours, _ = policy.module.apply({"params": policy.params}, jnp.asarray(input_ids))
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
  assert model.generation_config.eos_token_id == tok.eos_id == auto.eos_token_id
