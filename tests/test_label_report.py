"""Tests for experiments/label_report.py, run as a subprocess like a user would."""

import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import preferences, testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", "experiments.label_report", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _testbed_config():
  # The default panel's one careless rater answers at random half the time and the 10
  # anchors are few, so the careless rater is not reliably the least agreeing one. A fully
  # careless rater and 40 anchors make "the statistic finds the bad rater" a fair test.
  config = testbed.default_config()
  config.panel.careless_eps = 1.0
  config.panel.num_anchor_pairs = 40
  return config


@pytest.fixture(scope="module")
def testbed_data(tmp_path_factory):
  config = _testbed_config()
  records = testbed.preference_pairs(300, seed=0, config=config)
  path = tmp_path_factory.mktemp("report") / "testbed_prefs.jsonl"
  preferences.write_preference_jsonl(records, path)
  careless = [str(r.rater_id) for r in testbed.RaterPanel(config).raters if r.eps > 0]
  return path, records, careless


def _finite(value):
  return value is not None and math.isfinite(value)


def test_report_on_testbed_jsonl(testbed_data):
  path, records, careless = testbed_data
  result = _run(f"--data={path}")
  assert result.returncode == 0, result.stderr
  out_path = path.parent / "testbed_prefs.label_report.json"
  assert out_path.exists()
  for heading in ("Krippendorff's alpha", "Fleiss' kappa", "Cohen's kappa", "noise ceiling"):
    assert heading in result.stdout
  assert f"Wrote {out_path}" in result.stdout

  report = json.loads(out_path.read_text())
  assert set(report) >= {"counts", "panel", "per_rater", "cohen_kappa", "noise_ceiling"}
  assert report["counts"]["records"] == len(records) == 300 + 12 * 40
  assert report["counts"]["anchor_items"] == 40
  assert report["counts"]["anchor_source"] == "flagged"
  raters = [str(i) for i in range(12)]
  assert list(report["per_rater"]) == raters == report["cohen_kappa"]["raters"]
  assert sum(s["num_labels"] for s in report["per_rater"].values()) == len(records)

  # The careless rater agrees least with the rest of the panel, on every measure.
  assert len(careless) == 1
  for measure in ("majority_agreement", "anchor_agreement", "anchor_majority_agreement"):
    by_rater = {r: s[measure] for r, s in report["per_rater"].items()}
    assert all(_finite(v) and 0 <= v <= 1 for v in by_rater.values()), measure
    assert min(by_rater, key=by_rater.get) == careless[0], measure
  # Its kappas with everyone else are lower than the panel's average pair.
  matrix = report["cohen_kappa"]["matrix"]
  k = raters.index(careless[0])
  careless_mean = sum(v for j, v in enumerate(matrix[k]) if j != k) / 11
  assert careless_mean < report["panel"]["mean_cohen_kappa"] - 0.1
  assert all(matrix[i][j] == matrix[j][i] for i in range(12) for j in range(12))
  assert all(matrix[i][i] is None for i in range(12))

  # Tie-declaring raters, and only those, report ties.
  tie_raters = {
    str(r.rater_id) for r in testbed.RaterPanel(_testbed_config()).raters if r.tie_threshold > 0
  }
  assert {r for r, s in report["per_rater"].items() if s["tie_rate"] > 0} == tie_raters

  panel = report["panel"]
  for stat in ("raw_agreement", "fleiss_kappa", "fleiss_kappa_anchors", "krippendorff_alpha"):
    assert _finite(panel[stat]), stat
  assert 0.2 < panel["fleiss_kappa_anchors"] < 0.9 and 0.5 < panel["raw_agreement"] < 1
  assert panel["krippendorff_alpha"] == pytest.approx(panel["fleiss_kappa"], abs=0.02)

  expected_ceiling = testbed.noise_ceiling(records)
  assert report["noise_ceiling"] == pytest.approx(expected_ceiling)
  assert 0.5 < report["noise_ceiling"]["bayes_accuracy"] <= 1


def test_report_on_parquet_without_testbed_fields(testbed_data, tmp_path):
  path, records, careless = testbed_data
  # What a real annotation export looks like: string rater ids, no probabilities or gold.
  keep = ("prompt", "chosen", "rejected", "tie", "confidence", "anchor", "pair_id")
  rows = [{**{f: r[f] for f in keep}, "rater_id": f"rater{r['rater_id']}"} for r in records]
  parquet = tmp_path / "export.parquet"
  pq.write_table(pa.Table.from_pylist(rows), parquet)
  out = tmp_path / "reports" / "export.json"
  result = _run(f"--data={parquet}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report["noise_ceiling"] is None
  assert "noise ceiling" not in result.stdout
  assert all(s["gold_agreement"] is None for s in report["per_rater"].values())
  # The same labels give the same statistics as the JSONL version.
  jsonl_report = json.loads((path.parent / "testbed_prefs.label_report.json").read_text())
  assert report["panel"] == pytest.approx(jsonl_report["panel"])
  majority = {r: s["majority_agreement"] for r, s in report["per_rater"].items()}
  assert min(majority, key=majority.get) == f"rater{careless[0]}"


def test_malformed_file_exits_with_the_data_error(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = {"prompt": "p", "chosen": "a", "rejected": "b", "rater_id": 1}
  path.write_text(
    "\n".join(json.dumps(r) for r in [good, good, {**good, "chosen": 5}, good]) + "\n"
  )
  result = _run(f"--data={path}")
  assert result.returncode != 0
  assert f"{path}:3: field 'chosen' must be a non-empty string, got int" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "bad.label_report.json").exists()

  parquet = tmp_path / "bad.parquet"
  pq.write_table(pa.Table.from_pylist([good, {**good, "rejected": "a"}]), parquet)
  result = _run(f"--data={parquet}")
  assert result.returncode != 0
  assert f"{parquet}: row 2: fields 'chosen' and 'rejected' hold the same text" in result.stderr
  assert "Traceback" not in result.stderr

  # --skip_invalid reports what it skipped instead.
  result = _run(f"--data={path}", "--skip_invalid")
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / "bad.label_report.json").read_text())
  assert report["num_skipped"] == 1 and report["counts"]["records"] == 3


def test_file_without_rater_ids_is_refused(tmp_path):
  path = tmp_path / "anonymous.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
  result = _run(f"--data={path}")
  assert result.returncode != 0
  assert "no record has a rater_id" in result.stderr and "Traceback" not in result.stderr
