"""Preference pairs as TFDS builders writing array_record: local JSONL/Parquet, or the testbed.

TensorFlow is not needed (see builders.py, whose patterns and helpers this module reuses).

    builder = build_preferences(["data/prefs.jsonl", "data/more.parquet"], "/tmp/rlhf_data")
    source = builder.source("train")      # source[i] -> {"prompt": str, "chosen": str, ...}
    print(builder.content_hash, builder.num_skipped)

    builder = build_testbed_preferences(4000, seed=0, data_dir="/tmp/rlhf_data")

    # Pairs sampled from a policy and labelled by the simulated panel go through the files:
    records = testbed.RaterPanel(config).label([(prompt, a, b), ...], rng)
    write_preference_jsonl(records, "run/prefs_step100.jsonl")
    builder = build_preferences(["run/prefs_step100.jsonl"], "/tmp/rlhf_data")

Record schema (one fixed schema for every builder; text features come back as `str`):

  field          type   input                                       default when absent
  prompt         str    required, non-blank string, or a chat: a    -
                        list of turns ending with the user's
  chosen         str    required, non-blank string (or a list of    -
                        one assistant turn)
  rejected       str    required, as chosen                         -
  rater_id       str    string or int (ints are written as "7")     ""
  tie            bool   bool                                        False
  margin         float  finite number >= 0, 0 for a tie             0.0
  confidence     float  finite number (any scale, e.g. 1..5)        NaN
  anchor         bool   bool: a calibration pair shown to every     False
                        rater
  pair_id        str    string or int: which labels judge one pair  ""
  shown_order    str    "chosen_first" or "rejected_first"          ""
  time           float  finite number, e.g. unix seconds            NaN
  p_chosen       float  number in [0, 1]: the testbed's chance of   NaN
                        this answer (for the noise ceiling)
  gold_chosen    float  finite number (the testbed's gold reward)   NaN
  gold_rejected  float  finite number                               NaN

A chat prompt (`[{"role": "system" | "user" | "assistant", "content": str}, ...]`, the
conversational format TRL and others publish, validated as `chat.validate_prompt_messages`)
is stored as its plain rendering (`chat.render_prompt`) in "prompt" and its turns as JSON in
"messages" ("" for a text prompt); a source given a chat format (`render`, set by
`pairs.build` from the tokenizer) renders such prompts with the tokenizer's chat template
instead when it reads them.

Rules: `null` (or a Parquet null) means absent, and so does NaN for the fields whose default
is NaN; other fields are ignored. `chosen == rejected` is invalid unless `tie`: a strict
preference between a text and itself is a broken export (the testbed's generator does draw
one now and then; the testbed builder skips and counts it). For a tie, `chosen`/`rejected`
are just the two texts.

Input files: a file is read as Parquet when its name ends in `.parquet`/`.pq` or it starts
with Parquet's magic bytes `PAR1`, else as JSONL (one object per line, blank lines skipped).
A bad record raises `DataError` naming the file, the 1-based line (Parquet: "row", 1-based)
and the field; with `skip_invalid=True` it is skipped and counted (`num_skipped`, persisted
with the dataset, as in builders.py). An unreadable Parquet file always raises.

Reuse: datasets live in `data_dir/preference_files/<key>/1.0.0/` and
`data_dir/testbed_preferences/<key>/1.0.0/`. The file key is the sha256 of the inputs'
contents with the split names (builders.content_hash) and the skip_invalid mode; the
testbed key is a sha256 of (n, seed, split, anchors, the resolved testbed config, the
testbed's source code), so editing the testbed's code also builds anew. Builds are atomic
(TFDS writes an `incomplete.*` directory and renames it), so an interrupted build is never
read.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax import utils
from rlhf_jax.data import chat
from rlhf_jax.data.builders import (
  _MAX_RECORDED_ERRORS,
  LINE,
  MESSAGES,
  DataError,
  FileRecords,
  FileSplitsConfig,
  PathLike,
  RecordSource,
  _type_name,
  generate_from_files,
  prepare,
)

TEXT_FIELDS = ("prompt", "chosen", "rejected")
# Optional fields and their defaults, in schema order after the text fields.
DEFAULTS: dict[str, Any] = {
  "rater_id": "",
  "tie": False,
  "margin": 0.0,
  "confidence": math.nan,
  "anchor": False,
  "pair_id": "",
  "shown_order": "",
  "time": math.nan,
  "p_chosen": math.nan,
  "gold_chosen": math.nan,
  "gold_rejected": math.nan,
}
FIELDS = TEXT_FIELDS + tuple(DEFAULTS)
SHOWN_ORDERS = ("chosen_first", "rejected_first")

_ID_FIELDS = ("rater_id", "pair_id", "shown_order")
_BOOL_FIELDS = ("tie", "anchor")
_FLOAT_FIELDS = ("margin", "confidence", "time", "p_chosen", "gold_chosen", "gold_rejected")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_MAGIC = b"PAR1"
_PARQUET_BATCH_ROWS = 4096

_log = logging.getLogger(__name__)


class ParquetRowError(DataError):
  """A malformed Parquet row; the message reads `path: row N: what is wrong`.

  `line` holds the 1-based row index; row 0 means the file as a whole (`path: what`).
  """

  def __init__(
    self, path: PathLike, line: int, message: str, field: str | None = None, *, hint=None
  ):
    super().__init__(path, line, message, field, hint=hint)
    where = f"row {line}: " if line else ""
    self.args = (f"{self.path}: {where}{message}",)


# ------------------------------------------------------------------------------ validation


def validate_preference(record: Any, fail: Callable[[str, str | None], DataError]) -> dict:
  """One input record (a parsed JSON object or Parquet row) as a schema record.

  Args:
    record: the raw record.
    fail: makes the DataError for (message, field); it carries the file and line.
  Returns:
    A dict with exactly the FIELDS, defaults filled in (see the module docstring).
  Raises:
    DataError: from `fail`, for the first problem found.
  """
  if not isinstance(record, Mapping):
    raise fail(
      f"expected an object with fields 'prompt', 'chosen' and 'rejected', got {_type_name(record)}",
      None,
    )
  out: dict[str, Any] = {MESSAGES: ""}
  for field in TEXT_FIELDS:
    if field not in record:
      raise fail(f"missing field {field!r}", field)
    value = record[field]
    if field == "prompt" and _is_turns(value):
      turns = chat.validate_prompt_messages(list(value), fail, field)
      out[MESSAGES] = json.dumps(turns, ensure_ascii=False)
      value = chat.render_prompt(turns)
    elif field != "prompt" and _is_turns(value):
      turns = chat.validate_messages(list(value), fail, field)
      if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise fail(f"field {field!r} given as turns must be one assistant turn", field)
      value = turns[0]["content"]
    if not isinstance(value, str) or not value.strip():
      got = repr(value) if isinstance(value, str) else _type_name(value)
      raise fail(f"field {field!r} must be a non-empty string, got {got}", field)
    out[field] = value
  for field, default in DEFAULTS.items():
    value = record.get(field)
    if value is None or (field in _FLOAT_FIELDS and _is_nan(value) and _is_nan(default)):
      out[field] = default
    elif field in _ID_FIELDS:
      out[field] = _as_id(field, value, fail)
    elif field in _BOOL_FIELDS:
      if not isinstance(value, bool):
        raise fail(f"field {field!r} must be true or false, got {_type_name(value)}", field)
      out[field] = value
    else:
      out[field] = _as_float(field, value, fail)
  if out["chosen"] == out["rejected"] and not out["tie"]:
    raise fail(
      "fields 'chosen' and 'rejected' hold the same text; only a tie may compare a "
      "response with itself",
      "rejected",
    )
  if out["tie"] and out["margin"] != 0.0:
    # A margin says by how much chosen is better; a tie says it is not.
    raise fail(f"field 'margin' must be 0 for a tie, got {out['margin']!r}", "margin")
  return out


def _is_turns(value: Any) -> bool:
  """A list of turns (JSON) or a Parquet list column's value, rather than a text."""
  return isinstance(value, list | tuple | np.ndarray)


