"""Tests for rlhf_jax.data.builders: array_record round trip, hash-keyed reuse, validation."""

import glob
import json
import os
import pickle
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, chat
from rlhf_jax.data.builders import DataError, SftJsonl, build_sft_jsonl, content_hash

tfds.disable_progress_bar()

RECORDS = [
  {"prompt": "What is 2+2?", "response": "4"},
  {"prompt": "Say hi in French.", "response": "Salut, ça va ?"},
  {"prompt": "Two lines\nplease", "response": "one\ntwo", "source": "ignored extra field"},
  {"prompt": 'Quote "this"', "response": "\u2028 odd separators \u2029 survive"},
  {"prompt": "last", "response": "done"},
]


def _write_jsonl(path, lines):
  """Writes raw lines (dicts are JSON-encoded) and returns the path as a str."""
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((json.dumps(line, ensure_ascii=False) if isinstance(line, dict) else line) + "\n")
  return str(path)


def _expected(records):
  return [{"prompt": r["prompt"], "response": r["response"]} for r in records]


def _read_all(source):
  """The records without their provenance (`line`, tested on its own)."""
  return [{k: v for k, v in source[i].items() if k != "line"} for i in range(len(source))]


def test_round_trip_keeps_records_and_order(tmp_path):
  first = _write_jsonl(tmp_path / "a.jsonl", [RECORDS[0], "", "   ", *RECORDS[1:3]])
  second = _write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
  builder = build_sft_jsonl([first, second], tmp_path / "data")

  source = builder.source("train")
  assert len(source) == len(RECORDS)
  assert _read_all(source) == _expected(RECORDS)
  got = source.__getitems__([4, 0])
  assert [{k: r[k] for k in ("prompt", "response")} for r in got] == _expected(
    [RECORDS[4], RECORDS[0]]
  )
  # The bytes on disk are array_record shards inside the builder's directory.
  shards = glob.glob(os.path.join(builder.data_dir, "sft_jsonl-train.array_record-*"))
  assert len(shards) == 1
  assert builder.num_skipped == {"train": 0}
  assert builder.content_hash == builder.info.metadata["content_hash"]
  assert builder.split_hashes == {"train": content_hash([first, second])}


