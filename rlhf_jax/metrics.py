"""Metrics: metrics.jsonl and TensorBoard events, NaN/Inf health checks, console progress, MFU.

The trainer-facing pieces, all usable on their own:

  MetricWriter      process 0 appends one JSON line per `write(step, metrics)` to
                    `<workdir>/metrics.jsonl` and the same scalars to TensorBoard event
                    files under `<workdir>/tensorboard/`, written without TensorFlow.
  read_metrics      reads metrics.jsonl back as a list of dicts.
  check_finite      the hard stop: raises NonFiniteError naming the step and every bad metric.
  ProgressLogger    one readable console line: step/total, percent, metrics, steps/s, ETA.
  StepTimer         seconds per step between calls, with the compiling first call left out.
  PEAK_FLOPS, peak_flops_per_device, mfu
                    model FLOPs utilisation against vendor peak figures.
  MEMORY_BANDWIDTH, peak_memory_bandwidth
                    memory bandwidth per device, for the decode roofline.

A typical loop:

  writer = MetricWriter(workdir, resume_step=start_step)
  progress = ProgressLogger(total_steps, every_n_steps=config.log_every, start_step=start_step)
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = update(state, batch)
    if step % config.log_every == 0:
      metrics = jax.device_get(metrics)
      check_finite(step, metrics)
      writer.write(step, metrics)
    progress.log(step, metrics)
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from rlhf_jax import errors, utils

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"

# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), needed by the TFRecord framing of TensorBoard event files.
# ------------------------------------------------------------------------------------------------

_CRC32C_POLY_REVERSED = 0x82F63B78


def _make_crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY_REVERSED if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c_python(data: bytes) -> int:
  """CRC-32C of `data`, table-driven pure Python (a few MB/s: plenty for scalar events)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _find_crc32c() -> Callable[[bytes], int]:
  # A C implementation is used when one happens to be installed (both packages are common
  # in Google Cloud environments); it is never required.
  try:
    import google_crc32c  # type: ignore[import-not-found]

    return google_crc32c.value
  except ImportError:
    pass
  try:
    import crc32c as crc32c_package  # type: ignore[import-not-found]

    return crc32c_package.crc32c
  except ImportError:
    return crc32c_python