def _is_nan(value: Any) -> bool:
  return isinstance(value, float) and math.isnan(value)


def _as_id(field: str, value: Any, fail) -> str:
  if field == "shown_order":
    if value not in SHOWN_ORDERS:
      raise fail(f"field 'shown_order' must be one of {SHOWN_ORDERS}, got {value!r}", field)
    return value
  # bool is an int subclass, but True as a rater id is a mistake, not rater 1.
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise fail(f"field {field!r} must be a string or an integer, got {_type_name(value)}", field)
  return str(value)


def _as_float(field: str, value: Any, fail) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise fail(f"field {field!r} must be a number, got {_type_name(value)}", field)
  value = float(value)
  if not math.isfinite(value):
    raise fail(f"field {field!r} must be finite, got {value!r}", field)
  if field == "margin" and value < 0:
    raise fail(f"field 'margin' must be >= 0, got {value!r}", field)
  if field == "p_chosen" and not 0.0 <= value <= 1.0:
    raise fail(f"field 'p_chosen' must be in [0, 1], got {value!r}", field)
  return value


# -------------------------------------------------------------------------------- reading


def is_parquet(path: PathLike) -> bool:
  """Whether `path` is read as Parquet: by its suffix, or else by its first bytes."""
  if os.fspath(path).lower().endswith(_PARQUET_SUFFIXES):
    return True
  with open(path, "rb") as f:
    return f.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC


def _parse_json_line(raw: bytes, path: PathLike, line: int, validate=None) -> Any:
  fail = lambda message, field: DataError(path, line, message, field)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise fail(f"not valid UTF-8 ({error.reason} at byte {error.start})", None) from None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as error:
    raise fail(f"not valid JSON ({error.msg} at column {error.colno})", None) from None
  return (validate or validate_preference)(record, fail)


# The two readers yield (line or row, a function that validates the record), so that
# iter_preference_file can skip one bad record while a broken file still raises.
def _iter_jsonl(path: PathLike, validate) -> Iterator[tuple[int, Callable[[], Any]]]:
  # Binary mode: lines split on b"\n" only, so numbers match an editor (as in builders.py).
  with open(path, "rb") as f:
    for line, raw in enumerate(f, start=1):
      if raw.strip():
        yield line, lambda raw=raw, line=line: _parse_json_line(raw, path, line, validate)


def _iter_parquet(path: PathLike, validate) -> Iterator[tuple[int, Callable[[], Any]]]:
  import pyarrow  # Imported here: only Parquet input needs it.
  import pyarrow.parquet as pq

  try:
    parquet_file = pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as error:
    raise ParquetRowError(path, 0, f"not a readable Parquet file ({error})") from None
  row = 0
  batches = parquet_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (pyarrow.ArrowException, OSError) as error:
      # A corrupt page surfaces as OSError from Arrow's reader, which names no file.
      raise ParquetRowError(path, 0, f"cannot read the rows after row {row} ({error})") from None
    for raw in batch.to_pylist():
      row += 1
      fail = lambda message, field, row=row: ParquetRowError(path, row, message, field)
      yield row, lambda raw=raw, fail=fail: validate(raw, fail)


def iter_preference_file(
  path: PathLike,
  *,
  skip_invalid: bool = False,
  skipped: list[DataError] | None = None,
  validate: Callable[[Any, Callable[[str, str | None], DataError]], Any] = validate_preference,
) -> Iterator[tuple[int, Any]]:
  """Yields (1-based line or row, schema record) for each valid record of one file.

  Args:
    path: a JSONL or Parquet file (see `is_parquet`).
    skip_invalid: skip malformed records instead of raising.
    skipped: if given, each skipped record's DataError is appended to it.
    validate: validate(raw record, fail) -> the record to yield; `fail(message, field)`
      makes the DataError naming the file and line. Other record kinds (prompts) read
      their files through this function with their own validation.
  """
  rows = _iter_parquet(path, validate) if is_parquet(path) else _iter_jsonl(path, validate)
  for number, parse in rows:
    try:
      yield number, parse()
    except DataError as error:
      if not skip_invalid:
        raise
      if skipped is not None:
        skipped.append(error)


