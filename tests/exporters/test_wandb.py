"""The W&B exporter in offline mode: the run's records, read back from its .wandb file."""

import glob
import json
import os
import struct
import time

import pytest

from rlhf_jax import exporters
from tests.exporters import shared

wandb = pytest.importorskip(
  "wandb", reason="wandb is an optional extra (pip install 'rlhf_jax[wandb]')"
)


def records(path: str):
  """The protobuf records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks with
  a 7-byte header: crc32c, length, type) after W&B's 7-byte file header."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:7]
  position, pending = 7, b""
  while position + 7 <= len(data):
    left = 32768 - position % 32768
    if left < 7:  # a block's tail too short for a header is padding
      position += left
      continue
    _, length, kind = struct.unpack("<IHB", data[position : position + 7])
    if position + 7 + length > len(data):  # a chunk still being written
      break
    chunk = data[position + 7 : position + 7 + length]
    position += 7 + length
    if kind == 0:
      break
    pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record


def finished_records(path: str, timeout: float = 60.0) -> list:
  """The records of a finished run's .wandb file, once its `exit` record is there.

  `run.finish()` can return before W&B's service process has flushed the file's tail, so
  reading it at once may miss the last records (seen as a flaky missing history row)."""
  deadline = time.monotonic() + timeout
  while True:
    found = list(records(path))
    if any(r.WhichOneof("record_type") == "exit" for r in found):
      return found
    if time.monotonic() > deadline:
      raise AssertionError(f"{path} has no exit record after {timeout:.0f} s")
    time.sleep(0.1)


def history(found: list) -> dict[int, dict]:
  """step -> the logged values (JSON-decoded) of each history row among the records."""
  rows: dict[int, dict] = {}
  for record in found:
    if record.WhichOneof("record_type") == "history":
      row = rows.setdefault(record.history.step.num, {})
      for item in record.history.item:
        row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
  return rows


def test_an_offline_run_holds_metrics_samples_alerts_and_plot(tmp_path, monkeypatch):
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  workdir = tmp_path / "my_run"
  os.makedirs(workdir / "samples")
  samples = [
    {"step": 10, "prompt": f"p{i}", "response": f"r{i}", "gold_reward": i} for i in range(3)
  ]
  with open(workdir / "samples" / "step_0000010.jsonl", "w") as f:
    f.writelines(json.dumps(s) + "\n" for s in samples)
  run_config = {"trainer": "ppo", "optim": {"lr": 1e-5}}
  section = {"wandb": {"project": "rlhf-test", "mode": "offline"}}
  with exporters.make(
    section, workdir=str(workdir), stage="ppo", run_config=run_config, primary=True
  ) as exporter:
    assert exporter.names == ["wandb"]
    run_id = exporter.exporters[0].run.id
    exporter.write(0, shared.line(0))
    exporter.write(5, {"loss": 0.5})
    exporter.alerts(shared.alerts(10))  # the watch writes them before the eval line
    exporter.write(10, shared.line(10))
    # Online, each alert is also a W&B alert (e-mail/Slack); offline, none is sent.
    sent = []
    wb = exporter.exporters[0]
    monkeypatch.setattr(wb.run, "alert", lambda **kw: sent.append(kw))
    exporter.alerts(shared.alerts(10)[:1])
    assert sent == []
    monkeypatch.setattr(wb, "mode", "online")
    exporter.alerts(shared.alerts(10)[1:])
    assert sent == [
      dict(
        title="entropy_collapse (critical) in my_run/ppo",
        text=shared.alerts(10)[1].message,
        level=wandb.AlertLevel.ERROR,
      )
    ]
  assert open(workdir / "wandb" / "rlhf_jax_run_id").read().strip() == run_id
  (path,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
  found = finished_records(path)
  rows = history(found)
  assert rows[5]["loss"] == 0.5
  assert rows[10]["eval/gold_reward"] == shared.line(10)["eval/gold_reward"]
  assert rows[10]["monitor/proxy_gold_gap"] == shared.line(10)["monitor/proxy_gold_gap"]
  assert rows[10]["eval/samples/_type"] == "table-file" and rows[10]["eval/samples/nrows"] == 3
  assert "eval/samples/_type" not in rows[0]  # no samples file at step 0
  assert rows[10]["alerts/fired"] == 1 and rows[10]["alerts/table/nrows"] == 4  # the last
  # The reward-vs-KL plot, drawn from the two eval lines, at the last step.
  assert rows[10]["reward_vs_kl/_type"] == "image-file"
  (run,) = [r.run for r in found if r.WhichOneof("record_type") == "run"]
  config = {item.key: json.loads(item.value_json) for item in run.config.update}
  assert config["optim"] == {"lr": 1e-5} and run.display_name == "my_run"
  assert run.job_type == "ppo" and run.project == "rlhf-test"
  summary = {
    item.key: json.loads(item.value_json)
    for r in found
    if r.WhichOneof("record_type") == "summary"
    for item in r.summary.update
  }
  assert summary["alerts"] == 4
  # A resumed stage (the same workdir) logs to the same W&B run.
  with exporters.make(section, workdir=str(workdir), stage="ppo", primary=True) as exporter:
    assert exporter.exporters[0].run.id == run_id