def test_named_splits_and_tfds_data_source(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", RECORDS[:3])
  evaluation = _write_jsonl(tmp_path / "eval.jsonl", RECORDS[3:])
  builder = build_sft_jsonl({"train": [train], "eval": evaluation}, tmp_path / "data")
  assert _read_all(builder.source("eval")) == _expected(RECORDS[3:])
  # TFDS can open the prepared data by name, without our builder's config.
  source = tfds.data_source(
    f"sft_jsonl/{builder.builder_config.name}", data_dir=str(tmp_path / "data"), split="train"
  )
  assert [source[i]["response"].decode() for i in range(len(source))] == [
    r["response"] for r in RECORDS[:3]
  ]
  with pytest.raises(KeyError, match="no split 'test'"):
    builder.source("test")


def test_content_hash_follows_contents_and_order_not_names(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
  b = _write_jsonl(tmp_path / "b.jsonl", RECORDS[2:])
  a_copy = _write_jsonl(tmp_path / "renamed.jsonl", RECORDS[:2])
  assert len(content_hash([a, b])) == 64
  assert content_hash([a, b]) == content_hash([a_copy, b])
  assert content_hash([a, b]) != content_hash([b, a])
  # Moving a line across the file boundary changes the hash.
  a2 = _write_jsonl(tmp_path / "a2.jsonl", RECORDS[:3])
  b2 = _write_jsonl(tmp_path / "b2.jsonl", RECORDS[3:])
  assert content_hash([a, b]) != content_hash([a2, b2])
  with pytest.raises(TypeError):
    content_hash(a)


def test_rebuilds_only_when_input_changes(tmp_path, monkeypatch):
  path = _write_jsonl(tmp_path / "sft.jsonl", RECORDS[:3])
  data_dir = tmp_path / "data"
  first = build_sft_jsonl([path], data_dir)

  def fail_if_generating(self, split):
    raise AssertionError("the dataset was generated again")

  with monkeypatch.context() as patch:
    patch.setattr(SftJsonl, "_generate_examples", fail_if_generating)
    again = build_sft_jsonl([path], data_dir)
  assert again.data_dir == first.data_dir
  assert _read_all(again.source()) == _expected(RECORDS[:3])

  _write_jsonl(tmp_path / "sft.jsonl", RECORDS[:4])
  changed = build_sft_jsonl([path], data_dir)
  assert changed.data_dir != first.data_dir
  assert changed.content_hash != first.content_hash
  assert _read_all(changed.source()) == _expected(RECORDS[:4])


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
  path = _write_jsonl(tmp_path / "sft.jsonl", RECORDS)
  data_dir = tmp_path / "data"
  real_iter = builders.iter_sft_jsonl

  def interrupted(*args, **kwargs):
    for count, item in enumerate(real_iter(*args, **kwargs)):
      if count == 2:
        raise RuntimeError("preempted")
      yield item

  with monkeypatch.context() as patch:
    patch.setattr(builders, "iter_sft_jsonl", interrupted)
    with pytest.raises(RuntimeError, match="preempted"):
      build_sft_jsonl([path], data_dir)
  assert glob.glob(str(data_dir / "sft_jsonl" / "*" / "*" / "dataset_info.json")) == []

  builder = build_sft_jsonl([path], data_dir)
  assert _read_all(builder.source()) == _expected(RECORDS)


# (line, field named in the error or None, text the message must contain)
MALFORMED = [
  ("{not json", None, "not valid JSON"),
  ('["a list"]', None, "fields 'prompt' and 'response' (or 'messages'), got list"),
  ('"a string"', None, "got str"),
  ('{"response": "r"}', "prompt", "missing field 'prompt'"),
  ('{"prompt": "p"}', "response", "missing field 'response'"),
  ('{"prompt": "p", "response": 17}', "response", "must be a non-empty string, got int"),
  ('{"prompt": null, "response": "r"}', "prompt", "must be a non-empty string, got null"),
  ('{"prompt": ["p"], "response": "r"}', "prompt", "must be a non-empty string, got list"),
  ('{"prompt": "p", "response": ""}', "response", "must be a non-empty string, got ''"),
  ('{"prompt": "  ", "response": "r"}', "prompt", "must be a non-empty string, got '  '"),
]


@pytest.mark.parametrize(("line", "field", "message"), MALFORMED)
def test_malformed_record_names_file_line_and_field(tmp_path, line, field, message):
  # The bad record is on line 4: a blank line still counts as a line.
  path = _write_jsonl(tmp_path / "sft.jsonl", [RECORDS[0], "", RECORDS[1], line, RECORDS[2]])
  with pytest.raises(DataError) as info:
    build_sft_jsonl([path], tmp_path / "data")
  error = info.value
  assert str(error).startswith(f"{path}:4: ")
  assert message in str(error)
  assert (error.path, error.line, error.field) == (path, 4, field)
  if field is not None:
    assert f"field {field!r}" in str(error)
  assert isinstance(error, ValueError)
  assert glob.glob(str(tmp_path / "data" / "sft_jsonl" / "*" / "*" / "*.array_record*")) == []


def test_invalid_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_bytes(json.dumps(RECORDS[0]).encode() + b'\n{"prompt": "\xff", "response": "r"}\n')
  with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
    build_sft_jsonl([path], tmp_path / "data")


def test_data_error_survives_pickling():
  error = DataError(
    "x.jsonl", 17, "field 'response' must be a non-empty string, got int", "response"
  )
  copy = pickle.loads(pickle.dumps(error))
  assert str(copy) == "x.jsonl:17: field 'response' must be a non-empty string, got int"
  assert (copy.path, copy.line, copy.field) == ("x.jsonl", 17, "response")


def test_skip_invalid_skips_and_counts(tmp_path):
  lines = [RECORDS[0], "{broken", RECORDS[1], '{"prompt": "p"}', "", RECORDS[2], "[]"]
  path = _write_jsonl(tmp_path / "sft.jsonl", lines)
  builder = build_sft_jsonl([path], tmp_path / "data", skip_invalid=True)
  assert builder.num_skipped == {"train": 3}
  assert _read_all(builder.source()) == _expected(RECORDS[:3])
  errors = builder.skipped_errors["train"]
  assert [e.split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:4", f"{path}:7"]

  # The count is stored with the dataset, so a reused build still reports it.
  reused = SftJsonl(paths=[path], skip_invalid=True, data_dir=str(tmp_path / "data"))
  assert reused.num_skipped == {"train": 3}
  # A strict build of the same files must not reuse the lenient one.
  with pytest.raises(DataError, match=rf"^{path}:2: "):
    build_sft_jsonl([path], tmp_path / "data")


def test_builder_needs_paths_or_config(tmp_path):
  with pytest.raises(ValueError, match="exactly one of"):
    SftJsonl(data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no input files"):
    build_sft_jsonl([], tmp_path / "data")


def test_records_know_their_file_and_line(tmp_path):
  # Blank lines are skipped but still counted, so the line matches an editor's.
  first = _write_jsonl(tmp_path / "a.jsonl", [RECORDS[0], "", "   ", *RECORDS[1:3]])
  second = _write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
  builder = build_sft_jsonl([first, second], tmp_path / "data")
  source = builder.source("train")
  assert [source[i]["line"] for i in range(len(source))] == [1, 4, 5, 1, 2]
  assert source.where(2) == f"{first}:5"
  assert source.where(3) == f"{second}:1"
  assert source.file_of(4) == second
  assert builder.file_counts("train") == [(first, 3, "line"), (second, 2, "line")]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_file_without_records_is_an_error_naming_it(tmp_path, content):
  # TFDS used to fail with "No examples were yielded" and no file name.
  good = _write_jsonl(tmp_path / "good.jsonl", RECORDS[:2])
  empty = tmp_path / "empty.jsonl"
  empty.write_text(content)
  with pytest.raises(DataError, match=f"{empty}: the file has no records"):
    build_sft_jsonl([good, str(empty)], tmp_path / "data")


def test_a_file_whose_records_are_all_invalid_is_an_error_even_when_skipping(tmp_path):
  bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "p"}', "not json"])
  with pytest.raises(
    DataError, match=r"bad.jsonl: all 2 records are invalid \(first: .*bad.jsonl:1"
  ):
    build_sft_jsonl([bad], tmp_path / "data", skip_invalid=True)


def test_a_damaged_built_dataset_is_moved_aside_and_rebuilt(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "a.jsonl", RECORDS)
  builder = build_sft_jsonl([path], tmp_path / "data")
  directory = str(builder.data_dir)
  (shard,) = glob.glob(os.path.join(directory, "sft_jsonl-train.array_record-*"))
  with open(shard, "r+b") as f:  # flip bytes in the middle of the record data
    f.seek(os.path.getsize(shard) // 2)
    f.write(b"\xff\xff\xff\xff")
  rebuilt = build_sft_jsonl([path], tmp_path / "data")
  assert _read_all(rebuilt.source()) == _expected(RECORDS)
  (aside,) = glob.glob(directory + ".damaged-*")  # kept, not deleted
  assert os.path.exists(os.path.join(aside, os.path.basename(shard)))
  assert any("is damaged" in r.getMessage() and directory in r.getMessage() for r in caplog.records)
  # A garbled dataset_info.json is damage too.
  with open(os.path.join(directory, "dataset_info.json"), "w") as f:
    f.write("{not json")
  again = build_sft_jsonl([path], tmp_path / "data")
  assert _read_all(again.source()) == _expected(RECORDS)


# ------------------------------------------------------------------------ chat records

CHAT = {
  "messages": [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Review of the lamp:"},
    {"role": "assistant", "content": "It glows.", "name": "ignored extra key"},
    {"role": "user", "content": "And the kettle? ça va"},
    {"role": "assistant", "content": "It boils."},
  ]
}


def test_chat_and_prompt_response_records_mix_in_one_file(tmp_path):
  path = _write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], CHAT, RECORDS[1]])
  source = build_sft_jsonl([path], tmp_path / "data").source()
  assert _read_all(source)[0::2] == _expected(RECORDS[:2])  # no "messages" key
  chat_record = source[1]
  turns = [{k: t[k] for k in ("role", "content")} for t in CHAT["messages"]]
  assert chat_record["messages"] == turns
  assert chat_record["line"] == 2
  # The last exchange is the prompt/response view (what evaluations sample from).
  assert chat_record["prompt"] == chat.render_prompt(turns[:4])
  assert chat_record["response"] == "It boils."
  assert source.__getitems__([1])[0] == chat_record


CHAT_MALFORMED = [
  ({"messages": []}, "messages", "must be a non-empty list of turns"),
  ({"messages": "hi"}, "messages", "must be a non-empty list of turns, got str"),
  ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role must be one"),
  (
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
    "messages",
    "messages[1].content must be a non-empty string",
  ),
  ({"messages": [{"role": "user", "content": "x"}]}, "messages", "has no assistant turn"),
  ({**CHAT, "prompt": "p"}, "messages", "has both 'messages' and 'prompt'"),
]


@pytest.mark.parametrize(("record", "field", "message"), CHAT_MALFORMED)
def test_malformed_chat_names_file_line_and_field(tmp_path, record, field, message):
  path = _write_jsonl(tmp_path / "sft.jsonl", [CHAT, "", record])
  with pytest.raises(DataError) as info:
    build_sft_jsonl([path], tmp_path / "data")
  assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)
  assert (info.value.line, info.value.field) == (3, field)
  assert "\n" not in str(info.value)


