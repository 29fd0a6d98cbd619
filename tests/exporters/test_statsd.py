"""The DogStatsD exporter: its datagrams, received by a UDP socket on localhost."""

import math
import socket

import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import exporters
from rlhf_jax.exporters import statsd_exporter
from tests.exporters import shared


@pytest.fixture
def agent():
  """A UDP socket standing in for the agent: (port, receive) where receive() returns the
  lines of the datagrams that arrived (waiting up to 5 s for the first)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def receive() -> list[str]:
      lines = sock.recv(65536).decode("utf-8").split("\n")
      sock.settimeout(0.2)
      try:
        while True:
          lines += sock.recv(65536).decode("utf-8").split("\n")
      except TimeoutError:
        pass
      finally:
        sock.settimeout(5)
      return lines

    yield sock.getsockname()[1], receive


def test_gauges_alerts_and_events_arrive(tmp_path, agent):
  port, receive = agent
  section = {"statsd": {"enabled": True, "port": port}}
  with exporters.make(section, workdir=str(tmp_path / "my run"), stage="ppo", primary=True) as e:
    assert e.names == ["statsd"]
    e.write(10, {**shared.line(10), "loss": math.nan, "note": "text"})
    lines = receive()
    tags = "|#run:my_run,stage:ppo"
    assert "rlhf_jax.step:10|g" + tags in lines
    assert "rlhf_jax.eval.gold_reward:10.05|g" + tags in lines
    assert (
      "rlhf_jax.monitor.entropy_ratio:" + f"{shared.line(10)['monitor/entropy_ratio']:.10g}"
      in {line.split("|")[0] for line in lines}
    )
    assert not any(line.startswith(("rlhf_jax.loss:", "rlhf_jax.note:")) for line in lines)
    assert len(lines) == len(shared.line(10)) + 1  # every finite metric, and the step
    e.alerts(shared.alerts(10))
    lines = receive()
  alert_tags = tags + ",rule:entropy_collapse,severity:critical"
  assert "rlhf_jax.alerts:1|c" + alert_tags in lines
  title = "rlhf_jax alert entropy_collapse (critical)"
  text = shared.alerts(10)[1].message
  assert f"_e{{{len(title)},{len(text)}}}:{title}|{text}|t:error{alert_tags}" in lines


def test_datagrams_stay_under_the_limit():
  lines = [f"rlhf_jax.metric_{i}:{i}|g|#run:r,stage:s" for i in range(200)]
  packed = statsd_exporter.datagrams(lines)
  assert len(packed) > 1 and all(len(d) <= statsd_exporter.MAX_DATAGRAM for d in packed)
  assert b"\n".join(packed).decode().split("\n") == lines
  assert statsd_exporter.datagrams(["x" * 2000]) == [b"x" * 2000]  # alone, not dropped
  assert statsd_exporter.metric_name("eval/gold_reward") == "rlhf_jax.eval.gold_reward"
  assert statsd_exporter.tag("a,b|c#d e") == "a_b_c_d_e"


def test_an_unknown_host_is_a_config_error(tmp_path):
  section = {"statsd": {"enabled": True, "host": "no-such-host.invalid"}}
  with pytest.raises(cs.ConfigError, match=r"config\.exporters\.statsd\.host='no-such-host"):
    exporters.make(section, workdir=str(tmp_path), stage="ppo", primary=True)


def test_a_name_taken_by_another_key_is_not_sent(tmp_path, agent):
  port, receive = agent
  section = {"statsd": {"enabled": True, "port": port}}
  with exporters.make(section, workdir=str(tmp_path / "r"), stage="ppo", primary=True) as e:
    e.write(1, {"a/b": 1.0, "a.b": 2.0, "step": 3.0})
    first = receive()
    e.write(2, {"a.b": 4.0, "a/b": 5.0})  # "a/b" keeps its name across lines
    second = receive()
  sent = [line.split("|")[0] for line in first + second]
  assert sent == ["rlhf_jax.step:1", "rlhf_jax.a.b:1", "rlhf_jax.step:2", "rlhf_jax.a.b:5"]
