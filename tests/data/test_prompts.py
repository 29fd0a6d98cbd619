"""Prompt files for the RL stages: records, validation, hold-out and the length filter."""

import json

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import errors
from rlhf_jax.data import chat, prompts


class WordTokenizer:
  """One token per word; BOS 1."""

  bos_id = 1

  def encode_batch(self, texts):
    return [[2] * len(t.split()) for t in texts]


def _section(**overrides):
  section = ml_collections.ConfigDict(
    {
      "source": "jsonl",
      "prompts": "",
      "eval_prompts": "",
      "train_split": "train",
      "eval_split": "",
      "skip_invalid": False,
      "data_dir": "",
      "num_prompts": 0,
      "seed": 3,
    }
  )
  section.update(overrides)
  return section


def _write(path, records):
  path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records))
  return str(path)


def test_text_and_chat_records(tmp_path):
  path = _write(
    tmp_path / "p.jsonl",
    [
      {"prompt": "Review of the lamp:", "id": 7},
      {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ],
  )
  found, files = prompts.read_files([path])
  assert [p.text for p in found] == [
    "Review of the lamp:",
    "System: Be brief.\nUser: Hi\nAssistant: ",
  ]
  assert [p.where for p in found] == [f"{path}:1", f"{path}:2"]
  assert files[path] == {"prompts": 2, "skipped": 0}
  assert found[1].text == chat.render_prompt([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}])  # fmt: skip


@pytest.mark.parametrize(
  "record, message, field",
  [
    ({"text": "x"}, "exactly one of the fields 'prompt' and 'messages', got neither", "prompt"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "got both", "prompt"),
    ({"prompt": "  "}, "field 'prompt' must be a non-empty string", "prompt"),
    ({"prompt": 3}, "must be a non-empty string, got int", "prompt"),
    ({"messages": "hi"}, "not a JSON list of turns", "messages"),
    ({"messages": {"a": 1}}, "must be a non-empty list of turns", "messages"),
    (
      {"messages": [{"role": "bot", "content": "x"}]},
      "messages[0].role must be one of",
      "messages",
    ),
    (
      {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
      "must end with a user turn",
      "messages",
    ),
    ([1, 2], "expected an object", None),
  ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, message, field):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, record])
  with pytest.raises(errors.DataError) as info:
    prompts.read_files([path])
  assert info.value.line == 2 and info.value.field == field
  assert message in str(info.value) and str(info.value).startswith(f"{path}:2")


def test_skip_invalid_counts_and_parquet(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "a"}, "not json", {"prompt": "b"}])
  found, files = prompts.read_files([path], skip_invalid=True)
  assert [p.text for p in found] == ["a", "b"] and files[path]["skipped"] == 1
  pq_path = tmp_path / "p.parquet"
  pq.write_table(pa.Table.from_pylist([{"prompt": "c"}, {"prompt": None}]), pq_path)
  with pytest.raises(errors.DataError, match="row 2"):
    prompts.read_files([str(pq_path)])


def test_hold_out_is_seeded_disjoint_and_filters_long_prompts(tmp_path):
  records = [{"prompt": f"prompt number {i}"} for i in range(20)]
  records += [{"prompt": "prompt number 0"}]  # a copy: it leaves train with its twin
  records += [{"prompt": "a very long prompt " * 5}]
  path = _write(tmp_path / "p.jsonl", records)
  data = _section(prompts=path)
  a = prompts.load(data, 5, WordTokenizer(), prompt_len=8)
  b = prompts.load(data, 5, WordTokenizer(), prompt_len=8)
  assert a.eval == b.eval and a.train == b.train and len(a.eval) == 5
  assert not set(a.eval) & set(a.train)
  assert len(a.train) + len(a.eval) + a.train.count("prompt number 0") >= 20
  assert a.info["train_dropped_too_long"] == 1
  assert a.info["train_dropped_examples"] == [f"{path}:22"]
  assert a.info["num_eval"] == 5 and a.info["num_train"] == len(a.train)
  other = prompts.load(_section(prompts=path, seed=4), 5, WordTokenizer(), prompt_len=8)
  assert other.eval != a.eval


def test_eval_file_and_cap(tmp_path):
  train = _write(tmp_path / "t.jsonl", [{"prompt": f"t {i}"} for i in range(10)])
  held = _write(tmp_path / "e.jsonl", [{"prompt": f"e {i}"} for i in range(10)])
  got = prompts.load(_section(prompts=train, eval_prompts=held, num_prompts=4), 3,
                     WordTokenizer(), prompt_len=8)  # fmt: skip
  assert got.train == [f"t {i}" for i in range(4)] and got.eval == ["e 0", "e 1", "e 2"]


def test_nothing_fits_or_too_few_prompts_is_an_error(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "one two three four"}] * 3)
  with pytest.raises(errors.DataError, match="no train prompt fits prompt_len=3 tokens"):
    prompts.load(_section(prompts=path), 1, WordTokenizer(), prompt_len=3)
  with pytest.raises(errors.DataError, match="1 distinct prompts cannot give 1 held-out"):
    prompts.load(_section(prompts=path), 1, WordTokenizer(), prompt_len=8)


def test_tfds_directory_source(tmp_path):
  """A prepared TFDS dataset directory with a `prompt` feature (here: the SFT builder's)."""
  from rlhf_jax.data import builders

  path = _write(tmp_path / "sft.jsonl", [{"prompt": f"p {i}", "response": "r"} for i in range(6)])
  builder = builders.build_sft_jsonl({"train": [path]}, tmp_path / "tfds")
  found, _ = prompts.read_tfds(builder.data_dir, "train")
  assert sorted(p.text for p in found) == [f"p {i}" for i in range(6)]
  assert found[0].where.endswith("[train] row 1")
  with pytest.raises(errors.DataError, match="cannot open the dataset split"):
    prompts.read_tfds(builder.data_dir, "validation")
