"""Tests for rlhf_jax.data.preferences: JSONL/Parquet and testbed builders, validation, reuse."""

import glob
import json
import math
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import preferences, testbed
from rlhf_jax.data.builders import DataError
from rlhf_jax.data.preferences import (
  FIELDS,
  ParquetRowError,
  PreferenceFiles,
  TestbedPreferences,
  build_preferences,
  build_testbed_preferences,
  read_preferences,
  write_preference_jsonl,
)

tfds.disable_progress_bar()

RECORDS = [
  {"prompt": "Review of the kettle:", "chosen": "It boils fast.", "rejected": "It is a kettle."},
  {
    "prompt": "Say hi.",
    "chosen": "Salut, ça va ?",
    "rejected": "hi\nthere",
    "rater_id": 7,
    "margin": 1.5,
    "confidence": 4,
    "anchor": True,
    "pair_id": "p-1",
    "shown_order": "rejected_first",
    "time": 1700000048.0135071,
    "p_chosen": 0.9362258064361044,
    "gold_chosen": 1.3210551554017738,
    "gold_rejected": -0.1,
    "source": "an extra field, ignored",
  },
  {"prompt": "Same?", "chosen": "yes", "rejected": "yes", "rater_id": "ann", "tie": True},
  {"prompt": "Nulls", "chosen": "a", "rejected": "b", "confidence": None, "rater_id": None},
]


def _expected(record):
  out = {field: record[field] for field in ("prompt", "chosen", "rejected")}
  for field, default in preferences.DEFAULTS.items():
    value = record.get(field)
    out[field] = default if value is None else value
  out["rater_id"] = str(out["rater_id"])
  out["pair_id"] = str(out["pair_id"])
  for field in ("margin", "confidence", "time", "p_chosen", "gold_chosen", "gold_rejected"):
    out[field] = float(out[field])
  return out


def _same(got, want):
  """Record equality with NaN == NaN."""
  assert list(got) == list(FIELDS)
  for field in FIELDS:
    if isinstance(want[field], float) and math.isnan(want[field]):
      assert isinstance(got[field], float) and math.isnan(got[field]), field
    else:
      assert got[field] == want[field], field
      assert type(got[field]) is type(want[field]), field


def _write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((json.dumps(line, ensure_ascii=False) if isinstance(line, dict) else line) + "\n")
  return str(path)


def _write_parquet(path, records, schema=None):
  table = pa.Table.from_pylist([dict(r) for r in records], schema=schema)
  pq.write_table(table, path)
  return str(path)


def _read_all(source):
  """The records without their provenance (`line`, tested on its own)."""
  return [{k: v for k, v in source[i].items() if k != "line"} for i in range(len(source))]


def test_jsonl_round_trip_fills_defaults_and_keeps_order(tmp_path):
  path = _write_jsonl(tmp_path / "prefs.jsonl", [RECORDS[0], "", *RECORDS[1:]])
  builder = build_preferences([path], tmp_path / "data")
  records = _read_all(builder.source("train"))
  assert len(records) == len(RECORDS)
  for got, want in zip(records, RECORDS, strict=True):
    _same(got, _expected(want))
  # float64 survives exactly (float32 would round unix seconds to minutes).
  assert records[1]["time"] == 1700000048.0135071
  assert records[0]["rater_id"] == "" and math.isnan(records[0]["confidence"])
  assert [r["prompt"] for r in builder.source().__getitems__([3, 0])] == [
    "Nulls",
    RECORDS[0]["prompt"],
  ]
  assert builder.num_skipped == {"train": 0}
  assert builder.content_hash == builder.info.metadata["content_hash"]
  shards = glob.glob(os.path.join(builder.data_dir, "preference_files-train.array_record-*"))
  assert len(shards) == 1


def test_parquet_and_jsonl_give_the_same_records(tmp_path):
  jsonl = _write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
  # Parquet columns are shared by all rows: absent values become nulls, which mean default.
  parquet = _write_parquet(tmp_path / "b.parquet", [{**r} for r in RECORDS[2:]])
  builder = build_preferences({"train": [jsonl, parquet], "eval": [parquet]}, tmp_path / "data")
  for got, want in zip(_read_all(builder.source("train")), RECORDS, strict=True):
    _same(got, _expected(want))
  assert len(builder.source("eval")) == 2
  assert set(builder.split_hashes) == {"train", "eval"}
  with pytest.raises(KeyError, match="no split 'test'"):
    builder.source("test")


def test_parquet_is_recognised_by_its_bytes(tmp_path):
  path = _write_parquet(tmp_path / "prefs.data", RECORDS[:1])
  assert preferences.is_parquet(path)
  assert not preferences.is_parquet(_write_jsonl(tmp_path / "x.data", RECORDS[:1]))
  assert preferences.read_preferences(path)[0]["chosen"] == RECORDS[0]["chosen"]


