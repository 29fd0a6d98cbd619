"""Tests for rlhf_jax.metrics: metrics.jsonl, TensorBoard events, health checks, progress, MFU.

TensorBoard files are read back with the real `tensorboard` package (no TensorFlow needed), so
the hand-written event encoder and CRCs are checked against an independent reader.
"""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# A test dependency on purpose (not skipped when missing): the independent reader of our files.
from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from rlhf_jax import metrics as metrics_lib


def _raise_on_constant(token):
  raise AssertionError(f"non-standard JSON constant {token} in metrics.jsonl")


def _strict_lines(path):
  """Parses every line with NaN/Infinity tokens forbidden, as jq or JavaScript would."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.endswith("\n")
  return [json.loads(line, parse_constant=_raise_on_constant) for line in text.splitlines()]


def _write_steps(workdir, steps, scale=1.0, **kwargs):
  with metrics_lib.MetricWriter(workdir, is_primary=True, **kwargs) as writer:
    for step in steps:
      writer.write(step, {"loss": scale * step / 10, "objective/kl": np.float32(step)})


def _event_file(workdir):
  tb_dir = os.path.join(workdir, "tensorboard")
  (name,) = os.listdir(tb_dir)
  return os.path.join(tb_dir, name)


def _tb_scalars(workdir, tag):
  acc = event_accumulator.EventAccumulator(
    os.path.join(workdir, "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
  )
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


# --- CRC ------------------------------------------------------------------------------------


def test_crc32c_known_vectors():
  assert metrics_lib.crc32c_python(b"123456789") == 0xE3069283
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283
  assert metrics_lib.crc32c_python(b"") == 0
  # RFC 3720 (iSCSI) B.4: 32 bytes of zeros.
  assert metrics_lib.crc32c_python(bytes(32)) == 0x8A9136AA


def test_masked_crc_matches_tensorboard_reference():
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

  for data in [b"", b"123456789", bytes(range(256)), b"brain.Event:2" * 7]:
    assert metrics_lib.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


# --- metrics.jsonl --------------------------------------------------------------------------


def test_jsonl_content_step_first_and_python_types(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, is_primary=True, tensorboard=False) as writer:
    writer.write(
      np.int64(3),
      {
        "loss": np.float32(0.5),
        "kl": jnp.asarray(0.25, jnp.float32),
        "tokens": np.int32(7),
        "count": 2,
        "lr": 1e-4,
        "bf16": jnp.asarray(1.5, jnp.bfloat16),
        "one_element": np.array([4.0]),
      },
    )
    writer.write(4, {"loss": 0.125})
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    text = f.read()
  assert text == (
    '{"step": 3, "loss": 0.5, "kl": 0.25, "tokens": 7, "count": 2, "lr": 0.0001, '
    '"bf16": 1.5, "one_element": 4.0}\n'
    '{"step": 4, "loss": 0.125}\n'
  )
  first = _strict_lines(tmp_path / "metrics.jsonl")[0]
  assert next(iter(first)) == "step"
  assert type(first["step"]) is int
  assert type(first["tokens"]) is int
  assert type(first["count"]) is int
  assert type(first["loss"]) is float
  assert type(first["bf16"]) is float
  assert metrics_lib.read_metrics(tmp_path) == _strict_lines(tmp_path / "metrics.jsonl")
  assert not (tmp_path / "tensorboard").exists()


def test_non_finite_written_as_null(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, is_primary=True, tensorboard=False) as writer:
    writer.write(1, {"loss": float("nan"), "ratio": np.float32(np.inf), "kl": -jnp.inf, "x": 1.0})
  (line,) = _strict_lines(tmp_path / "metrics.jsonl")
  assert line == {"step": 1, "loss": None, "ratio": None, "kl": None, "x": 1.0}


def test_rejects_non_scalars_and_step_key(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, is_primary=True, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="'logits' must be a scalar"):
      writer.write(1, {"logits": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 2})


def test_resume_drops_lines_after_resume_step(tmp_path):
  resumed, uninterrupted = tmp_path / "resumed", tmp_path / "uninterrupted"
  _write_steps(resumed, range(1, 11), tensorboard=False)
  _write_steps(resumed, [7, 8], resume_step=6, tensorboard=False)
  _write_steps(uninterrupted, range(1, 9), tensorboard=False)
  assert [m["step"] for m in metrics_lib.read_metrics(resumed)] == list(range(1, 9))
  assert (resumed / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
  # The rewrite went through a temp file that must not be left behind.
  assert sorted(os.listdir(resumed)) == ["metrics.jsonl"]


def test_resume_drops_trailing_partial_line(tmp_path):
  _write_steps(tmp_path, range(1, 6), tensorboard=False)
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 6, "loss": 0.')  # killed mid-write
  # A reader of a live or crashed run skips the cut-off line.
  assert [m["step"] for m in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
  _write_steps(tmp_path, [6, 7], resume_step=5, tensorboard=False)
  assert [m["step"] for m in _strict_lines(tmp_path / "metrics.jsonl")] == list(range(1, 8))


def test_append_without_resume_step_keeps_lines_but_drops_partial(tmp_path):
  _write_steps(tmp_path, range(1, 4), tensorboard=False)
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4')
  _write_steps(tmp_path, [4], tensorboard=False)
  assert [m["step"] for m in _strict_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_lines_are_flushed_on_each_write(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, is_primary=True)
  writer.write(1, {"loss": 1.0})
  # Read before close: what a kill at this point would leave.
  assert metrics_lib.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
  assert len(list(event_file_loader.LegacyEventFileLoader(_event_file(tmp_path)).Load())) == 2
  writer.close()


def test_non_primary_writes_nothing(tmp_path, monkeypatch):
  explicit = tmp_path / "explicit"
  with metrics_lib.MetricWriter(explicit, is_primary=False, resume_step=0) as writer:
    writer.write(1, {"loss": 1.0})
    assert writer.tensorboard_path is None
  assert not explicit.exists()

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  default = tmp_path / "default"
  with metrics_lib.MetricWriter(default) as writer:
    writer.write(1, {"loss": 1.0})
  assert not default.exists()

  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with metrics_lib.MetricWriter(default) as writer:
    writer.write(1, {"loss": 1.0})
  assert metrics_lib.read_metrics(default) == [{"step": 1, "loss": 1.0}]


# --- TensorBoard ----------------------------------------------------------------------------


def test_tensorboard_events_read_back_exactly(tmp_path):
  steps = [1, 2, 3, 1000, 2**40]
  with metrics_lib.MetricWriter(tmp_path, is_primary=True) as writer:
    for step in steps:
      writer.write(step, {"loss": 1 / (step + 2), "objective/kl": np.float32(-step), "n": 7})
  for tag, fn in [("loss", lambda s: 1 / (s + 2)), ("objective/kl", lambda s: -s), ("n", None)]:
    expected = [(s, float(np.float32(7 if fn is None else fn(s)))) for s in steps]
    assert _tb_scalars(tmp_path, tag) == expected

  events = list(event_file_loader.LegacyEventFileLoader(_event_file(tmp_path)).Load())
  assert events[0].file_version == "brain.Event:2"
  assert len(events) == 1 + len(steps)  # a CRC mismatch would have cut the stream short
  assert [e.step for e in events[1:]] == steps
  assert [v.tag for v in events[1].summary.value] == ["loss", "objective/kl", "n"]
  assert all(e.wall_time > 1e9 for e in events)


def test_tensorboard_reader_checks_crcs(tmp_path):
  """A flipped data byte stops the reader: so a full read above means the CRCs are right."""
  _write_steps(tmp_path, [1, 2, 3])
  path = _event_file(tmp_path)
  assert len(list(event_file_loader.LegacyEventFileLoader(path).Load())) == 4
  data = bytearray(open(path, "rb").read())
  data[-10] ^= 0x01  # inside the last record's payload
  with open(path, "wb") as f:
    f.write(data)
  assert len(list(event_file_loader.LegacyEventFileLoader(path).Load())) == 3


def test_tensorboard_resume_purges_orphaned_steps(tmp_path):
  _write_steps(tmp_path, range(1, 11))
  _write_steps(tmp_path, [7, 8], scale=100.0, resume_step=6)
  tb_files = sorted(os.listdir(tmp_path / "tensorboard"))
  assert len(tb_files) == 2
  expected = [(s, float(np.float32(s / 10))) for s in range(1, 7)]
  expected += [(s, float(np.float32(100.0 * s / 10))) for s in (7, 8)]
  assert _tb_scalars(tmp_path, "loss") == expected


# --- Health check ---------------------------------------------------------------------------


def test_check_finite_names_step_and_every_bad_metric():
  with pytest.raises(metrics_lib.NonFiniteError) as info:
    metrics_lib.check_finite(
      12, {"loss": jnp.float32(jnp.nan), "accuracy": 0.5, "grad_norm": np.float64(np.inf)}
    )
  message = str(info.value)
  assert message.startswith("Non-finite training metrics at step 12: loss=nan, grad_norm=inf.")
  assert "accuracy" not in message
  assert "checkpoints saved earlier are kept" in info.value.hint
  assert isinstance(info.value, FloatingPointError)
  assert info.value.step == 12
  assert set(info.value.bad) == {"loss", "grad_norm"}


def test_check_finite_scalar_kinds_and_arrays():
  for bad in [float("nan"), np.float32(-np.inf), jnp.asarray(jnp.nan, jnp.bfloat16), [1.0, np.nan]]:
    with pytest.raises(metrics_lib.NonFiniteError, match="step 3: x="):
      metrics_lib.check_finite(3, {"x": bad})
  with pytest.raises(metrics_lib.NonFiniteError, match=r"x=2 of 4 elements non-finite"):
    metrics_lib.check_finite(3, {"x": jnp.array([1.0, jnp.nan, jnp.inf, 0.0])})


def test_check_finite_passes_finite_values_and_respects_keys():
  metrics_lib.check_finite(
    1,
    {
      "loss": jnp.float32(0.3),
      "norm": np.float64(1e300),
      "tokens": np.int32(5),
      "done": True,
      "name": "run",
      "vec": jnp.ones(3),
    },
  )
  # Only the named keys are checked; names missing from the dict are skipped.
  metrics_lib.check_finite(1, {"loss": 0.3, "eval/ratio": math.nan}, keys=["loss", "absent"])
  with pytest.raises(metrics_lib.NonFiniteError, match="eval metric at step 1: eval/ratio=nan"):
    metrics_lib.check_finite(1, {"eval/ratio": math.nan}, keys=["eval/ratio"], context="eval")


# --- Progress -------------------------------------------------------------------------------


class _FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_format_duration():
  assert metrics_lib.format_duration(0) == "0:00:00"
  assert metrics_lib.format_duration(0.5) == "0:00:01"
  assert metrics_lib.format_duration(2.5) == "0:00:03"
  assert metrics_lib.format_duration(59.6) == "0:01:00"
  assert metrics_lib.format_duration(3 * 3600 + 4 * 60 + 5) == "3:04:05"
  assert metrics_lib.format_duration(90061) == "25:01:01"
  assert metrics_lib.format_duration(math.inf) == "--:--:--"


def test_progress_eta_from_recent_rate_without_first_step(monkeypatch):
  printed = []
  monkeypatch.setattr(metrics_lib.logging, "info", lambda fmt, *args: printed.append(fmt % args))
  clock = _FakeClock()
  progress = metrics_lib.ProgressLogger(
    100, every_n_steps=10, metric_keys=["loss"], tokens_per_step=1024, clock=clock
  )

  clock.now = 30.0  # step 1 includes compilation
  first = progress.log(1, {"loss": jnp.float32(2.5), "hidden": 1.0})
  assert first == (
    "step 1/100 (1.0%) | loss=2.5 | first 1 step(s) took 30.0s (compile included) | elapsed 0:00:30"
  )
  for step in range(2, 10):
    clock.now = 30.0 + 0.5 * (step - 1)
    assert progress.log(step, {"loss": 2.0}) is None
  clock.now = 30.0 + 0.5 * 9
  line = progress.log(10, {"loss": 1.23456})
  # 9 steps in 4.5 s: 2 steps/s; 90 steps left: 45 s. Counting step 1 would give ~0.29/s.
  assert line == (
    "step 10/100 (10.0%) | loss=1.235 | 2.00 steps/s, 2,048 tokens/s | elapsed 0:00:35"
    " | ETA 0:00:45"
  )
  for step in range(11, 21):
    clock.now += 1.0
    line = progress.log(step, {"loss": 1.0})
  # The rate since the last line (1 step/s), not the average since the start.
  assert line.endswith("| 1.00 steps/s, 1,024 tokens/s | elapsed 0:00:45 | ETA 0:01:20")
  assert printed == [first, printed[1], line]
  assert printed[1].startswith("step 10/100")

  clock.now += 7.0  # 80 steps in 7 s; the last step always prints
  assert progress.log(100).endswith(
    "| 11.43 steps/s, 11,703 tokens/s | elapsed 0:00:52 | ETA 0:00:00"
  )


def test_progress_every_seconds_and_resume_start_step():
  clock = _FakeClock()
  progress = metrics_lib.ProgressLogger(1000, every_seconds=60, start_step=500, clock=clock)
  clock.now = 5.0
  assert "first 1 step(s) took 5.0s" in progress.log(501)
  clock.now = 64.0
  assert progress.log(502) is None
  clock.now = 65.0
  # 99 steps in 60 s since the last line.
  line = progress.log(600)
  assert "1.65 steps/s" in line
  assert line.endswith(f"ETA {metrics_lib.format_duration(400 * 60 / 99)}")
  assert line.startswith("step 600/1000 (60.0%) | ")
  with pytest.raises(ValueError, match="every_n_steps or every_seconds"):
    metrics_lib.ProgressLogger(10)


def test_step_timer_skips_first_call():
  clock = _FakeClock()
  timer = metrics_lib.StepTimer(clock)
  clock.now = 100.0
  assert timer.lap(1) is None
  clock.now = 106.0
  assert timer.lap(4) == 2.0
  clock.now = 107.0
  assert timer.lap(4) is None


# --- FLOPs and MFU --------------------------------------------------------------------------


def test_mfu_arithmetic():
  assert metrics_lib.mfu(1e15, 2.0, 4, 250e12) == 0.5
  assert metrics_lib.mfu(6 * 1e9 * 65536, 0.5, 8, 989e12) == pytest.approx(
    6 * 1e9 * 65536 / 0.5 / (8 * 989e12)
  )
  assert math.isnan(metrics_lib.mfu(1e15, 1.0, 1, math.nan))
  with pytest.raises(ValueError):
    metrics_lib.mfu(1e15, 0.0, 4, 250e12)


@pytest.mark.parametrize(
  "device_kind, expected",
  [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 NVL", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
  ],
)
def test_peak_flops_lookup_by_substring(device_kind, expected):
  device = types.SimpleNamespace(device_kind=device_kind, platform="gpu")
  flops, note = metrics_lib.peak_flops_per_device(device)
  assert flops == expected
  assert "bf16 peak" in note


def test_peak_flops_float32_and_unknown_device():
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
  assert metrics_lib.peak_flops_per_device(h100, np.float32)[0] == 67e12
  assert metrics_lib.peak_flops_per_device(h100, jnp.bfloat16)[0] == 989e12
  tpu = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
  flops, note = metrics_lib.peak_flops_per_device(tpu, "float32")
  assert (flops, "no fp32 figure" in note) == (275e12, True)
  with pytest.raises(ValueError, match="dtype"):
    metrics_lib.peak_flops_per_device(h100, "int8")
  for kind in ["NVIDIA RTX A1000", "Some Future Accelerator"]:
    unknown = types.SimpleNamespace(device_kind=kind, platform="gpu")
    flops, note = metrics_lib.peak_flops_per_device(unknown)
    assert math.isnan(flops)
    assert "unknown device kind" in note


def test_peak_flops_cpu_is_nominal_and_shared_by_cpu_devices():
  flops, note = metrics_lib.peak_flops_per_device()  # tests run on CPU devices
  num_cpu_devices = len(jax.local_devices(backend="cpu"))
  assert flops == os.cpu_count() * 2.5e9 * 32 / num_cpu_devices
  assert note.startswith("nominal CPU")


def test_a_damaged_metrics_line_is_an_error_naming_file_and_line(tmp_path):
  # It used to surface as a bare JSONDecodeError from the resume's truncation.
  path = tmp_path / metrics_lib.METRICS_FILENAME
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(metrics_lib.errors.DataError, match=rf"{path}:2: not a metrics line"):
    metrics_lib.MetricWriter(tmp_path, resume_step=1, tensorboard=False)
  with pytest.raises(metrics_lib.errors.DataError, match=rf"{path}:2: not a metrics line"):
    metrics_lib.read_metrics(tmp_path)
  assert path.read_text().count("\n") == 3  # nothing was rewritten or lost


def test_an_exporter_gets_every_line_and_is_closed_with_the_writer(tmp_path):
  class Exporter:
    def __init__(self):
      self.lines, self.closed = [], 0

    def write(self, step, line):
      self.lines.append((step, dict(line)))

    def close(self):
      self.closed += 1

  exporter = Exporter()
  writer = metrics_lib.MetricWriter(tmp_path, exporter=exporter, tensorboard=False)
  writer.write(1, {"loss": np.float32(0.5)})
  writer.write(2, {"eval/gold_reward": 1.25})
  writer.close()
  writer.close()
  assert exporter.lines == [(1, {"loss": 0.5}), (2, {"eval/gold_reward": 1.25})]
  assert exporter.closed == 1
  # Not the primary process: nothing is exported.
  other = Exporter()
  metrics_lib.MetricWriter(tmp_path, exporter=other, is_primary=False).write(3, {"loss": 1.0})
  assert other.lines == []