crc32c: Callable[[bytes], int] = _find_crc32c()


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant.

  The mask keeps a CRC computed over data that itself contains CRCs from being degenerate.
  """
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return (
    length
    + struct.pack("<I", masked_crc32c(length))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


# ------------------------------------------------------------------------------------------------
# Hand-encoded protos: tensorboard.Event and tensorboard.Summary (field numbers from
# tensorboard/compat/proto/event.proto and summary.proto). Only scalars are needed, so a few
# lines of wire format replace a dependency on protobuf-generated classes.
# ------------------------------------------------------------------------------------------------

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64s are sent as their 64-bit two's complement
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, _WIRE_BYTES) + _varint(len(data)) + data


def _summary_value(tag: str, value: float) -> bytes:
  # Summary.Value: tag = 1 (string), simple_value = 2 (float32).
  return _bytes_field(1, tag.encode("utf-8")) + _key(2, _WIRE_FIXED32) + struct.pack("<f", value)


def encode_event(
  *,
  wall_time: float,
  step: int,
  file_version: str | None = None,
  scalars: Mapping[str, float] | None = None,
  session_log_start: bool = False,
) -> bytes:
  """Serializes a tensorboard.Event proto holding a file version, scalars or a START log.

  Event fields: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
  summary = 5 (Summary{repeated Value value = 1}), session_log = 7 (SessionLog{status = 1}).
  """
  out = _key(1, _WIRE_FIXED64) + struct.pack("<d", wall_time)
  if step:  # proto3 leaves zero-valued scalars out
    out += _key(2, _WIRE_VARINT) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode("utf-8"))
  if scalars:
    summary = b"".join(_bytes_field(1, _summary_value(t, v)) for t, v in scalars.items())
    out += _bytes_field(5, summary)
  if session_log_start:
    out += _bytes_field(7, _key(1, _WIRE_VARINT) + _varint(1))  # SessionLog.START = 1
  return out


class _EventFileWriter:
  """Appends scalar events to a fresh `events.out.tfevents.*` file."""

  def __init__(self, logdir: str, *, purge_from_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard reads a run's event files in filename order and the name starts with a
    # 10-digit timestamp; a file opened in the same second as an older one (a quick restart)
    # must still sort after it, so the timestamp is bumped past any existing file's.
    seconds = int(time.time())
    for name in os.listdir(logdir):
      parts = name.split(".")
      if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
        seconds = max(seconds, int(parts[3]) + 1)
    name = f"events.out.tfevents.{seconds:010d}.{socket.gethostname()}.{os.getpid()}.v2"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")  # closed by close()
    self._write(encode_event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
    if purge_from_step is not None:
      # What TF's `purge_step` writes: readers drop earlier events at steps >= this one, so
      # the steps a crashed run logged after its last checkpoint do not show up twice.
      self._write(encode_event(wall_time=time.time(), step=purge_from_step, session_log_start=True))
    self._file.flush()

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord_frame(event))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._write(encode_event(wall_time=time.time(), step=step, scalars=scalars))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------


def _to_python_scalar(name: str, value: Any) -> bool | int | float:
  """numpy/jax/Python scalar (or one-element array) -> bool, int or float."""
  if isinstance(value, bool | int | float) and not isinstance(value, np.generic):
    return value
  array = np.asarray(value)  # also fetches a jax.Array from the device
  if array.size != 1:
    raise TypeError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
  item = array.reshape(()).item()
  if array.dtype.kind == "b":
    return bool(item)
  if array.dtype.kind in "iu":
    return int(item)
  if jax.numpy.issubdtype(array.dtype, jax.numpy.floating):  # bfloat16 included
    return float(item)
  raise TypeError(f"Metric {name!r} must be a real number, got dtype {array.dtype}.")


def _json_value(value: bool | int | float) -> bool | int | float | None:
  # JSON has no NaN or Infinity; `null` keeps every line parseable by strict readers (jq,
  # pandas, JavaScript) instead of Python's non-standard `NaN` token.
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _parse_lines(path: str, text: str) -> list[tuple[str, dict[str, Any]]]:
  """(line, record) for each complete line; a damaged line is an error naming file and line.

  A last line without a newline is left out: a write in progress, or one cut off by a crash.
  """
  out = []
  for number, line in enumerate(text.split("\n")[:-1], start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not an object with an integer 'step'")
    except ValueError as error:
      raise errors.DataError(
        path,
        number,
        f"not a metrics line ({error})",
        hint=f"Move {path} aside to start a new log; nothing else in the run depends on it.",
      ) from None
    out.append((line, record))
  return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads metrics.jsonl (or `<path>/metrics.jsonl` when given a workdir) into a list of dicts.

  Non-finite values come back as None (they are written as null). A last line without a
  newline is skipped: it is a write in progress or one cut off by a crash.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILENAME)
  with open(path, encoding="utf-8") as f:
    return [record for _, record in _parse_lines(path, f.read())]


class MetricWriter:
  """Writes metrics to `<workdir>/metrics.jsonl` and TensorBoard, from the primary process only.

  `write(step, metrics)` appends one JSON object, `{"step": step, name: value, ...}`, with
  numpy/jax scalars turned into Python ints and floats (bools stay bools). JSON has no NaN
  or Infinity, so non-finite values are written as `null`; TensorBoard gets them unchanged.
  Each line is flushed as it is written, so a killed run leaves only whole lines (at worst
  one cut-off last line, which the next MetricWriter on this workdir removes).

  Resuming: pass `resume_step`, the step the restored checkpoint finished (0 for a fresh
  start). Lines with a step above it, logged after that checkpoint by a run that then died,
  are removed (the file is rewritten atomically) so the resumed run's metrics.jsonl matches an
  uninterrupted run's. With `resume_step=None` existing lines are all kept and appended to.
  TensorBoard always gets a new event file; on resume it starts with a SessionLog.START at
  `resume_step + 1`, which makes TensorBoard drop the old file's events from that step on.

  On processes other than the primary (by default `jax.process_index() != 0`) every method
  does nothing, so trainers call it unconditionally. The workdir must be a local or mounted
  path (the rewrite uses os.replace). Usable as a context manager.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    resume_step: int | None = None,
    is_primary: bool | None = None,
    tensorboard: bool = True,
    exporter: Any = None,
  ):
    self.workdir = os.fspath(workdir)
    # rlhf_jax.exporters: every line also goes to Prometheus / W&B / DogStatsD when set up.
    self.exporter = exporter
    self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
    self.path = os.path.join(self.workdir, METRICS_FILENAME)
    self._file = None
    self._events: _EventFileWriter | None = None
    if not self.is_primary:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._truncate(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")  # closed by close()
    if tensorboard:
      self._events = _EventFileWriter(
        os.path.join(self.workdir, TENSORBOARD_DIRNAME),
        purge_from_step=None if resume_step is None else resume_step + 1,
      )

  def _truncate(self, resume_step: int | None) -> None:
    """Drops lines past `resume_step` and a cut-off last line, rewriting the file atomically."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      text = f.read()
    parsed = _parse_lines(self.path, text)
    if resume_step is not None:
      parsed = [(line, record) for line, record in parsed if record["step"] <= resume_step]
    lines = [line for line, _ in parsed]
    new_text = "".join(line + "\n" for line in lines)
    if new_text == text:
      return
    # Write aside and rename, so a crash here leaves either the old or the new file whole.
    with utils.atomic_open(self.path) as tmp:
      tmp.write(new_text)

  @property
  def tensorboard_path(self) -> str | None:
    """The event file this writer appends to, or None (not primary, or TensorBoard off)."""
    return None if self._events is None else self._events.path

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **metrics}` as one line, and the scalars to TensorBoard."""
    if not self.is_primary:
      return
    if self._file is None:
      raise ValueError("MetricWriter is closed.")
    if "step" in metrics:
      raise ValueError('"step" is reserved for the step argument; rename that metric.')
    step = int(step)
    values = {name: _to_python_scalar(name, value) for name, value in metrics.items()}
    record = {"step": step} | {name: _json_value(v) for name, v in values.items()}
    # One write call per line, then flush: on kill the file ends with whole lines.
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._events is not None and values:
      self._events.write_scalars(step, {name: float(v) for name, v in values.items()})
    if self.exporter is not None:
      self.exporter.write(step, values)

  def flush(self) -> None:
    """A no-op kept for API symmetry: every write is already flushed."""

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._events is not None:
      self._events.close()
      self._events = None
    if self.exporter is not None:
      exporter, self.exporter = self.exporter, None
      exporter.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Health check
# ------------------------------------------------------------------------------------------------


class NonFiniteError(errors.TrainingError):
  """A logged metric is NaN or Inf. `step` and `bad` ({name: value}) say where and which."""

  def __init__(self, message: str, *, step: int, bad: Mapping[str, Any], hint: str | None = None):
    super().__init__(message, hint=hint)
    self.step = step
    self.bad = dict(bad)


def _describe_non_finite(value: Any) -> str | None:
  """None when `value` is finite (or not a float/complex number), else a short description."""
  if isinstance(value, str | bytes) or value is None:
    return None
  array = np.asarray(value)
  if jax.numpy.issubdtype(array.dtype, jax.numpy.complexfloating):
    finite = np.isfinite(array.astype(np.complex128))
  elif jax.numpy.issubdtype(array.dtype, jax.numpy.floating):  # bfloat16 included
    finite = np.isfinite(array.astype(np.float64))
  else:
    return None  # ints and bools cannot be NaN
  if finite.all():
    return None
  if array.size == 1:
    return repr(array.reshape(()).item())
  return f"{finite.size - int(finite.sum())} of {finite.size} elements non-finite"


def check_finite(
  step: int,
  metrics: Mapping[str, Any],
  keys: Iterable[str] | None = None,
  *,
  context: str = "training",
) -> None:
  """Raises NonFiniteError if any metric (or any of `keys`, where present) is NaN or Inf.

  Values may be Python, numpy or jax scalars or arrays (a jax.Array is fetched, which waits
  for the step). Non-numeric values and integer dtypes are skipped; so are `keys` missing
  from `metrics`, so one key list can serve train and eval dicts.
  """
  names = list(metrics) if keys is None else [k for k in keys if k in metrics]
  bad = {}
  for name in names:
    description = _describe_non_finite(metrics[name])
    if description is not None:
      bad[name] = description
  if not bad:
    return
  listed = ", ".join(f"{name}={description}" for name, description in bad.items())
  plural = "s" if len(bad) > 1 else ""
  raise NonFiniteError(
    f"Non-finite {context} metric{plural} at step {step}: {listed}.",
    step=step,
    bad=bad,
    hint="Training stopped before saving this step; the checkpoints saved earlier are kept "
    "(each is verified when resumed). Rerun to resume from the latest with a lower learning "
    "rate, a smaller grad clip norm or another seed, or inspect the batch at this step.",
  )


# ------------------------------------------------------------------------------------------------
# Step timing and console progress
# ------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
  """h:mm:ss, with hours allowed past 24 (`format_duration(90061) == "25:01:01"`)."""
  if not math.isfinite(seconds):
    return "--:--:--"
  total = max(0, math.floor(seconds + 0.5))  # half up, not round()'s half to even
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class StepTimer:
  """Mean seconds per step between calls to `lap(step)`.

  The first call only sets the starting point, so the first step (which includes jit
  compilation) never enters a rate. JAX dispatches asynchronously: call `lap` after the
  step's outputs were fetched (e.g. after `jax.device_get(metrics)`), or the time measures
  dispatch, not work.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._last: tuple[int, float] | None = None

  def lap(self, step: int) -> float | None:
    """Seconds per step since the previous lap; None on the first call or if no step passed."""
    now = self._clock()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0]:
      return None
    return (now - last[1]) / (step - last[0])


def _format_metric(value: Any) -> str:
  try:
    value = _to_python_scalar("", value)
  except TypeError:
    return str(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class ProgressLogger:
  """Prints a one-line progress report with absl.logging.info every n steps or seconds.

    step 400/1000 (40.0%) | loss=0.6931 kl=0.0123 | 5.00 steps/s | elapsed 0:01:32 | ETA 0:02:00

  Call `log(step, metrics)` after every step (or every log step); it prints on the first call,
  when `step % every_n_steps == 0`, when `every_seconds` passed since the last line, and on the
  last step. Steps/s is measured over the steps since the previous printed line (the recent
  rate), so the first step's compile time never enters it; the ETA is the remaining steps over
  that rate. The first line instead says how long the run took to reach it (compile included).
  `metric_keys` picks the metrics shown (default: all given); `clock` is for tests.
  """

  def __init__(
    self,
    total_steps: int,
    *,
    every_n_steps: int | None = None,
    every_seconds: float | None = None,
    start_step: int = 0,
    metric_keys: Iterable[str] | None = None,
    tokens_per_step: int | None = None,
    clock: Callable[[], float] = time.monotonic,
  ):
    if every_n_steps is None and every_seconds is None:
      raise ValueError("Give every_n_steps or every_seconds (or both).")
    if every_n_steps is not None and every_n_steps < 1:
      raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
    self.total_steps = total_steps
    self.every_n_steps = every_n_steps
    self.every_seconds = every_seconds
    self.start_step = start_step
    self.metric_keys = None if metric_keys is None else list(metric_keys)
    self.tokens_per_step = tokens_per_step
    self._clock = clock
    self._timer = StepTimer(clock)
    self._start_time = clock()
    self._last_print_time: float | None = None

  def _due(self, step: int, now: float) -> bool:
    if self._last_print_time is None or step >= self.total_steps:
      return True
    if self.every_n_steps is not None and step % self.every_n_steps == 0:
      return True
    return self.every_seconds is not None and now - self._last_print_time >= self.every_seconds

  def log(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
    """Prints and returns the progress line when one is due, else returns None."""
    now = self._clock()
    if not self._due(step, now):
      return None
    first = self._last_print_time is None
    self._last_print_time = now
    seconds_per_step = self._timer.lap(step)
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f"step {step}/{self.total_steps} ({percent:.1f}%)"]
    metrics = metrics or {}
    keys = self.metric_keys if self.metric_keys is not None else list(metrics)
    shown = [f"{k}={_format_metric(metrics[k])}" for k in keys if k in metrics]
    if shown:
      parts.append(" ".join(shown))
    elapsed = now - self._start_time
    if first:
      steps_done = step - self.start_step
      parts.append(f"first {steps_done} step(s) took {elapsed:.1f}s (compile included)")
    elif seconds_per_step is not None and seconds_per_step > 0:
      rate = f"{1.0 / seconds_per_step:.2f} steps/s"
      if self.tokens_per_step:
        rate += f", {self.tokens_per_step / seconds_per_step:,.0f} tokens/s"
      parts.append(rate)
    parts.append(f"elapsed {format_duration(elapsed)}")
    if seconds_per_step is not None and seconds_per_step > 0:
      remaining = max(0, self.total_steps - step)
      parts.append(f"ETA {format_duration(remaining * seconds_per_step)}")
    line = " | ".join(parts)
    logging.info("%s", line)
    return line


# ------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ------------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bfloat16 peak FLOP/s per JAX device, matched as a case-insensitive
# substring of `device.device_kind` that does not run on into more letters or digits, first
# match wins.
# Sources: vendor datasheets. NVIDIA H100 (SXM 989.4 TFLOPS, PCIe 756 TFLOPS; the
# datasheet's 1979/1513 include sparsity), H200 (989 TFLOPS, same die as H100 SXM), A100
# (312 TFLOPS, SXM and PCIe), L40S (362 TFLOPS), L40 (181 TFLOPS), L4 (121 TFLOPS); Google
# Cloud TPU system architecture pages, per chip, one JAX device per chip: v4 275, v5e 197,
# v5p 459, v6e (Trillium) 918 TFLOPS. JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e
# "TPU v6 lite".
PEAK_FLOPS: dict[str, float] = {
  "H100 PCIe": 756e12,
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L40S": 362e12,
  "L40": 181e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "Trillium": 918e12,
}

# Float32 peaks from the same NVIDIA datasheets: plain FP32 (CUDA cores, not TF32 tensor
# cores), so an f32 model that XLA runs on TF32 can show MFU above 100%. TPUs publish no
# float32 figure (XLA runs f32 matmuls as bf16 passes on the MXU); for them
# peak_flops_per_device falls back to the bf16 figure and says so.
PEAK_FLOPS_FP32: dict[str, float] = {
  "H100 PCIe": 51e12,
  "H100": 67e12,
  "H200": 67e12,
  "A100": 19.5e12,
  "L40S": 91.6e12,
  "L40": 90.5e12,
  "L4": 30.3e12,
}

# Nominal CPU throughput, not a measured peak: one AVX-512 FMA per core per cycle (16 float32
# lanes x 2 FLOP = 32 FLOP) at 2.5 GHz.
CPU_NOMINAL_FLOPS_PER_CORE = 2.5e9 * 32

_BF16_NAMES = ("bfloat16", "bf16", "float16", "fp16", "half")
_FP32_NAMES = ("float32", "fp32", "f32", "single")


def _lookup(table: Mapping[str, float], device_kind: str) -> tuple[str, float] | None:
  kind = device_kind.lower()
  for name, flops in table.items():
    # The name must not run on into more letters or digits: "L4" is not "L40S", "A100" is not
    # "RTX A1000", "TPU v5" is not "TPU v5p". Anything may precede it ("GH200" is an H200).
    if re.search(re.escape(name.lower()) + r"(?![0-9a-z])", kind):
      return name, flops
  return None


def peak_flops_per_device(device: Any = None, dtype: Any = "bfloat16") -> tuple[float, str]:
  """Peak FLOP/s of one device and a short note on where the number came from.

  Args:
    device: a jax.Device (default: `jax.devices()[0]`). Anything with `device_kind` and
      `platform` attributes works.
    dtype: "bfloat16" (also float16, which NVIDIA tensor cores run at the same rate) or
      "float32"; numpy/jax dtypes are accepted.

  Returns:
    (flops, note). GPUs and TPUs come from PEAK_FLOPS / PEAK_FLOPS_FP32. CPU devices get a
    nominal `os.cpu_count() * 2.5e9 * 32` FLOP/s (AVX-512 FMA, fp32) shared among the
    host's CPU devices (the fake devices of `--xla_force_host_platform_device_count` share
    the same cores): a rough scale for comparing runs, not a real peak. An unknown device
    kind gives NaN, so `mfu` is NaN too: leave MFU out of the logged metrics (and out of
    check_finite) in that case.
  """
  if device is None:
    device = jax.devices()[0]
  name = getattr(dtype, "name", None) or str(dtype)
  try:
    name = np.dtype(dtype).name
  except TypeError:
    pass
  name = name.lower()
  if name not in _BF16_NAMES + _FP32_NAMES:
    raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}.")
  fp32 = name in _FP32_NAMES
  kind = str(getattr(device, "device_kind", ""))
  if getattr(device, "platform", None) == "cpu":
    cores = os.cpu_count() or 1
    num_cpu_devices = len(jax.local_devices(backend="cpu"))
    flops = cores * CPU_NOMINAL_FLOPS_PER_CORE / max(1, num_cpu_devices)
    return flops, (
      f"nominal CPU: {cores} cores x 2.5 GHz x 32 FLOP/cycle (AVX-512 FMA, fp32)"
      f" / {num_cpu_devices} CPU device(s)"
    )
  if fp32:
    match = _lookup(PEAK_FLOPS_FP32, kind)
    if match is not None:
      return match[1], f"{match[0]} fp32 peak (vendor datasheet, non-tensor-core)"
    match = _lookup(PEAK_FLOPS, kind)
    if match is not None:
      return match[1], f"{match[0]} bf16 peak (vendor datasheet, dense; no fp32 figure)"
  else:
    match = _lookup(PEAK_FLOPS, kind)
    if match is not None:
      return match[1], f"{match[0]} bf16 peak (vendor datasheet, dense)"
  return float("nan"), f"unknown device kind {kind!r}: no peak FLOP/s, MFU not available"


# Memory bandwidth (HBM; GDDR6 on the L-series) in bytes/s per JAX device, matched as
# PEAK_FLOPS is (`_lookup`, first match wins). Decoding reads every weight and the KV cache
# once per step, so bytes / bandwidth is the fastest a decode step can be (the roofline of
# benchmarks/device_check.py).
# Sources: vendor datasheets. NVIDIA H100 SXM 3.35 TB/s, PCIe 2.0 TB/s, NVL 3.9 TB/s; H200
# 4.8 TB/s; A100 80GB 2.0 TB/s, 40GB 1.555 TB/s (JAX names the 40GB parts "A100-SXM4-40GB"
# and "A100-PCIE-40GB"); L40S and L40 864 GB/s, L4 300 GB/s; Google Cloud TPU pages, per
# chip: v4 1.2 TB/s, v5e 819 GB/s, v5p 2.76 TB/s, v6e 1.64 TB/s.
MEMORY_BANDWIDTH: dict[str, float] = {
  "H100 PCIe": 2.0e12,
  "H100 NVL": 3.9e12,
  "H100": 3.35e12,
  "H200": 4.8e12,
  "A100-SXM4-40GB": 1.555e12,
  "A100-PCIE-40GB": 1.555e12,
  "A100": 2.0e12,
  "L40S": 0.864e12,
  "L40": 0.864e12,
  "L4": 0.3e12,
  "TPU v4": 1.2e12,
  "TPU v5 lite": 0.82e12,
  "TPU v5e": 0.82e12,
  "TPU v5p": 2.76e12,
  "TPU v5": 2.76e12,
  "TPU v6 lite": 1.64e12,
  "TPU v6e": 1.64e12,
  "Trillium": 1.64e12,
}


def peak_memory_bandwidth(device: Any = None) -> tuple[float | None, str]:
  """Memory bandwidth of one device in bytes/s and where the number came from.

  (None, reason) for CPUs and unknown kinds: host memory bandwidth depends on the machine's
  channels and sockets, so there is no honest table entry, and a roofline fraction against
  a guess would read as a measurement. `device` defaults to `jax.devices()[0]`.
  """
  if device is None:
    device = jax.devices()[0]
  kind = str(getattr(device, "device_kind", ""))
  if getattr(device, "platform", None) == "cpu":
    return None, "CPU: no memory bandwidth figure, roofline not available"
  match = _lookup(MEMORY_BANDWIDTH, kind)
  if match is None:
    return None, f"unknown device kind {kind!r}: no memory bandwidth, roofline not available"
  return match[1], f"{match[0]} memory bandwidth (vendor datasheet)"


def mfu(
  model_flops_per_step: float, step_time_s: float, num_devices: int, peak_per_device: float
) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (0..1).

  Args:
    model_flops_per_step: FLOPs the model needs per step across all devices, counted
      analytically (e.g. 6 x params x tokens for a dense transformer's train step), not
      including rematerialisation.
    step_time_s: wall-clock seconds per step (e.g. from StepTimer).
    num_devices: devices the step runs on (`jax.device_count()`).
    peak_per_device: FLOP/s of one device (from `peak_flops_per_device`).
  """
  if step_time_s <= 0 or num_devices <= 0:
    raise ValueError(
      f"step_time_s and num_devices must be positive, got {step_time_s} and {num_devices}."
    )
  return model_flops_per_step / (step_time_s * num_devices * peak_per_device)