def test_rebuilds_only_when_input_changes(tmp_path, monkeypatch):
  path = _write_jsonl(tmp_path / "prefs.jsonl", RECORDS[:2])
  first = build_preferences(path, tmp_path / "data")

  def fail_if_generating(self, split):
    raise AssertionError("the dataset was generated again")

  with monkeypatch.context() as patch:
    patch.setattr(PreferenceFiles, "_generate_examples", fail_if_generating)
    again = build_preferences(path, tmp_path / "data")
  assert again.data_dir == first.data_dir and len(again.source()) == 2

  _write_jsonl(tmp_path / "prefs.jsonl", RECORDS[:3])
  changed = build_preferences(path, tmp_path / "data")
  assert changed.content_hash != first.content_hash
  assert len(changed.source()) == 3


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
  path = _write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
  real = preferences.iter_preference_file

  def interrupted(*args, **kwargs):
    for count, item in enumerate(real(*args, **kwargs)):
      if count == 2:
        raise RuntimeError("preempted")
      yield item

  with monkeypatch.context() as patch:
    patch.setattr(preferences, "iter_preference_file", interrupted)
    with pytest.raises(RuntimeError, match="preempted"):
      build_preferences(path, tmp_path / "data")
  assert glob.glob(str(tmp_path / "data" / "preference_files" / "*" / "*" / "*.json")) == []
  assert len(build_preferences(path, tmp_path / "data").source()) == len(RECORDS)


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}

# (record or raw line, field named or None, text the message must contain)
MALFORMED = [
  ("{not json", None, "not valid JSON"),
  ('["a list"]', None, "expected an object with fields 'prompt', 'chosen' and 'rejected'"),
  ({"prompt": "p", "rejected": "b"}, "chosen", "missing field 'chosen'"),
  ({**GOOD, "rejected": ""}, "rejected", "must be a non-empty string, got ''"),
  ({**GOOD, "prompt": 3}, "prompt", "must be a non-empty string, got int"),
  ({**GOOD, "rejected": "a"}, "rejected", "hold the same text"),
  ({**GOOD, "rater_id": True}, "rater_id", "must be a string or an integer, got bool"),
  ({**GOOD, "rater_id": 1.5}, "rater_id", "must be a string or an integer, got float"),
  ({**GOOD, "tie": "no"}, "tie", "must be true or false, got str"),
  ({**GOOD, "tie": 1}, "tie", "must be true or false, got int"),
  ({**GOOD, "margin": -1}, "margin", "must be >= 0"),
  ({**GOOD, "margin": "1"}, "margin", "must be a number, got str"),
  ({**GOOD, "tie": True, "margin": 1.0}, "margin", "must be 0 for a tie"),
  ({**GOOD, "confidence": "high"}, "confidence", "must be a number, got str"),
  ({**GOOD, "anchor": "yes"}, "anchor", "must be true or false"),
  ({**GOOD, "pair_id": [1]}, "pair_id", "must be a string or an integer, got list"),
  ({**GOOD, "shown_order": "left"}, "shown_order", "must be one of"),
  ({**GOOD, "p_chosen": 1.5}, "p_chosen", "must be in [0, 1]"),
  ({**GOOD, "gold_chosen": True}, "gold_chosen", "must be a number, got bool"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "margin", "finite"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "time": Infinity}', "time", "finite"),
]


@pytest.mark.parametrize(("line", "field", "message"), MALFORMED)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, field, message):
  # The bad record is on line 4: a blank line still counts.
  path = _write_jsonl(tmp_path / "prefs.jsonl", [GOOD, "", GOOD, line, GOOD])
  with pytest.raises(DataError) as info:
    build_preferences(path, tmp_path / "data")
  error = info.value
  assert str(error).startswith(f"{path}:4: ")
  assert message in str(error)
  assert (error.path, error.line, error.field) == (path, 4, field)
  if field is not None:
    assert f"'{field}'" in str(error)
  assert (
    glob.glob(str(tmp_path / "data" / "preference_files" / "*" / "*" / "*.array_record*")) == []
  )


def test_nan_means_absent_for_fields_whose_default_is_nan(tmp_path):
  path = _write_jsonl(
    tmp_path / "p.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": NaN}']
  )
  assert math.isnan(preferences.read_preferences(path)[0]["confidence"])


