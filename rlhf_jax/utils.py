"""Small helpers every layer may use: atomic JSON and JSONL files.

A reader (another stage, a resumed run, a report) must never see half a
file: each writer goes to a temporary file in the same directory, then
`os.replace`s it into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
  """NumPy scalars as Python numbers, so `json` can write them."""
  return value.item() if isinstance(value, np.generic) else value


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON with sorted keys, atomically."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_plain)
  os.replace(tmp, path)


def write_jsonl_atomic(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes one JSON object per line, atomically; the directory is created."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    for record in records:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
  os.replace(tmp, path)