def read_preferences(
  paths: PathLike | Sequence[PathLike],
  *,
  skip_invalid: bool = False,
  skipped: list[DataError] | None = None,
) -> list[dict]:
  """The validated records of one or more files, in order, without building a dataset."""
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  return [
    record
    for path in paths
    for _, record in iter_preference_file(path, skip_invalid=skip_invalid, skipped=skipped)
  ]


def write_preference_jsonl(
  records: Iterable[Mapping[str, Any]], path: PathLike, *, skip_invalid: bool = False
) -> int:
  """Writes preference records as JSONL that `build_preferences` reads; returns the count.

  Records are checked first, so a bad one fails here, not at build time: DataError names
  `path` and the line the record would have had. With `skip_invalid`, such records are left
  out (e.g. the testbed's rare pair of identical texts labelled as a strict preference).
  Fields are written as given (NumPy scalars as Python numbers, NaN as null, extra fields
  kept), atomically: a temp file in the same folder, renamed into place. An empty id field
  (`rater_id`, `pair_id`, `shown_order` = "", the value reading gives an absent one) is
  left out, so records read from a file are written back as they were.
  """
  path = os.fspath(path)
  written = 0
  with utils.atomic_open(path) as f:
    for record in records:
      plain = {k: v for k, v in utils.jsonable(record).items() if not (k in _ID_FIELDS and v == "")}
      line = written + 1
      try:
        validate_preference(plain, lambda m, field: DataError(path, line, m, field))
      except DataError:
        if skip_invalid:
          continue
        raise
      f.write(json.dumps(plain, ensure_ascii=False, allow_nan=False) + "\n")
      written += 1
  return written


# ------------------------------------------------------------------------------- builders


def _features() -> tfds.features.FeaturesDict:
  features: dict[str, Any] = {field: tfds.features.Text() for field in TEXT_FIELDS + _ID_FIELDS}
  features.update({field: tfds.features.Scalar(np.bool_) for field in _BOOL_FIELDS})
  # tf.Example stores floats as float32, which rounds unix seconds to minutes and the
  # testbed's probabilities to 7 digits: raw float64 bytes keep every value exactly.
  float64 = tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
  features.update({field: float64 for field in _FLOAT_FIELDS})
  features[LINE] = tfds.features.Scalar(np.int64)  # provenance: line (Parquet: row) in its file
  features[MESSAGES] = tfds.features.Text()  # a chat prompt's turns as JSON, "" for a text
  return tfds.features.FeaturesDict({field: features[field] for field in (*FIELDS, LINE, MESSAGES)})


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What both preference builders share: the schema (plus each record's line) and sources."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "The preference schema of rlhf_jax.data.preferences.",
    "1.1.0": "Each record's line (Parquet: row) in its file; records per file.",
    "1.2.0": "Chat prompts: their turns as JSON in 'messages' ('' for a text prompt).",
  }
  _DESCRIPTION = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self._DESCRIPTION,
      features=_features(),
      # Keep input order; the loader shuffles per epoch.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )


@dataclasses.dataclass(kw_only=True)
class PreferenceFilesConfig(FileSplitsConfig):
  """Which JSONL/Parquet preference files make which split; see `FileSplitsConfig`."""

  KIND: ClassVar[str] = "preference JSONL/Parquet"


