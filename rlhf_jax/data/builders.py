"""TFDS builders that turn local SFT JSONL files (prompt/response or chat) into array_record.

TensorFlow is not needed: TFDS writes `array_record` files with pure-Python
example serialisation and reads them back as random-access data sources.

    builder = build_sft_jsonl(["data/sft.jsonl"], data_dir="/tmp/rlhf_data")
    source = builder.source("train")    # len(source), source[i] -> {"prompt", "response", ...}
    print(builder.content_hash, builder.num_skipped)

A dataset is written once into `data_dir/sft_jsonl/<key>/<VERSION>/` and reused
afterwards. The key is a sha256 of the input files' contents (see
`content_hash`) with the split names and the `skip_invalid` mode, so editing
an input file builds a new dataset rather than silently reusing stale data;
renaming or moving a file does not. TFDS writes
into an `incomplete.*` sibling directory and renames it into place when the
build finishes, so an interrupted build is never read.

Each JSONL line is one object: either with non-empty string fields `prompt` and
`response`, or with `messages`, a chat (`[{"role": "system" | "user" | "assistant",
"content": str}, ...]`, see `rlhf_jax.data.chat`) with at least one assistant turn. A file
may mix both kinds. Other fields are ignored and blank lines skipped. Anything else
raises `DataError` naming the file, the 1-based line and the field, unless
`skip_invalid=True`, which skips the line and counts it (`num_skipped`,
persisted with the dataset). Examples keep the order of the files and lines.

Several hosts: build on one process (or into a per-host local `data_dir`)
before the others read; two concurrent builds of one key race on the rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

# TFDS 4.9.10 also needs `importlib_resources` to prepare a builder defined
# in a package, without declaring it on Python >= 3.9
# (tensorflow/datasets#11212); the project lists it as a dependency.
import tensorflow_datasets as tfds

from rlhf_jax import utils
from rlhf_jax.data import chat
from rlhf_jax.errors import DataError

PathLike = str | os.PathLike[str]

SFT_FIELDS = ("prompt", "response")
MESSAGES = "messages"  # a chat record's field (and the stored feature: its turns as JSON)

# How many skipped-line messages are kept in the dataset's metadata: enough
# to see what is wrong with a file without storing one per bad line.
_MAX_RECORDED_ERRORS = 20

_HASH_CHUNK_BYTES = 1 << 20

_log = logging.getLogger(__name__)


def content_hash(paths: Sequence[PathLike]) -> str:
  """The sha256 (hex) of the files' contents, in the given order.

  Order matters because it is the order of the examples; names do not, so a
  moved file keeps its hash. Each file's size is hashed before its bytes, so
  moving bytes from the end of one file to the start of the next changes the
  hash.
  """
  if isinstance(paths, str | os.PathLike):
    raise TypeError("content_hash takes a sequence of paths, not a single path")
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      digest.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
      while chunk := f.read(_HASH_CHUNK_BYTES):
        digest.update(chunk)
  return digest.hexdigest()


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def parse_sft_record(raw: bytes | str, path: PathLike, line: int) -> dict[str, str]:
  """Validates one JSONL line into `{"prompt": str, "response": str, "messages": str}`.

  A prompt/response record stores "" as its messages. A chat record stores its validated
  turns as JSON text (one Text feature holds any number of turns), and as prompt and
  response its last exchange (`chat.last_exchange`: the rendered turns before the last
  assistant reply, and that reply), which evaluations sample from; training reads the
  turns.

  Raises:
    DataError: the line is not UTF-8 JSON, not an object, a prompt/response field is
      missing, not a string, or blank, or the messages are not a valid chat with an
      assistant turn (or come with a prompt or response as well).
  """
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      raise DataError(
        path, line, f"not valid UTF-8 ({error.reason} at byte {error.start})"
      ) from None
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as error:
    raise DataError(path, line, f"not valid JSON ({error.msg} at column {error.colno})") from None
  if not isinstance(record, dict):
    raise DataError(
      path,
      line,
      "expected a JSON object with fields 'prompt' and 'response' (or 'messages'), got "
      f"{_type_name(record)}",
    )
  if MESSAGES in record:
    return _parse_chat_record(record, path, line)
  out = {}
  for field in SFT_FIELDS:
    if field not in record:
      raise DataError(path, line, f"missing field {field!r}", field)
    value = record[field]
    if not isinstance(value, str):
      raise DataError(
        path, line, f"field {field!r} must be a non-empty string, got {_type_name(value)}", field
      )
    if not value.strip():
      # A blank prompt or response is almost always a broken export, and a
      # blank response would train the model to answer with EOS alone.
      raise DataError(
        path, line, f"field {field!r} must be a non-empty string, got {value!r}", field
      )
    out[field] = value
  out[MESSAGES] = ""
  return out


def _parse_chat_record(record: dict[str, Any], path: PathLike, line: int) -> dict[str, str]:
  both = [field for field in SFT_FIELDS if field in record]
  if both:
    # Which one would train is a guess either way; an export that writes both is broken.
    raise DataError(
      path,
      line,
      f"the record has both 'messages' and {both[0]!r}: give either messages or a prompt "
      "and a response",
      MESSAGES,
    )
  messages = chat.validate_messages(
    record[MESSAGES], lambda message, field: DataError(path, line, message, field)
  )
  if not any(turn["role"] == "assistant" for turn in messages):
    raise DataError(
      path, line, "field 'messages' has no assistant turn: there is nothing to train on", MESSAGES
    )
  prompt, response = chat.last_exchange(messages)
  return {
    "prompt": prompt,
    "response": response,
    MESSAGES: json.dumps(messages, ensure_ascii=False),
  }


def iter_sft_jsonl(
  path: PathLike, *, skip_invalid: bool = False, skipped: list[DataError] | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (1-based line number, record) for each valid line of one file.

  Args:
    path: a JSONL file.
    skip_invalid: skip malformed lines instead of raising.
    skipped: if given, each skipped line's DataError is appended to it.
  """
  # Binary mode: lines split on b"\n" only, so line numbers match what an
  # editor shows even when a string holds U+2028 or a stray "\r".
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        yield line_number, parse_sft_record(raw, path, line_number)
      except DataError as error:
        if not skip_invalid:
          raise
        if skipped is not None:
          skipped.append(error)


