"""Small helpers every layer may use: atomic files, JSON and JSONL.

A reader (another stage, a resumed run, a report) must never see half a
file: each writer goes to a temporary file in the same directory, then
`os.replace`s it into place. The file gets the permissions an ordinary
`open(path, "w")` would give (0666 less the umask), not the 0600 of a
temporary file, so other users and tools can read a run's outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import numpy as np

from rlhf_jax import errors


def _file_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
  """`with atomic_open(path) as f:` writes f to `path` atomically, or leaves it untouched.

  The temp file lives next to `path` (os.replace is atomic within one filesystem)
  and is flushed to disk before the rename; on an exception it is removed. The
  directory is created. `mode` is "w" (UTF-8 text) or "wb".
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp_path = tempfile.mkstemp(
    dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    os.fchmod(handle, _FILE_MODE)
    encoding = None if "b" in mode else "utf-8"
    with os.fdopen(handle, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def _plain(value: Any) -> Any:
  """NumPy scalars as Python numbers, so `json` can write them."""
  return value.item() if isinstance(value, np.generic) else value


def jsonable(value: Any) -> Any:
  """`value` as plain JSON: NumPy scalars and arrays as Python numbers and lists, tuples as
  lists, mapping keys as strings, and non-finite floats (NaN, inf) as None (null)."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple | np.ndarray):
    return [jsonable(v) for v in value]
  return value


def read_json(path: str | os.PathLike[str]) -> Any:
  """The JSON value in `path`; a DataError naming the file when it is missing or damaged."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise errors.DataError(path, 0, f"not readable JSON ({error})") from None


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON with sorted keys, atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_plain)


def write_jsonl_atomic(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes one JSON object per line, atomically; the directory is created."""
  with atomic_open(path) as f:
    for record in records:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


@contextlib.contextmanager
def exclusive_dir(directory: str, lock_name: str, *, wait: bool = False) -> Iterator[None]:
  """Holds an exclusive lock on `<directory>/<lock_name>` for the `with` block.

  The lock is an advisory `flock` on that file: the kernel drops it when the holder exits,
  killed or not, so it is never left stale. The holder writes its host, pid and start time
  into the file. With `wait`, a second caller blocks until the holder is done; without it,
  the second caller gets a ConfigError that names the directory and the holder (one line).
  Two opens of the same file in one process count as two holders. `directory` is created.
  """
  import fcntl  # POSIX only; imported here so the module loads anywhere
  import socket
  import time

  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, lock_name)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
      raise errors.ConfigError(
        f"{directory} is in use by another process ({holder}): wait for it to finish or "
        "use another workdir."
      ) from None
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {stamp}".encode(), 0)
    yield
  finally:
    os.close(fd)  # also releases the lock