class PreferenceSource(RecordSource):
  """Schema records with Python values (str, bool, float) and their `line`; `where(i)`.

  A chat prompt's record also has its turns under "messages"; with `render` set (a chat
  format's `render_prompt`), its "prompt" is rendered by it instead of the stored plain text.
  """

  render: Callable[[list[dict[str, str]]], str] | None = None

  def _decode(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return _decode(record, self.render)


class PreferenceFiles(FileRecords, _PreferenceBuilder):
  """Preference pairs from local JSONL and Parquet files, stored as array_record.

  `PreferenceFiles(paths=..., data_dir=...)` or `PreferenceFiles(config=...)`, then
  `download_and_prepare()` (a no-op when built) and `source(split)`; `build_preferences`
  does both.
  """

  _DESCRIPTION = "Preference pairs (prompt, chosen, rejected, rater, ...) from local files."
  SOURCE = PreferenceSource

  def __init__(
    self,
    *,
    paths: PathLike | Sequence[PathLike] | Mapping[str, Sequence[PathLike]] | None = None,
    skip_invalid: bool = False,
    config: PreferenceFilesConfig | None = None,
    file_format: str = "array_record",
    **kwargs: Any,
  ):
    if (paths is None) == (config is None):
      raise ValueError("PreferenceFiles needs exactly one of `paths` and `config`")
    if config is None:
      config = PreferenceFilesConfig.from_paths(paths, skip_invalid=skip_invalid)
    elif not isinstance(config, PreferenceFilesConfig):
      raise TypeError(f"config must be a PreferenceFilesConfig, got {type(config).__name__}")
    super().__init__(config=config, file_format=file_format, **kwargs)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Local files only.
    self._start_metadata()
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    unit = lambda path: "row" if is_parquet(path) else "line"
    return generate_from_files(self, split, iter_preference_file, unit=unit)


def resolve_testbed_config(
  overrides: Mapping[str, Any] | ml_collections.ConfigDict | None,
) -> ml_collections.ConfigDict:
  """testbed.default_config() with a nested dict of overrides applied (None: defaults).

  Raises:
    ValueError: naming the dotted key of an override the testbed config does not have.
  """
  from rlhf_jax.data import testbed  # imported only for testbed data

  config = testbed.default_config()
  if isinstance(overrides, ml_collections.ConfigDict):
    overrides = overrides.to_dict()

  def apply(section: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
    for key, value in values.items():
      if key not in section:
        raise ValueError(
          f"testbed_config has no key {prefix}{key}; keys here: {sorted(section.keys())}"
        )
      if isinstance(section[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
        apply(section[key], value, f"{prefix}{key}.")
      else:
        section[key] = value  # ConfigDict checks the type (and turns lists into tuples).

  apply(config, overrides or {}, "")
  return config


def _testbed_source_hash() -> str:
  """sha256 of the testbed package's source files: a code change must not reuse old data."""
  from rlhf_jax.data import testbed  # imported only for testbed data

  directory = os.path.dirname(testbed.__file__)
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    digest.update(os.path.basename(path).encode() + b"\0")
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


@dataclasses.dataclass(kw_only=True)
class TestbedPreferencesConfig(tfds.core.BuilderConfig):
  """Which testbed pairs to generate; built by `from_args`.

  Attributes:
    n: pairs labelled once each by a random rater (anchors come on top).
    seed: testbed.preference_pairs's seed.
    split: the testbed's prompt split ("train", or "eval" for held-out items), also the
      name of the dataset's only split.
    include_anchors: start with every anchor pair labelled by every rater.
    testbed_config: the resolved testbed config as a plain dict.
    content_hash: sha256 over all of the above and the testbed's source code.
  """

  __test__ = False  # Not a pytest class, despite the name.

  n: int = 0
  seed: int = 0
  split: str = "train"
  include_anchors: bool = True
  testbed_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  content_hash: str = ""

  @classmethod
  def from_args(
    cls,
    n: int,
    seed: int,
    testbed_config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
    *,
    split: str = "train",
    include_anchors: bool = True,
  ) -> TestbedPreferencesConfig:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    resolved = json.loads(json.dumps(resolve_testbed_config(testbed_config).to_dict()))
    key = {
      "n": n,
      "seed": int(seed),
      "split": split,
      "include_anchors": bool(include_anchors),
      "testbed_config": resolved,
      "testbed_source": _testbed_source_hash(),
    }
    full_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cls(
      name=f"{split}_n{n}_seed{int(seed)}_{full_hash[:16]}",
      description=f"testbed preference pairs: n={n}, seed={seed}, split={split}",
      n=n,
      seed=int(seed),
      split=split,
      include_anchors=bool(include_anchors),
      testbed_config=resolved,
      content_hash=full_hash,
    )


class TestbedPreferences(FileRecords, _PreferenceBuilder):
  """The testbed's panel-labelled generator pairs (testbed.preference_pairs), as array_record.

  Same schema as PreferenceFiles. Records the schema refuses (a strict preference between
  two identical texts, which the generator draws about once in 5000 pairs) are skipped and
  counted in `num_skipped`.
  """

  __test__ = False  # Not a pytest class, despite the name.
  _DESCRIPTION = "Synthetic testbed preference pairs labelled by the simulated rater panel."
  SOURCE = PreferenceSource

  def __init__(
    self,
    *,
    n: int | None = None,
    seed: int = 0,
    testbed_config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
    split: str = "train",
    include_anchors: bool = True,
    config: TestbedPreferencesConfig | None = None,
    file_format: str = "array_record",
    **kwargs: Any,
  ):
    if (n is None) == (config is None):
      raise ValueError("TestbedPreferences needs exactly one of `n` and `config`")
    if config is None:
      config = TestbedPreferencesConfig.from_args(
        n, seed, testbed_config, split=split, include_anchors=include_anchors
      )
    elif not isinstance(config, TestbedPreferencesConfig):
      raise TypeError(f"config must be a TestbedPreferencesConfig, got {type(config).__name__}")
    super().__init__(config=config, file_format=file_format, **kwargs)

  def _split_names(self) -> list[str]:
    return [self.builder_config.split]

  @property
  def testbed_config(self) -> ml_collections.ConfigDict:
    """The testbed config the pairs were generated with."""
    return resolve_testbed_config(self.builder_config.testbed_config)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Generated, nothing to download.
    config = self.builder_config
    self.info.metadata["content_hash"] = config.content_hash
    self.info.metadata["n"] = config.n
    self.info.metadata["seed"] = config.seed
    self.info.metadata["include_anchors"] = config.include_anchors
    self.info.metadata["testbed_config"] = config.testbed_config
    for key in ("num_skipped", "skipped_errors", "file_counts"):
      self.info.metadata[key] = {}
    return {config.split: self._generate_examples(config.split)}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    from rlhf_jax.data import testbed  # imported only for testbed data

    config = self.builder_config
    records = testbed.preference_pairs(
      config.n,
      config.seed,
      config=self.testbed_config,
      include_anchors=config.include_anchors,
      split=config.split,
    )
    where = f"<testbed {config.name}>"
    skipped: list[DataError] = []
    index = 0
    for number, record in enumerate(records, start=1):
      fail = lambda message, field, number=number: DataError(where, number, message, field)
      try:
        valid = validate_preference(record, fail)
      except DataError as error:
        skipped.append(error)
        continue
      yield index, {**valid, LINE: number}
      index += 1
    # Runs before TFDS writes dataset_info, so the counts are saved with the data.
    self.info.metadata["file_counts"][split] = [[where, index, "line"]]
    self.info.metadata["num_skipped"][split] = len(skipped)
    self.info.metadata["skipped_errors"][split] = [str(e) for e in skipped[:_MAX_RECORDED_ERRORS]]


def comparison_groups(source: Any, max_responses: int, max_records: int) -> list[list[int]]:
  """Record indices grouped for K-wise reward-model training (InstructGPT-style).

  A group is a run of consecutive records with the same prompt, cut so that it holds at
  most `max_records` records and `max_responses` distinct responses; a trainer scores each
  distinct response once and takes every comparison of the group from those scores. Any
  grouping of same-prompt records is valid (it only saves forward passes), so only
  neighbours are merged: a file that writes the K(K-1)/2 pairs of each prompt's K
  responses together (the testbed does) gets groups of K responses. With
  `max_responses=2, max_records=1` every record is its own group, read nothing.

  Args:
    source: random-access preference records (`PreferenceSource`, a list of dicts).
    max_responses: R >= 2, distinct responses a group may hold.
    max_records: P >= 1, comparisons a group may hold.
  """
  if max_responses < 2 or max_records < 1:
    raise ValueError(
      f"need max_responses >= 2 and max_records >= 1, got {max_responses}, {max_records}."
    )
  if max_records == 1:
    return [[i] for i in range(len(source))]
  groups: list[list[int]] = []
  prompt, responses = None, set()
  for i, record in iter_records(source):
    pair = {record["chosen"], record["rejected"]}
    if (
      not groups
      or record["prompt"] != prompt
      or len(groups[-1]) == max_records
      or len(responses | pair) > max_responses
    ):
      groups.append([])
      prompt, responses = record["prompt"], set()
    groups[-1].append(i)
    responses |= pair
  return groups


def iter_records(source: Any, chunk: int = 4096) -> Iterator[tuple[int, dict[str, Any]]]:
  """(index, record) for every record of a random-access source, read in batched chunks."""
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(len(source), start + chunk)))
    yield from zip(indices, _read_many(source, indices), strict=True)


def _read_many(source: Any, indices: list[int]) -> list[Any]:
  """source[i] for each index, in one batched read where the source has one."""
  if hasattr(source, "__getitems__"):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


class GroupedSource:
  """A random-access source of record groups: `source[i]` is the list of group i's records."""

  def __init__(self, source: Any, groups: Sequence[Sequence[int]]):
    self._source = source
    self._groups = [list(g) for g in groups]

  def __len__(self) -> int:
    return len(self._groups)

  def __getitem__(self, index: int) -> list[dict[str, Any]]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[list[dict[str, Any]]]:
    records = iter(_read_many(self._source, [i for g in indices for i in self._groups[g]]))
    return [[next(records) for _ in self._groups[g]] for g in indices]


def _decode(record: Mapping[str, Any], render=None) -> dict[str, Any]:
  out = {LINE: int(record[LINE])} if LINE in record else {}
  for field in FIELDS:
    value = record[field]
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    elif field in _BOOL_FIELDS:
      value = bool(value)
    elif field in _FLOAT_FIELDS:
      value = float(value)
    out[field] = value
  messages = record.get(MESSAGES, b"")
  if messages:
    out[MESSAGES] = chat.decode_messages(messages)
    if render is not None:
      out["prompt"] = render(out[MESSAGES])
  return out


def build_preferences(
  paths: PathLike | Sequence[PathLike] | Mapping[str, Sequence[PathLike]],
  data_dir: PathLike,
  *,
  skip_invalid: bool = False,
) -> PreferenceFiles:
  """Builds the array_record dataset for these JSONL/Parquet files unless already built.

  Args:
    paths: a path, a list of them (the "train" split), or {split: paths}.
    data_dir: the root holding built datasets (`data_dir/preference_files/<key>/...`).
    skip_invalid: skip and count invalid records instead of raising.

  Returns:
    The prepared builder: `.source(split)`, `.content_hash`, `.num_skipped`.

  Raises:
    DataError: an invalid record (when not `skip_invalid`); nothing is written.
  """
  config = PreferenceFilesConfig.from_paths(paths, skip_invalid=skip_invalid)
  return prepare(PreferenceFiles, config, data_dir)


def build_testbed_preferences(
  n: int,
  seed: int,
  data_dir: PathLike,
  testbed_config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
  *,
  split: str = "train",
  include_anchors: bool = True,
) -> TestbedPreferences:
  """Builds testbed.preference_pairs(n, seed, ...) as array_record unless already built.

  Args:
    n: pairs, each labelled once by a random rater; the anchors come first, on top.
    seed: the pairs' seed.
    data_dir: the root holding built datasets (`data_dir/testbed_preferences/<key>/...`).
    testbed_config: nested dict of overrides of testbed.default_config() (JSON-serialisable,
      e.g. {"panel": {"num_raters": 5}}), a ConfigDict, or None for the defaults.
    split: "train" prompts or "eval" (held-out items); the dataset's split name.
    include_anchors: start with the anchor pairs labelled by every rater.

  Returns:
    The prepared builder: `.source(split)`, `.content_hash`, `.num_skipped`.
  """
  config = TestbedPreferencesConfig.from_args(
    n, seed, testbed_config, split=split, include_anchors=include_anchors
  )
  return prepare(TestbedPreferences, config, data_dir)