def _normalise_splits(paths: Sequence[PathLike] | Mapping[str, Sequence[PathLike]]):
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  if not isinstance(paths, Mapping):
    paths = {"train": paths}
  splits = {}
  for split, files in paths.items():
    if isinstance(files, str | os.PathLike):
      files = [files]
    files = tuple(os.path.abspath(os.fspath(p)) for p in files)
    if not files:
      raise ValueError(f"split {split!r} has no input files")
    splits[str(split)] = files
  if not splits:
    raise ValueError("no input files given")
  return splits


@dataclasses.dataclass(kw_only=True)
class FileSplitsConfig(tfds.core.BuilderConfig):
  """Which local files make which split, keyed by their content; built by `from_paths`.

  The base of every file-backed builder config (SFT JSONL here, preference
  JSONL/Parquet in preferences.py); subclasses only set `KIND`, the
  description's prefix.

  Attributes:
    splits: split name -> absolute JSONL paths, read in this order.
    skip_invalid: skip and count malformed lines instead of raising.
    split_hashes: split name -> `content_hash` of its files.
    content_hash: sha256 over the split names and `split_hashes`: the key of
      the whole dataset, from which the config name (the directory) comes.
  """

  KIND: ClassVar[str] = "files"

  splits: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  skip_invalid: bool = False
  split_hashes: dict[str, str] = dataclasses.field(default_factory=dict)
  content_hash: str = ""

  @classmethod
  def from_paths(
    cls,
    paths: PathLike | Sequence[PathLike] | Mapping[str, Sequence[PathLike]],
    *,
    skip_invalid: bool = False,
  ):
    """A config for a path or list (the "train" split) or {split: paths}."""
    splits = _normalise_splits(paths)
    split_hashes = {split: content_hash(files) for split, files in splits.items()}
    digest = hashlib.sha256()
    for split in sorted(splits):
      # The split name goes in too: the same file as "train" or as "eval"
      # is a different dataset.
      digest.update(f"{split}\0{split_hashes[split]}\0".encode())
    full_hash = digest.hexdigest()
    # A lenient build must never be reused by a strict run: the strict run
    # has to see the errors the lenient one skipped.
    name = f"sha256_{full_hash[:16]}" + ("_skip_invalid" if skip_invalid else "")
    return cls(
      name=name,
      description=f"{cls.KIND}: {splits}",
      splits=splits,
      skip_invalid=skip_invalid,
      split_hashes=split_hashes,
      content_hash=full_hash,
    )


