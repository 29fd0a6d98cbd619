"""Tests for rlhf_jax.data.loader: order, epochs, resume, per-process shares, SFT batches."""

import functools
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax import sharding
from rlhf_jax.data import chat
from rlhf_jax.data.builders import build_sft_jsonl
from rlhf_jax.data.loader import Loader, global_batches, sft_collate, stack_collate
from rlhf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

tfds.disable_progress_bar()


def _ids_collate(examples):
  return {"ids": np.asarray(examples, np.int64)}


def _loader(num_examples=23, **kwargs):
  kwargs.setdefault("global_batch_size", 4)
  kwargs.setdefault("seed", 7)
  kwargs.setdefault("collate", _ids_collate)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return Loader(list(range(num_examples)), **kwargs)


def _flat(lists):
  return [x for part in lists for x in part]


def _take(loader, n):
  return [next(loader)["ids"].tolist() for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_batches():
  assert _take(_loader(), 12) == _take(_loader(), 12)
  assert _take(_loader(), 12) != _take(_loader(seed=8), 12)


def test_each_epoch_is_a_new_permutation_reproducible_across_runs():
  loader = _loader(num_examples=12, global_batch_size=4)
  assert loader.batches_per_epoch == 3
  epochs = [_flat(_take(loader, 3)) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert epochs[0] != epochs[1] != epochs[2]
  assert epochs[0] != list(range(12))
  again = _loader(num_examples=12, global_batch_size=4)
  assert [_flat(_take(again, 3)) for _ in range(3)] == epochs
  assert epochs[1] == loader.epoch_order(1).tolist()


def test_shuffle_false_keeps_source_order():
  loader = _loader(num_examples=8, shuffle=False, num_epochs=2)
  assert [b["ids"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def test_drop_remainder_and_num_epochs():
  loader = _loader(num_examples=10, num_epochs=2)
  batches = [b["ids"].tolist() for b in loader]
  assert len(batches) == 4 == 2 * loader.batches_per_epoch
  for epoch in (batches[:2], batches[2:]):
    seen = _flat(epoch)
    assert len(set(seen)) == 8  # 2 of the 10 are skipped, no repeats
  with pytest.raises(StopIteration):
    next(loader)

  keep = _loader(num_examples=10, num_epochs=2, drop_remainder=False)
  sizes = [len(b["ids"]) for b in keep]
  assert sizes == [4, 4, 2, 4, 4, 2]


@pytest.mark.parametrize("saved_after", [7, 5, 3, 0])
def test_resume_mid_run_gives_the_uninterrupted_batches(saved_after):
  # 23 examples, batches of 4: 5 batches an epoch, so saving after 7 resumes
  # mid epoch 1, and the next 5 batches cross into epoch 2; saving after 5
  # resumes exactly on an epoch boundary.
  uninterrupted = _take(_loader(), saved_after + 5)

  first = _loader()
  assert _take(first, saved_after) == uninterrupted[:saved_after]
  state = json.loads(json.dumps(first.get_state()))
  assert state["epoch"] == saved_after // 5
  resumed = _loader()
  resumed.set_state(state)
  assert _take(resumed, 5) == uninterrupted[saved_after:]


def test_set_state_refuses_another_seed_or_dataset():
  state = _loader().get_state()
  with pytest.raises(ValueError, match="seed 7"):
    _loader(seed=8).set_state(state)
  with pytest.raises(ValueError, match="data changed"):
    _loader(num_examples=24).set_state(state)
  with pytest.raises(ValueError, match="lacks"):
    _loader().set_state({"epoch": 0})


def test_failed_read_does_not_advance_the_state():
  calls = []

  def flaky(example):
    calls.append(example)
    if len(calls) == 6:
      raise OSError("transient read error")
    return example

  loader = _loader(transform=flaky)
  expected = _take(_loader(), 3)
  assert _take(loader, 1) == expected[:1]
  with pytest.raises(OSError):
    next(loader)
  assert _take(loader, 2) == expected[1:]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_slices_of_the_global_batch(process_count):
  single = _take(_loader(global_batch_size=8), 9)
  shares = [
    _take(_loader(global_batch_size=8, process_index=p, process_count=process_count), 9)
    for p in range(process_count)
  ]
  for step, global_batch in enumerate(single):
    parts = [share[step] for share in shares]
    assert all(len(part) == 8 // process_count for part in parts)
    assert len(set(_flat(parts))) == 8  # disjoint
    # Concatenated in process order they are the global batch, row for row.
    assert _flat(parts) == global_batch


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    _loader(process_count=3)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    _loader(num_examples=3)
  with pytest.raises(ValueError, match="process_index 2"):
    _loader(process_index=2, process_count=2)


def test_array_record_source_matches_a_list_source(tmp_path):
  records = [{"prompt": f"question {i}", "response": f"answer {i} é"} for i in range(13)]
  records_with_lines = [{**r, "line": i + 1} for i, r in enumerate(records)]
  path = tmp_path / "sft.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  source = build_sft_jsonl([path], tmp_path / "data").source()

  def batches(src):
    loader = Loader(
      src,
      global_batch_size=4,
      seed=3,
      num_epochs=2,
      process_index=1,
      process_count=2,
      transform=lambda r: {**r, "n": len(r["prompt"])},
    )
    return [{k: v.tolist() for k, v in b.items()} for b in loader]

  from_disk, from_list = batches(source), batches(records_with_lines)
  assert len(from_disk) == 6
  assert from_disk == from_list
  assert from_disk[0]["prompt"][0].startswith("question")
  assert from_disk[0]["n"] == [len(p) for p in from_disk[0]["prompt"]]


def test_stack_collate_stacks_fields():
  batch = stack_collate([{"a": 1, "b": [1, 2]}, {"a": 2, "b": [3, 4]}])
  assert batch["a"].tolist() == [1, 2]
  assert batch["b"].shape == (2, 2)


# -------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def tokenizer():
  words = "the cat dog sat ran on mat red blue big small yes no answer question why".split()
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(200)]
  return Tokenizer.train(corpus, vocab_size=64)


def test_sft_collate_masks_exactly_response_and_eos(tokenizer):
  assert PAD_ID != EOS_ID
  examples = [
    {"prompt": "why the cat sat", "response": "the cat sat on the mat"},
    {"prompt": b"question", "response": b"yes"},
  ]
  batch = sft_collate(examples, tokenizer, max_len=24)
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (2, 24)
  for row, example in enumerate(examples):
    prompt = tokenizer.encode(_text(example["prompt"]))
    response = tokenizer.encode(_text(example["response"]))
    tokens = batch["tokens"][row]
    length = 1 + len(prompt) + len(response) + 1
    assert tokens[:length].tolist() == [BOS_ID, *prompt, *response, EOS_ID]
    assert (tokens[length:] == PAD_ID).all()
    assert batch["input_mask"][row].tolist() == [True] * length + [False] * (24 - length)
    expected_loss = np.zeros(24, bool)
    expected_loss[1 + len(prompt) : length] = True
    assert batch["loss_mask"][row].tolist() == expected_loss.tolist()
    assert tokens[batch["loss_mask"][row]].tolist() == [*response, EOS_ID]
  # The EOS is a target while PAD never is.
  assert not batch["loss_mask"][batch["tokens"] == PAD_ID].any()
  assert batch["loss_mask"][batch["tokens"] == EOS_ID].all()
  assert not batch["truncated"].any() and not batch["dropped"].any()


def _text(value):
  return value.decode() if isinstance(value, bytes) else value


def test_sft_collate_truncates_prompt_start_and_drops_what_cannot_fit(tokenizer):
  long_prompt = "the red dog ran on the big blue mat and the small cat sat"
  response = "yes"
  prompt_ids = tokenizer.encode(long_prompt)
  response_ids = tokenizer.encode(response)
  max_len = 1 + 3 + len(response_ids) + 1  # room for three prompt tokens
  examples = [
    {"prompt": long_prompt, "response": response},
    {"prompt": "why", "response": " ".join(["no"] * 40)},  # the response alone overflows
    {"prompt": "why", "response": "no"},
  ]
  batch = sft_collate(examples, tokenizer, max_len=max_len)
  assert batch["truncated"].tolist() == [True, False, False]
  assert batch["dropped"].tolist() == [False, True, False]
  assert batch["tokens"][0].tolist() == [BOS_ID, *prompt_ids[-3:], *response_ids, EOS_ID]
  assert batch["loss_mask"][0].sum() == len(response_ids) + 1
  assert (batch["tokens"][1] == PAD_ID).all()
  assert not batch["input_mask"][1].any() and not batch["loss_mask"][1].any()
  assert batch["input_mask"][2].any()


def test_sft_loader_pipeline_without_bos(tokenizer):
  records = [{"prompt": "why", "response": "yes"}] * 4
  collate = functools.partial(sft_collate, tokenizer=tokenizer, max_len=8, add_bos=False)
  batch = next(Loader(records, global_batch_size=4, collate=collate))
  assert batch["tokens"].shape == (4, 8)
  assert (batch["tokens"][:, 0] != BOS_ID).all()
  assert batch["tokens"][0, 0] == tokenizer.encode("why")[0]


def _chat(*turns):
  roles = {"s": "system", "u": "user", "a": "assistant"}
  return {"messages": [{"role": roles[r], "content": c} for r, c in turns]}


def test_single_turn_chat_is_the_prompt_response_row(tokenizer):
  record = _chat(("u", "why the cat sat"), ("a", "the cat sat on the mat"))
  plain = {
    "prompt": chat.render_prompt(record["messages"][:1]),
    "response": "the cat sat on the mat",
  }
  for train_on in chat.TRAIN_ON:
    got = sft_collate([record], tokenizer, 48, train_on=train_on)
    want = sft_collate([plain], tokenizer, 48, train_on=train_on)
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in want.items()}
    assert got["input_mask"].any()
  # JSON text (as a stored record holds it) reads as the list of turns.
  as_json = {"messages": json.dumps(record["messages"])}
  assert sft_collate([as_json], tokenizer, 48)["tokens"].tolist() == got["tokens"].tolist()


def test_multi_turn_chat_layout_trains_only_assistant_turns(tokenizer):
  """Context pieces then replies, each reply closed by EOS; by default only replies train."""
  record = _chat(("s", "answer"), ("u", "why"), ("a", "yes the cat"), ("u", "why no"), ("a", "no"))
  enc = tokenizer.encode
  context1 = enc("System: answer\nUser: why\nAssistant: ")
  reply1, context2 = enc("yes the cat"), enc("\nUser: why no\nAssistant: ")
  reply2 = enc("no")
  row = [BOS_ID, *context1, *reply1, EOS_ID, *context2, *reply2, EOS_ID]
  replies = [False] * (1 + len(context1)) + [True] * (len(reply1) + 1)
  replies += [False] * len(context2) + [True] * (len(reply2) + 1)
  expected = {
    "assistant": replies,
    "last": [False] * (len(row) - len(reply2) - 1) + [True] * (len(reply2) + 1),
    "all": [False] + [True] * (len(row) - 1),
  }
  max_len = len(row) + 3
  for train_on, loss in expected.items():
    batch = sft_collate([record], tokenizer, max_len, train_on=train_on)
    assert batch["tokens"][0, : len(row)].tolist() == row
    assert batch["input_mask"][0].sum() == len(row)
    assert batch["loss_mask"][0].tolist() == loss + [False] * 3, train_on


def test_long_chat_loses_the_start_of_its_context_never_a_reply(tokenizer):
  record = _chat(
    ("u", "the red dog ran on the big blue mat"), ("a", "yes"), ("u", "why"), ("a", "no")
  )
  full = sft_collate([record], tokenizer, 96)
  n = int(full["input_mask"].sum())
  short = sft_collate([record], tokenizer, n - 3)
  assert short["truncated"].tolist() == [True]
  assert short["tokens"][0].tolist() == [BOS_ID, *full["tokens"][0, 4:n].tolist()]
  assert short["loss_mask"][0].sum() == full["loss_mask"][0].sum()
  # "last": the first reply is context now, and is cut before the last reply is.
  last = sft_collate([record], tokenizer, 8, train_on="last")
  assert last["truncated"].tolist() == [True]
  assert last["loss_mask"][0].sum() == len(tokenizer.encode("no")) + 1
  # "all" trains every token: nothing may be cut, so a long row is dropped.
  assert sft_collate([record], tokenizer, n - 1, train_on="all")["dropped"].tolist() == [True]


# ------------------------------------------------------------ global batches


def test_global_batches_are_sharded_over_the_batch_axis(tokenizer):
  mesh = sharding.make_mesh((8, 1, 1))
  records = [{"prompt": f"why {'cat ' * (i % 3)}", "response": "yes"} for i in range(40)]
  collate = functools.partial(sft_collate, tokenizer=tokenizer, max_len=16)
  host_loader = Loader(records, global_batch_size=16, seed=1, collate=collate)
  host = [next(host_loader) for _ in range(3)]
  loader = Loader(records, global_batch_size=16, seed=1, collate=collate)
  stream = global_batches(loader, mesh)
  for step, host_batch in enumerate(host):
    global_batch = next(stream)
    # Pulled one batch at a time: the state is right after this batch.
    assert loader.get_state()["position"] == [16, 0, 16][step]
    tokens = global_batch["tokens"]
    assert isinstance(tokens, jax.Array)
    assert tokens.shape == (16, 16)
    assert tokens.sharding.spec == jax.P(("data", "fsdp"), None)
    assert global_batch["dropped"].sharding.spec == jax.P(("data", "fsdp"))
    assert len(tokens.addressable_shards) == 8
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, 16)}
    assert {s.device for s in tokens.addressable_shards} == set(jax.devices())
    assert set(global_batch) == set(host_batch)
    for key, value in host_batch.items():
      np.testing.assert_array_equal(np.asarray(global_batch[key]), value)


def test_state_at_a_dropped_remainder_continues_with_the_next_epoch():
  # Positions 20..22 of an epoch of 23 are the dropped remainder.
  loader = _loader()
  loader.set_state({"seed": 7, "epoch": 0, "position": 21})
  expected = _loader()
  expected.set_state({"seed": 7, "epoch": 1, "position": 0})
  assert _take(loader, 3) == _take(expected, 3)
  assert loader.epoch == 1