def test_malformed_parquet_names_row_and_field(tmp_path):
  rows = [GOOD, GOOD, {**GOOD, "chosen": None}, GOOD]
  path = _write_parquet(tmp_path / "prefs.parquet", rows)
  with pytest.raises(DataError) as info:
    build_preferences(path, tmp_path / "data")
  error = info.value
  assert isinstance(error, ParquetRowError)
  assert str(error) == f"{path}: row 3: field 'chosen' must be a non-empty string, got null"
  assert (error.line, error.field) == (3, "chosen")
  # A column of the wrong type is refused row by row too.
  schema = pa.schema(
    [
      ("prompt", pa.string()),
      ("chosen", pa.string()),
      ("rejected", pa.string()),
      ("tie", pa.string()),
    ]
  )
  typed = _write_parquet(tmp_path / "typed.parquet", [{**GOOD, "tie": "false"}], schema)
  with pytest.raises(DataError, match=r": row 1: field 'tie' must be true or false, got str"):
    preferences.read_preferences(typed)
  # The message survives pickling (TFDS may build in worker processes).
  copy = pickle.loads(pickle.dumps(error))
  assert (str(copy), copy.line, type(copy)) == (str(error), 3, ParquetRowError)


def test_unreadable_parquet_raises_even_when_skipping(tmp_path):
  path = tmp_path / "broken.parquet"
  path.write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
    build_preferences(path, tmp_path / "data", skip_invalid=True)


def test_skip_invalid_skips_counts_and_persists(tmp_path):
  lines = [GOOD, "{broken", {**GOOD, "rejected": "a"}, GOOD, {**GOOD, "tie": "x"}]
  jsonl = _write_jsonl(tmp_path / "prefs.jsonl", lines)
  parquet = _write_parquet(tmp_path / "prefs.parquet", [GOOD, {**GOOD, "prompt": " "}])
  builder = build_preferences([jsonl, parquet], tmp_path / "data", skip_invalid=True)
  assert builder.num_skipped == {"train": 4}
  assert len(builder.source()) == 3
  errors = builder.skipped_errors["train"]
  assert errors[0].startswith(f"{jsonl}:2: ") and errors[-1].startswith(f"{parquet}: row 2: ")
  reused = PreferenceFiles(
    paths=[jsonl, parquet], skip_invalid=True, data_dir=str(tmp_path / "data")
  )
  assert reused.num_skipped == {"train": 4}
  with pytest.raises(DataError, match=rf"^{jsonl}:2: "):
    build_preferences([jsonl, parquet], tmp_path / "data")


def test_write_preference_jsonl_validates_and_is_atomic(tmp_path):
  path = tmp_path / "out" / "prefs.jsonl"
  records = [
    {
      **GOOD,
      "rater_id": np.int64(3),
      "confidence": np.float32(2.0),
      "time": math.nan,
      "extra": [np.int32(1)],
    },
    {**GOOD, "tie": np.bool_(True), "chosen": "same", "rejected": "same"},
  ]
  assert write_preference_jsonl(records, path) == 2
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines[0] == {**GOOD, "rater_id": 3, "confidence": 2.0, "time": None, "extra": [1]}
  assert lines[1]["tie"] is True

  # A bad record fails before anything replaces the file, naming its would-be line.
  bad = [GOOD, {**GOOD, "rejected": "a"}]
  with pytest.raises(DataError, match=rf"^{path}:2: .*same text") as info:
    write_preference_jsonl(bad, path)
  assert info.value.field == "rejected"
  assert len(path.read_text().splitlines()) == 2  # The old file is untouched.
  assert sorted(os.listdir(path.parent)) == ["prefs.jsonl"]  # No temp file left.
  assert write_preference_jsonl(bad, path, skip_invalid=True) == 1

  # Records as read (empty id fields filled in) are written back as they were.
  path.write_text(
    json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "shown_order": "rejected_first"}) + "\n"
  )
  read = read_preferences(path)
  assert read[0]["shown_order"] == "" and read[0]["rater_id"] == ""
  again = tmp_path / "again.jsonl"
  assert write_preference_jsonl(read, again) == 2
  assert read_preferences(again) == read
  assert "shown_order" not in json.loads(again.read_text().splitlines()[0])


def test_testbed_builder_matches_preference_pairs(tmp_path, monkeypatch):
  builder = build_testbed_preferences(40, seed=1, data_dir=tmp_path / "data")
  raw = testbed.preference_pairs(40, seed=1)
  records = _read_all(builder.source("train"))
  assert len(records) == len(raw) == 40 + 12 * 10
  for got, want in zip(records, raw, strict=True):
    _same(got, _expected(want))
  assert builder.num_skipped == {"train": 0}

  # Built once: the same arguments reuse the data; another seed or config does not.
  def fail_if_generating(self, split):
    raise AssertionError("the dataset was generated again")

  with monkeypatch.context() as patch:
    patch.setattr(TestbedPreferences, "_generate_examples", fail_if_generating)
    again = build_testbed_preferences(40, seed=1, data_dir=tmp_path / "data")
  assert again.content_hash == builder.content_hash
  other_seed = TestbedPreferences(n=40, seed=2, data_dir=str(tmp_path / "data"))
  other_config = TestbedPreferences(
    n=40, seed=1, testbed_config={"panel": {"num_raters": 3}}, data_dir=str(tmp_path / "data")
  )
  assert len({builder.content_hash, other_seed.content_hash, other_config.content_hash}) == 3