def _tfds_decoded(source):
  """Every record as TFDS's own NumPy decoder gives it (the reference for the fast parser)."""
  data_source = source._data_source
  return [data_source[i] for i in range(len(data_source))]


def test_stored_examples_parse_as_tfds_decodes_them(tmp_path):
  path = _write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], CHAT, *RECORDS[1:]])
  source = build_sft_jsonl([path], tmp_path / "data").source()
  assert source._parser is not None  # the fast path is the one taken
  raw = source._data_source.data_source
  for i, want in enumerate(_tfds_decoded(source)):
    assert builders.same_record(source._parser.parse(raw[i]), want), i


def test_a_parser_that_disagrees_with_tfds_falls_back_to_it(tmp_path, monkeypatch, caplog):
  path = _write_jsonl(tmp_path / "sft.jsonl", RECORDS)
  builder = build_sft_jsonl([path], tmp_path / "data")
  monkeypatch.setattr(builders.ScalarExamples, "parse", lambda self, b: {"prompt": b"wrong"})
  source = builder.source()
  assert source._parser is None
  assert "using TFDS's decoder" in caplog.text
  assert _read_all(source) == _expected(RECORDS)


def test_the_fast_parser_is_only_for_scalar_features():
  class DataSource(types.SimpleNamespace):  # what ScalarExamples reads of a TFDS source
    def __len__(self):
      return 0

  def source(features, **changes):
    fields = {
      "data_source": [],
      "dataset_info": types.SimpleNamespace(features=tfds.features.FeaturesDict(features)),
      "decoders": None,
      "deserialize_method": tfds.decode.DeserializeMethod.DESERIALIZE_AND_DECODE,
    }
    return DataSource(**{**fields, **changes})

  scalars = {"text": tfds.features.Text(), "n": tfds.features.Scalar(np.int64)}
  assert builders.ScalarExamples.for_source(source(scalars)) is not None
  vector = {**scalars, "v": tfds.features.Tensor(shape=(2,), dtype=np.int64)}
  assert builders.ScalarExamples.for_source(source(vector)) is None
  float32 = {**scalars, "f": tfds.features.Scalar(np.float32)}
  assert builders.ScalarExamples.for_source(source(float32)) is None
  assert builders.ScalarExamples.for_source(source(scalars, decoders={"text": 1})) is None
  raw_bytes = tfds.decode.DeserializeMethod.RAW_BYTES
  assert builders.ScalarExamples.for_source(source(scalars, deserialize_method=raw_bytes)) is None


def test_same_record_compares_types_and_nan():
  nan = {"x": np.array(float("nan")), "s": b"a"}
  assert builders.same_record(nan, {"x": np.array(float("nan")), "s": b"a"})
  assert not builders.same_record(nan, {"x": np.array(1.0), "s": b"a"})
  assert not builders.same_record({"n": 1}, {"n": True})
  assert not builders.same_record({"n": 1}, {"m": 1})
