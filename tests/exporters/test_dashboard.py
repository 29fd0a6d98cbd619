"""docs/grafana/rlhf_jax.json: importable, and every query names what the exporter exports."""

import json
import os
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rlhf_jax import exporters
from tests.exporters import shared

DASHBOARD = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "docs",
  "grafana",
  "rlhf_jax.json",
)
# The panels the dashboard must have: a metric each (exported names).
REQUIRED = (
  "rlhf_jax_eval_gold_reward", "rlhf_jax_eval_proxy_reward", "rlhf_jax_eval_kl_to_ref",
  "rlhf_jax_monitor_proxy_gold_gap", "rlhf_jax_monitor_reward_length_corr",
  "rlhf_jax_monitor_repeat_ngram_frac", "rlhf_jax_monitor_entropy_ratio",
  "rlhf_jax_monitor_response_jsd", "rlhf_jax_alerts_total", "rlhf_jax_steps_per_s",
)  # fmt: skip


def exported(tmp_path) -> tuple[set[str], set[str]]:
  """(sample names, label names) the exporter serves for a representative line and alerts."""
  with exporters.make(
    {"prometheus": {"enabled": True}}, workdir=str(tmp_path / "run"), stage="ppo", primary=True
  ) as exporter:
    exporter.write(10, shared.line(10))
    exporter.alerts(shared.alerts(10))
    with urllib.request.urlopen(exporter.exporters[0].url, timeout=10) as response:
      text = response.read().decode("utf-8")
  samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
  return {s.name for s in samples}, {label for s in samples for label in s.labels}


def panels(dashboard):
  for panel in dashboard["panels"]:
    yield panel
    yield from panel.get("panels", [])  # a collapsed row's


def test_the_dashboard_is_importable_and_queries_exported_metrics(tmp_path):
  with open(DASHBOARD, encoding="utf-8") as f:
    dashboard = json.load(f)
  assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
  variables = {v["name"]: v for v in dashboard["templating"]["list"]}
  assert variables["datasource"]["type"] == "datasource"
  assert variables["datasource"]["query"] == "prometheus"
  ids = [p["id"] for p in panels(dashboard)]
  assert len(ids) == len(set(ids))
  names, labels = exported(tmp_path)
  queried = set()
  for panel in panels(dashboard):
    if panel["type"] == "row":
      continue
    assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    assert panel["targets"], panel["title"]
    for target in panel["targets"]:
      expr = target["expr"]
      metrics = set(re.findall(r"\brlhf_jax_\w+", expr))
      assert metrics, expr
      assert metrics <= names, f"{panel['title']}: {metrics - names} not exported"
      queried |= metrics
      # Labels in selectors ({run=~...}) and groupings (by (rule)) are exported labels.
      used = set(re.findall(r"(\w+)\s*=~?", expr))
      used |= {w.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for w in g.split(",")}
      assert used <= labels, f"{panel['title']}: labels {used - labels} not exported"
  for variable in ("run", "stage"):
    query = variables[variable]["query"]["query"]
    assert set(re.findall(r"\brlhf_jax_\w+", query)) <= names
  assert set(REQUIRED) <= queried, set(REQUIRED) - queried
