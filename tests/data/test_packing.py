"""Tests for rlhf_jax.data.packing: the packer, packed rows, resumable packed loading, and
the packed SFT loss equal to the unpacked one."""

import functools

import jax
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models
from rlhf_jax.data import loader, packing, testbed
from rlhf_jax.data.tokenizer import BOS_ID, PAD_ID, Tokenizer
from rlhf_jax.trainers import sft


@pytest.fixture(scope="module")
def tok():
  texts = [t for e in testbed.sft_examples(200, 0) for t in (e["prompt"], e["response"])]
  return Tokenizer.train([*texts, "User: Assistant: System:"], 200)


def _records(n, seed=0):
  """Testbed prompt/response records with a chat record every third one."""
  out = []
  for i, e in enumerate(testbed.sft_examples(n, seed)):
    if i % 3 == 1:
      turns = [("user", e["prompt"]), ("assistant", e["response"])]
      if i % 2:
        turns += [("user", "And?"), ("assistant", "Nice.")]
      out.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    else:
      out.append(e)
  return out


def test_the_packer_is_deterministic_and_places_every_example_once():
  lengths = np.random.default_rng(0).integers(1, 65, 500)
  packs = packing.pack(lengths, 64, seed=3)
  placed = np.concatenate(packs)
  assert sorted(placed.tolist()) == list(range(500))  # each example exactly once
  assert max(int(lengths[p].sum()) for p in packs) <= 64
  again = packing.pack(lengths, 64, seed=3)
  assert [p.tolist() for p in again] == [p.tolist() for p in packs]
  other = packing.pack(lengths, 64, seed=4)
  assert [p.tolist() for p in other] != [p.tolist() for p in packs]  # ties break by seed
  # Close to the fewest rows possible: at least the tokens' worth, and one per long example.
  fewest = max(np.ceil(lengths.sum() / 64), (lengths > 32).sum())
  assert len(packs) <= 1.1 * fewest
  stats = packing.pack_stats(lengths, packs, 64)
  assert stats["packs"] == len(packs) and stats["examples"] == 500
  assert stats["padding_fraction"] < 0.1 and stats["unpacked_padding_fraction"] > 0.4


def test_the_packer_refuses_lengths_it_cannot_place():
  with pytest.raises(ValueError, match="example 1 has length 9, outside"):
    packing.pack([3, 9], 8)
  with pytest.raises(ValueError, match="example 0 has length 0"):
    packing.pack([0, 3], 8)


def test_packed_rows_hold_the_unpacked_rows_side_by_side(tok):
  records = _records(6)
  rows = loader.sft_collate(records, tok, 128)
  lengths = rows["input_mask"].sum(1)
  packs = [[records[0], records[1]], [records[2], records[3], records[4]], [records[5]]]
  assert all(sum(lengths[i] for i in idx) <= 128 for idx in ([0, 1], [2, 3, 4], [5]))
  batch = packing.pack_collate(packs, tok, 128)
  assert batch["tokens"].shape == batch["segment_ids"].shape == (3, 128)
  start = 0
  for i, n in enumerate(lengths[2:5]):
    segment = slice(start, start + n)
    assert batch["tokens"][1, segment].tolist() == rows["tokens"][2 + i, :n].tolist()
    assert batch["loss_mask"][1, segment].tolist() == rows["loss_mask"][2 + i, :n].tolist()
    assert (batch["segment_ids"][1, segment] == i + 1).all()
    assert batch["tokens"][1, start] == BOS_ID
    start += n
  assert (batch["segment_ids"][1, start:] == 0).all() and (
    batch["tokens"][1, start:] == PAD_ID
  ).all()
  assert not batch["input_mask"][1, start:].any()
  # Without BOS and with every token trained, an example's first token is still no target:
  # in a packed row it would be predicted from the example before it.
  plain = packing.pack_collate(packs, tok, 128, add_bos=False, train_on="all")
  starts = np.flatnonzero(np.diff(plain["segment_ids"][1], prepend=0) > 0)
  assert starts.size == 3 and not plain["loss_mask"][1, starts].any()
  assert plain["loss_mask"][1, starts[1] - 1]


def test_packed_loading_covers_every_example_each_epoch_and_resumes_exactly(tok):
  records = [{**r, "id": i} for i, r in enumerate(_records(40))]
  lengths = loader.sft_collate(records, tok, 128)["input_mask"].sum(1)
  packs = packing.pack(lengths, 128, seed=0)

  def make():
    return loader.Loader(
      packing.PackedSource(records, packs),
      global_batch_size=4,
      seed=1,
      collate=lambda ps: {"ids": [r["id"] for p in ps for r in p]},
      process_index=0,
      process_count=1,
    )

  first = make()
  full = len(packs) // 4
  epoch = [i for _ in range(full) for i in next(first)["ids"]]
  # The epoch's last partial batch of packs is dropped, as for unpacked rows.
  left_out = [int(i) for p in first.epoch_order(0)[full * 4 :] for i in packs[p]]
  assert sorted(epoch + left_out) == list(range(40))
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [next(first)["ids"] for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  assert [next(resumed)["ids"] for _ in range(4)] == expected


def test_packed_loss_equals_the_unpacked_loss(tok):
  """Same examples, same parameters: the token-mean loss and the target count agree."""
  # Learned positions (GPT-2 style): a position not restarting would change the logits.
  cfg = models.get_model_config("tiny-gpt2", vocab_size=tok.vocab_size)
  module = models.LanguageModel(cfg)
  params = jax.jit(lambda r: meta.unbox(models.init_params(module, r)))(jax.random.key(0))
  loss = jax.jit(functools.partial(sft.sft_loss, module))
  examples = jax.jit(sft.count_examples)
  records = _records(12)
  for train_on in ("assistant", "all"):
    rows = loader.sft_collate(records, tok, 128, train_on=train_on)
    packs = packing.pack(rows["input_mask"].sum(1), 128, seed=0)
    assert len(packs) < len(records)
    packed = packing.pack_collate(
      [[records[i] for i in p] for p in packs], tok, 128, train_on=train_on
    )
    unpacked_loss, unpacked_n = loss(params, sft._model_inputs(rows))
    packed_loss, packed_n = loss(params, sft._model_inputs(packed))
    assert int(packed_n) == int(unpacked_n) > 0
    np.testing.assert_allclose(float(packed_loss), float(unpacked_loss), rtol=1e-5, atol=1e-5)
    assert int(examples(packed)) == int(examples(sft._model_inputs(rows))) == 12
