"""The Prometheus exporter: served in-process on a free port, scraped with urllib."""

import math
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rlhf_jax import exporters
from rlhf_jax.exporters import prometheus_exporter
from rlhf_jax.monitor import monitor_section
from tests.exporters import shared


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
  """(sample name, labels) -> value of a /metrics page."""
  with urllib.request.urlopen(url, timeout=10) as response:
    assert response.status == 200
    text = response.read().decode("utf-8")
  return {
    (sample.name, frozenset(sample.labels.items())): sample.value
    for family in text_string_to_metric_families(text)
    for sample in family.samples
  }


def start(tmp_path, **fields):
  run_config = {"trainer": "ppo", "monitor": monitor_section().to_dict()}
  exporter = exporters.make(
    {"prometheus": {"enabled": True, **fields}},
    workdir=str(tmp_path / "my_run"),
    stage="ppo",
    run_config=run_config,
    primary=True,
  )
  assert exporter.names == ["prometheus"]
  return exporter, exporter.exporters[0]


def test_serves_the_latest_metrics_and_alert_counts(tmp_path):
  exporter, prom = start(tmp_path)
  try:
    assert prom.port > 0 and prom.url == f"http://127.0.0.1:{prom.port}/metrics"
    exporter.write(5, {"loss": 1.0, "eval/gold_reward": 0.25})
    exporter.write(10, {"loss": 0.5, "steps_per_s": 3.0, "note": "text", "done": True})
    exporter.write(12, {"loss": math.nan})
    exporter.alerts(shared.alerts(10))
    exporter.alerts(shared.alerts(12)[:1])
    got = scrape(prom.url)
  finally:
    exporter.close()
  run = {("run", "my_run"), ("stage", "ppo")}
  value = lambda name, **labels: got[(name, frozenset(run | set(labels.items())))]
  assert value("rlhf_jax_step") == 12
  assert math.isnan(value("rlhf_jax_loss"))  # the latest line's value, NaN included
  assert value("rlhf_jax_eval_gold_reward") == 0.25  # an eval metric stays between evals
  assert value("rlhf_jax_steps_per_s") == 3.0
  assert value("rlhf_jax_done") == 1.0
  assert not any(name == "rlhf_jax_note" for name, _ in got)  # not a number: left out
  assert value("rlhf_jax_alerts_total", rule="response_drift", severity="warning") == 2
  assert value("rlhf_jax_alerts_total", rule="entropy_collapse", severity="critical") == 1
  # The run's other rules are exported at 0 from the start, so increase() sees a first alert.
  assert value("rlhf_jax_alerts_total", rule="kl_spike", severity="warning") == 0
  assert value("rlhf_jax_write_timestamp_seconds") > 1e9


def test_close_frees_the_port(tmp_path):
  exporter, prom = start(tmp_path)
  port = prom.port
  exporter.write(1, {"loss": 1.0})
  assert scrape(prom.url)
  exporter.close()
  exporter.close()  # twice is fine
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
  again, prom = start(tmp_path, port=port)  # the same port serves again
  with again:
    assert prom.port == port
    assert ("rlhf_jax_step", frozenset()) not in scrape(prom.url)


def test_a_busy_port_is_a_config_error(tmp_path):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(exporters.registry.cs.ConfigError, match=rf"prometheus\.port={port}: "):
      start(tmp_path, port=port)


def test_metric_names_are_sanitised_and_clashes_skipped(tmp_path):
  assert prometheus_exporter.metric_name("eval/gold_reward") == "rlhf_jax_eval_gold_reward"
  assert prometheus_exporter.metric_name("a.b-c/d e") == "rlhf_jax_a_b_c_d_e"
  exporter, prom = start(tmp_path)
  with exporter:
    exporter.write(1, {"a/b": 1.0, "a_b": 2.0, "alerts_total": 3.0})
    got = scrape(prom.url)
  assert got[("rlhf_jax_a_b", frozenset({("run", "my_run"), ("stage", "ppo")}))] == 1.0
  # The first key keeps the name; "alerts_total" is the alert counter's (at 0 here).
  assert 2.0 not in got.values() and 3.0 not in got.values()