@dataclasses.dataclass(kw_only=True)
class SftJsonlConfig(FileSplitsConfig):
  """SFT JSONL files (prompt/response or chat records) per split."""

  KIND: ClassVar[str] = "SFT JSONL"


LINE = "line"  # provenance feature: the record's 1-based line (Parquet: row) in its file


def generate_from_files(
  builder: Any,
  split: str,
  iter_file: Callable[..., Iterator[tuple[int, dict[str, Any]]]],
  *,
  unit: Callable[[str], str] = lambda path: "line",
) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (index, record + its line) for the split's files, in order; records the counts.

  What every file-backed builder's `_generate_examples` does: read each file with
  `iter_file(path, skip_invalid=..., skipped=...)`, keep the record's line as the
  `line` feature (so an error found later, e.g. a confidence out of range, names
  file and line), and store per split in the dataset's metadata: the records of
  each file (`file_counts`: [path, count, unit]), the skipped count and the first
  skipped errors. A file with no valid record is an error naming it (TFDS would
  otherwise fail with "No examples were yielded" and no file name). `unit(path)`
  says how a file counts its records: "line" (JSONL) or "row" (Parquet).
  """
  config = builder.builder_config
  metadata = builder.info.metadata
  skipped: list[DataError] = []
  counts = []
  index = 0
  for path in config.splits[split]:
    before = len(skipped)
    count = 0
    for line, record in iter_file(path, skip_invalid=config.skip_invalid, skipped=skipped):
      yield index, {**record, LINE: line}
      index += 1
      count += 1
    if not count:
      mine = skipped[before:]
      why = (
        f"all {len(mine)} records are invalid (first: {mine[0]})"
        if mine
        else "the file has no records"
      )
      raise DataError(path, 0, why, hint="Give files with at least one valid record.")
    counts.append([path, count, unit(path)])
  # Runs before TFDS writes dataset_info, so the counts are saved with the data.
  metadata["file_counts"][split] = counts
  metadata["num_skipped"][split] = len(skipped)
  metadata["skipped_errors"][split] = [str(e) for e in skipped[:_MAX_RECORDED_ERRORS]]
  if skipped:
    _log.warning(
      "%s split %r: skipped %d invalid records, first: %s",
      builder.name,
      split,
      len(skipped),
      skipped[0],
    )


class FileRecords:
  """What the file-backed builders share on top of TFDS: hashes, skip counts, sources.

  Mixed into a `tfds.core.GeneratorBasedBuilder` whose config is a
  `FileSplitsConfig`; `_generate_examples` uses `generate_from_files`.
  """

  SOURCE: ClassVar[type] = None  # the source class `source(split)` returns

  def _start_metadata(self) -> None:
    config = self.builder_config
    self.info.metadata["content_hash"] = config.content_hash
    self.info.metadata["split_hashes"] = dict(config.split_hashes)
    self.info.metadata["paths"] = {s: list(p) for s, p in config.splits.items()}
    for key in ("num_skipped", "skipped_errors", "file_counts"):
      self.info.metadata[key] = {}

  def _split_names(self) -> list[str]:
    return list(self.builder_config.splits)

  @property
  def content_hash(self) -> str:
    """The hash that keys this dataset: write it into a run's config to record the data."""
    return self.builder_config.content_hash

  @property
  def split_hashes(self) -> dict[str, str]:
    """Split -> `content_hash` of its input files."""
    return dict(self.builder_config.split_hashes)

  @property
  def num_skipped(self) -> dict[str, int]:
    """Split -> invalid records skipped when the dataset was built (0 when strict)."""
    counts = self.info.metadata.get("num_skipped", {})
    return {split: int(counts.get(split, 0)) for split in self._split_names()}

  @property
  def skipped_errors(self) -> dict[str, list[str]]:
    """Split -> messages of the first skipped records."""
    return {s: list(v) for s, v in self.info.metadata.get("skipped_errors", {}).items()}

  def file_counts(self, split: str) -> list[tuple[str, int, str]]:
    """[(path, records, "line" or "row")] of the split's files, in order."""
    return [tuple(c) for c in self.info.metadata.get("file_counts", {}).get(split, [])]

  def source(self, split: str = "train"):
    """The split as a random-access source of records (text as `str`)."""
    if split not in self._split_names():
      raise KeyError(f"no split {split!r}; this dataset has {sorted(self._split_names())}")
    return self.SOURCE(self.as_data_source(split=split), self.file_counts(split))