def test_testbed_builder_applies_config_and_refuses_unknown_keys(tmp_path):
  overrides = {"panel": {"num_raters": 3, "num_anchor_pairs": 2, "taus": [0.5, 0.5, 0.5]}}
  builder = build_testbed_preferences(20, 0, tmp_path / "data", overrides, split="eval")
  records = _read_all(builder.source("eval"))
  assert len(records) == 20 + 3 * 2
  assert {r["rater_id"] for r in records} == {"0", "1", "2"}
  assert builder.testbed_config.panel.taus == (0.5, 0.5, 0.5)
  assert builder.info.metadata["testbed_config"]["panel"]["num_raters"] == 3
  with pytest.raises(ValueError, match=r"no key panel\.num_rater;"):
    build_testbed_preferences(20, 0, tmp_path / "data", {"panel": {"num_rater": 3}})


def test_testbed_builder_skips_identical_pairs(tmp_path, monkeypatch):
  # The generator now and then draws the same response twice; a strict preference between
  # them does not fit the schema, so it is skipped and counted.
  real = testbed.preference_pairs

  def with_identical_pair(*args, **kwargs):
    records = real(*args, **kwargs)
    records[5] = {**records[5], "rejected": records[5]["chosen"], "tie": False}
    return records

  monkeypatch.setattr(testbed, "preference_pairs", with_identical_pair)
  builder = build_testbed_preferences(10, 0, tmp_path / "data", include_anchors=False)
  assert builder.num_skipped == {"train": 1}
  assert len(builder.source()) == 9
  assert "same text" in builder.skipped_errors["train"][0]


def test_policy_pairs_through_jsonl_equal_the_testbed_builder(tmp_path):
  # The trainer path: label pairs with the panel, write JSONL, build from the file.
  path = tmp_path / "labelled.jsonl"
  assert write_preference_jsonl(testbed.preference_pairs(30, seed=4), path) == 150
  from_file = _read_all(build_preferences(path, tmp_path / "data").source())
  direct = _read_all(build_testbed_preferences(30, 4, tmp_path / "data").source())
  assert len(from_file) == len(direct) == 150
  for got, want in zip(from_file, direct, strict=True):
    _same(got, want)


def test_a_corrupt_parquet_page_names_the_file(tmp_path):
  # Arrow raises a bare OSError ("Corrupt snappy compressed data") that names no file.
  rows = [{**GOOD, "prompt": f"prompt {i} " * 20} for i in range(2000)]
  path = tmp_path / "corrupt.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500, compression="snappy")
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(64)
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf"{path}: cannot read the rows after row \d+"):
    build_preferences([str(path)], tmp_path / "data", skip_invalid=True)


def test_parquet_records_know_their_row(tmp_path):
  jsonl = _write_jsonl(tmp_path / "a.jsonl", [GOOD, "", GOOD])
  parquet = _write_parquet(tmp_path / "b.parquet", [GOOD, GOOD])
  source = build_preferences([jsonl, parquet], tmp_path / "data").source()
  assert [source.where(i) for i in range(4)] == [
    f"{jsonl}:1",
    f"{jsonl}:3",
    f"{parquet}: row 1",
    f"{parquet}: row 2",
  ]


def test_an_empty_preference_file_is_an_error_naming_it(tmp_path):
  empty = _write_parquet(
    tmp_path / "empty.parquet", [], schema=pa.schema([("prompt", pa.string())])
  )
  with pytest.raises(DataError, match=f"{empty}: the file has no records"):
    build_preferences([_write_jsonl(tmp_path / "a.jsonl", [GOOD]), empty], tmp_path / "data")


def test_stored_preferences_parse_as_tfds_decodes_them(tmp_path):
  # NaN defaults (record 0, 3), float64 seconds, bools, ints as text: the fast parser
  # (`builders.ScalarExamples`) gives what TFDS's own decoder gives, field for field.
  from rlhf_jax.data import builders

  source = build_preferences([_write_jsonl(tmp_path / "p.jsonl", RECORDS)], tmp_path / "d").source()
  assert source._parser is not None
  raw, data_source = source._data_source.data_source, source._data_source
  for i in range(len(source)):
    assert builders.same_record(source._parser.parse(raw[i]), data_source[i]), i
