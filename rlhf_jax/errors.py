"""The errors rlhf_jax raises on purpose: bad input that the user can fix.

Every error the framework raises *deliberately* (a malformed data file, a config
value out of range, a damaged checkpoint, a missing upstream stage, a NaN in
training, another process of the job failing) derives from `Error`. The
launcher (`experiments/launch.py`) prints such an error as one or two lines,
what went wrong and where (file:line:field, the dotted config key, the
checkpoint folder), then what to do, and exits with status 2 and no traceback;
`--verbose` adds the traceback. Anything else is a bug and keeps its
traceback.

    raise errors.ConfigError("config.optim.lr = -0.01 must be > 0.")
    raise errors.DataError("data/prefs.jsonl", 3, "missing field 'chosen'", "chosen")
    raise errors.CheckpointError("runs/sft/checkpoints/60: checksum mismatch in state/...",
                                 hint="Delete that folder to resume from an older checkpoint.")

The classes also derive from the builtin they replace (ValueError, ...), so
code that caught those keeps working.
"""

from __future__ import annotations

import os
from typing import Any

EXIT_CODE = 2  # the launcher's exit status for an Error (absl's usage errors use 1)


class Error(Exception):
  """Base of every error rlhf_jax raises on purpose.

  Attributes:
    kind: a short label the launcher prints before the message ("config error").
    hint: an optional second line saying what to do.
  """

  kind = "error"

  def __init__(self, message: str = "", *, hint: str | None = None):
    super().__init__(message)
    self.hint = hint

  def lines(self) -> list[str]:
    """What the launcher prints: `FATAL <kind>: <message>` and the hint, if any."""
    out = [f"FATAL {self.kind}: {self}"]
    if self.hint:
      out.append(self.hint)
    return out


class ConfigError(Error, ValueError):
  """A config or command-line value that cannot run; the message names the dotted key."""

  kind = "config error"


class DataError(Error, ValueError):
  """A malformed input file or record; the message reads `path:line: what is wrong`.

  `line` is 1-based; 0 means the file as a whole (`path: what is wrong`). `field`
  names the record field at fault, when there is one.
  """

  kind = "data error"

  def __init__(
    self,
    path: str | os.PathLike[str],
    line: int,
    message: str,
    field: str | None = None,
    *,
    hint: str | None = None,
  ):
    self.path = os.fspath(path)
    self.line = line
    self.field = field
    self.reason = message
    where = f"{self.path}:{line}" if line else self.path
    super().__init__(f"{where}: {message}", hint=hint)

  def __reduce__(self) -> tuple[Any, ...]:
    # The default would call DataError(full_message) and fail: keep the parts.
    return _rebuild_data_error, (
      type(self),
      self.path,
      self.line,
      self.reason,
      self.field,
      self.hint,
    )


def _rebuild_data_error(cls, path, line, reason, field, hint):
  return cls(path, line, reason, field, hint=hint)


class CheckpointError(Error):
  """A checkpoint or exported stage that cannot be read; the message names its folder."""

  kind = "checkpoint error"


class StageError(Error, FileNotFoundError):
  """An upstream stage that is missing, unfinished or of the wrong kind."""

  kind = "stage error"


class TrainingError(Error, FloatingPointError):
  """Training cannot go on (e.g. a non-finite metric); the message names the step."""

  kind = "training error"


class DistributedError(Error, RuntimeError):
  """Another process of a multi-process job failed; the message is that process's."""

  kind = "error in another process"