class ScalarExamples:
  """Parses the stored examples of a dataset whose features are all scalars (`Text`,
  `Scalar`, a float64 `Tensor`) straight from their protobuf, to what TFDS's NumPy decoder
  gives: bytes for text, Python int or bool, a 0-d float64 array for a float64 stored as
  bytes. All of this module's builders are such datasets.

  TFDS's generic decoder takes ~130 us a preference record on one CPU core, this ~20; the
  reward stage reads its 64k training pairs three times before training (length check,
  confidence check, grouping) and ~190k records while training. `for_source` returns
  None, and the caller keeps TFDS's decoder, for any other dataset or data source, and
  when the first record does not decode to what TFDS gives.
  """

  def __init__(self, kinds: Sequence[tuple[str, str, Any]]):
    from tensorflow_datasets.core import example_parser  # TFDS's copy of tf.Example

    self._kinds = list(kinds)
    self._example = example_parser.tf_example_pb2.Example

  @classmethod
  def for_source(cls, data_source: Any) -> ScalarExamples | None:
    """The parser for a TFDS data source, or None where it does not apply (see above)."""
    raw = getattr(data_source, "data_source", None)
    info = getattr(data_source, "dataset_info", None)
    method = getattr(data_source, "deserialize_method", None)
    if raw is None or info is None or getattr(data_source, "decoders", None) is not None:
      return None
    if getattr(method, "name", None) != "DESERIALIZE_AND_DECODE" or info.features is None:
      return None
    kinds = []
    for name, feature in info.features.items():
      stored, given = feature.get_serialized_info(), feature.get_tensor_info()
      if stored.shape != () or given.shape != ():
        return None
      s, g = np.dtype(stored.np_dtype), np.dtype(given.np_dtype)
      if s == g and g in (np.int64, np.bool_):
        kinds.append((name, "int", bool if g == np.bool_ else int))
      elif s.kind == "O" and g.kind == "O":  # text, as bytes
        kinds.append((name, "bytes", None))
      elif s.kind == "O" and g == np.float64:  # a float64 stored as its bytes
        kinds.append((name, "float64", g))
      else:
        return None
    parser = cls(kinds)
    if len(data_source) and not same_record(parser.parse(raw[0]), data_source[0]):
      logging.warning("Stored examples do not parse as expected; using TFDS's decoder.")
      return None
    return parser

  def parse(self, serialized: bytes) -> dict[str, Any]:
    features = self._example.FromString(serialized).features.feature
    out = {}
    for name, kind, dtype in self._kinds:
      feature = features[name]
      if kind == "bytes":
        out[name] = feature.bytes_list.value[0]
      elif kind == "int":
        out[name] = dtype(feature.int64_list.value[0])
      else:
        out[name] = np.frombuffer(feature.bytes_list.value[0], dtype).reshape(())
    return out


def same_record(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two decoded records hold the same fields, types and values (NaN == NaN)."""
  if a.keys() != b.keys():
    return False
  for key, x in a.items():
    y = b[key]
    if type(x) is not type(y):
      return False
    if isinstance(x, np.ndarray):
      if x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
        return False
    elif x != y:
      return False
  return True


class RecordSource:
  """A random-access source over a TFDS data source, decoding records to Python values.

  `where(i)` names record i's file and line ("data/sft.jsonl:12", "a.parquet: row 3"),
  from the per-file counts the builder stored and the record's `line` feature.
  """

  def __init__(self, data_source: Any, file_counts: Sequence[tuple[str, int, str]] = ()):
    self._data_source = data_source
    self._files = [(str(path), str(unit)) for path, _, unit in file_counts]
    self._ends = np.cumsum([int(count) for _, count, _ in file_counts])
    self._parser = ScalarExamples.for_source(data_source)

  def _decode(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # One batched array_record read instead of one read per record.
    if self._parser is None:
      records = self._data_source.__getitems__(list(indices))
    else:
      records = map(self._parser.parse, self._data_source.data_source.__getitems__(list(indices)))
    return [self._decode(r) for r in records]

  def file_of(self, index: int) -> str:
    """The input file record `index` came from ("" when the counts are unknown)."""
    position = int(np.searchsorted(self._ends, index, side="right"))
    return self._files[position][0] if position < len(self._files) else ""

  def where(self, index: int, record: Mapping[str, Any] | None = None) -> str:
    """ "path:line" (or "path: row N") of record `index`; pass the record if already read."""
    position = int(np.searchsorted(self._ends, index, side="right"))
    if position >= len(self._files):
      return f"record {index}"
    path, unit = self._files[position]
    line = int((record if record is not None else self[index])[LINE])
    return f"{path}:{line}" if unit == "line" else f"{path}: row {line}"

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._data_source!r})"


class SftSource(RecordSource):
  """`{"prompt": str, "response": str, "line": int}` records, and "messages" for chat records.

  A chat record's "messages" is its list of turns; a prompt/response record has no
  "messages" key (its stored "" is left out), so it reads as it did before chat records.
  """

  def _decode(self, record: Mapping[str, Any]) -> dict[str, Any]:
    out = super()._decode(record)
    messages = out.pop(MESSAGES, "")
    if messages:
      out[MESSAGES] = json.loads(messages)
    return out


class SftJsonl(FileRecords, tfds.core.GeneratorBasedBuilder):
  """SFT examples (prompt/response or chat) from local JSONL files, stored as array_record.

  `SftJsonl(paths=[...], data_dir=...)` or `SftJsonl(config=SftJsonlConfig...)`;
  then `download_and_prepare()` (a no-op when already built) and `source(split)`.
  `build_sft_jsonl` does both steps.
  """

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "prompt and response text, in file and line order.",
    "1.1.0": "each record's line in its file; records per file; a file without records fails.",
    "1.2.0": "chat records: the turns as JSON in 'messages' ('' for prompt/response records).",
  }
  SOURCE = SftSource

  def __init__(
    self,
    *,
    paths: PathLike | Sequence[PathLike] | Mapping[str, Sequence[PathLike]] | None = None,
    skip_invalid: bool = False,
    config: SftJsonlConfig | None = None,
    file_format: str = "array_record",
    **kwargs: Any,
  ):
    """Args: paths (or a ready `config`), skip_invalid, and TFDS's `data_dir`, ...."""
    if (paths is None) == (config is None):
      raise ValueError("SftJsonl needs exactly one of `paths` and `config`")
    if config is None:
      config = SftJsonlConfig.from_paths(paths, skip_invalid=skip_invalid)
    elif not isinstance(config, SftJsonlConfig):
      raise TypeError(f"config must be an SftJsonlConfig, got {type(config).__name__}")
    # TFDS re-runs __init__ with only (data_dir, config, version) to unpickle,
    # which works because `paths` becomes part of the config.
    super().__init__(config=config, file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Prompt/response pairs and chats for supervised fine-tuning, from JSONL.",
      features=tfds.features.FeaturesDict(
        {
          "prompt": tfds.features.Text(),
          "response": tfds.features.Text(),
          MESSAGES: tfds.features.Text(),
          LINE: tfds.features.Scalar(np.int64),
        }
      ),
      # Keep file and line order; TFDS would otherwise shuffle by key hash.
      # The loader shuffles per epoch.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Local files only: nothing is downloaded.
    self._start_metadata()
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    return generate_from_files(self, split, iter_sft_jsonl)


# ------------------------------------------------------------------ prepared, verified


_BUILD_CHECKSUMS = "rlhf_jax_checksums.json"


def _dataset_files(directory: str) -> list[str]:
  return sorted(
    name
    for name in os.listdir(directory)
    if name != _BUILD_CHECKSUMS and os.path.isfile(os.path.join(directory, name))
  )


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def dataset_damage(directory: str) -> str | None:
  """What is wrong with a built dataset folder against the checksums written after its build,
  or None when it matches (or predates checksums: nothing to compare)."""
  manifest = os.path.join(directory, _BUILD_CHECKSUMS)
  if not os.path.exists(manifest):
    return None
  try:
    with open(manifest) as f:
      expected = json.load(f)
  except (OSError, ValueError) as error:
    return f"its checksum file {manifest} is unreadable ({error})"
  present = set(_dataset_files(directory))
  for name, digest in sorted(expected.items()):
    path = os.path.join(directory, name)
    if name not in present:
      return f"{path} is missing"
    if _file_sha256(path) != digest:
      return f"{path} does not match the checksum written when it was built"
  return None


def prepare(builder_cls: type, config: Any, data_dir: PathLike, **kwargs: Any) -> Any:
  """Builds (or reuses) the dataset `builder_cls(config=config)`, process 0 first, verified.

  A reused dataset is checked against the sha256 of its files written right after
  its build; a damaged one (a truncated or altered array_record file, a garbled
  dataset_info.json) is moved aside to `<folder>.damaged-<time>` (nothing is
  deleted) with a warning naming it, and rebuilt from the input files, which its
  key (their content hash) says are the same. In a multi-process job process 0
  builds while the others wait (`distributed.primary_first`), then open it.

  Args:
    builder_cls: a GeneratorBasedBuilder taking `config=`, `data_dir=` and `kwargs`.
    config: its BuilderConfig (whose name keys the dataset's folder).
    data_dir: the root of built datasets (its downloads/ folder stays empty).
  """
  from rlhf_jax import distributed  # imported late: it imports JAX

  data_dir = os.fspath(data_dir)
  directory = os.path.join(data_dir, builder_cls.name, config.name, str(builder_cls.VERSION))
  download_dir = os.path.join(data_dir, "downloads")
  make = lambda: builder_cls(config=config, data_dir=data_dir, **kwargs)

  def reuse():
    damage = dataset_damage(directory)
    if damage is None:
      try:
        builder = make()  # reads dataset_info.json
        builder.download_and_prepare(download_dir=download_dir)  # a no-op when built
        return builder, None
      except Exception as error:  # any failure to open a built folder is damage
        damage = f"it cannot be read ({type(error).__name__}: {error})"
    return None, damage

  def build():
    if os.path.isdir(directory):
      builder, damage = reuse()
      if builder is not None:
        return builder
      if not distributed.is_primary():
        raise DataError(directory, 0, f"the built dataset is damaged: {damage}")
      aside = f"{directory}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
      _log.warning(
        "Built dataset %s is damaged (%s): moved to %s; rebuilding.", directory, damage, aside
      )
      os.replace(directory, aside)
    builder = make()
    builder.download_and_prepare(download_dir=download_dir)
    manifest = os.path.join(directory, _BUILD_CHECKSUMS)
    if distributed.is_primary() and not os.path.exists(manifest):
      sums = {n: _file_sha256(os.path.join(directory, n)) for n in _dataset_files(directory)}
      utils.write_json_atomic(manifest, sums)
    return builder

  return distributed.primary_first(f"build/{builder_cls.name}", build)


def build_sft_jsonl(
  paths: PathLike | Sequence[PathLike] | Mapping[str, Sequence[PathLike]],
  data_dir: PathLike,
  *,
  skip_invalid: bool = False,
) -> SftJsonl:
  """Builds the array_record dataset for these files unless already built.

  Args:
    paths: a JSONL path, a list of them (the "train" split), or {split: paths}.
    data_dir: the root holding built datasets (`data_dir/sft_jsonl/<key>/...`).
    skip_invalid: skip and count malformed lines instead of raising.

  Returns:
    The prepared builder: `.source(split)`, `.content_hash`, `.num_skipped`.

  Raises:
    DataError: a malformed line (when not `skip_invalid`), or a file without
      records; nothing is written.
  """
  return prepare(SftJsonl, SftJsonlConfig.from_paths(paths, skip_invalid=skip_invalid), data_dir)
