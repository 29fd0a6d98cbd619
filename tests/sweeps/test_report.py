"""A sweep's report from synthetic cell records: rows, Markdown, JSON and plots."""

from __future__ import annotations

import json
import math
import os

import pytest

from rlhf_jax.sweeps import report


def _cell(coef, seed, gold, status="done", **extra):
  setting = {"kl.init_coef": coef, **extra}
  name = "+".join(f"{k}={v}" for k, v in {**setting, "seed": seed}.items())
  metrics = (
    {
      "gold_reward": gold,
      "proxy_reward": gold + 1.0,
      "kl_to_ref": (2.0 - 10 * coef) ** 2,
      "sqrt_kl": 2.0 - 10 * coef,
      "wall_time_s": 30.0 + seed,
    }
    if status == "done"
    else {}
  )
  cell = {
    "name": name,
    "overrides": {**setting, "seed": seed},
    "setting": setting,
    "seeds": {"seed": seed},
    "workdir": f"/tmp/cells/{name}",
    "status": status,
    "metrics": metrics,
    "curve": [],
  }
  if status == "failed":
    cell["error"] = "Traceback (most recent call last):\n  ...\nFloatingPointError: NaN loss"
  return cell


# A large seed effect shared by both settings; coef 0.01 is better by ~0.2 on every seed.
SEED_EFFECT = {1: 0.0, 2: 1.5, 3: -1.0}
CELLS = [
  *(_cell(0.1, s, 1.0 + e) for s, e in SEED_EFFECT.items()),
  *(_cell(0.01, s, 1.2 + e + 0.01 * s) for s, e in SEED_EFFECT.items()),
  _cell(0.01, 4, None, status="failed"),
]


def test_labels_and_seed_keys():
  assert report.setting_label({"a.b": 1, "c": "x"}) == "a.b=1 c=x"
  assert report.setting_label({}) == "base"
  assert report.seed_key({"seed": 2, "reward.seed": 1}) == (("reward.seed", 1), ("seed", 2))
  assert report.is_seed_key("reward.seed") and not report.is_seed_key("seeds")
  assert report.seed_key({"seed": [1, 2]}) == (("seed", (1, 2)),)  # JSON lists: hashable


def test_aggregate_rows():
  rows = report.aggregate(CELLS)
  assert [r["label"] for r in rows] == ["kl.init_coef=0.1", "kl.init_coef=0.01"]
  first, second = rows
  assert (first["n_cells"], first["n_done"], first["n_failed"]) == (3, 3, 0)
  assert (second["n_cells"], second["n_done"], second["n_failed"]) == (4, 3, 1)
  assert second["seeds"] == [{"seed": 1}, {"seed": 2}, {"seed": 3}]
  assert second["failed"][0]["name"] == "kl.init_coef=0.01+seed=4"
  assert list(first["metrics"]) == [
    "gold_reward",
    "proxy_reward",
    "kl_to_ref",
    "sqrt_kl",
    "wall_time_s",
  ]
  gold = first["metrics"]["gold_reward"]
  assert gold["n"] == 3 and gold["mean"] == pytest.approx(1.0 + 0.5 / 3)
  only = report.aggregate(CELLS, metrics=["sqrt_kl"])
  assert list(only[0]["metrics"]) == ["sqrt_kl"]
  # A NaN written as JSON null keeps its metric, counted in n_nan; a metric some cells
  # lack is left out.
  cells = [dict(c, metrics=dict(c["metrics"])) for c in CELLS]
  cells[0]["metrics"]["gold_reward"] = None
  cells[1]["metrics"]["extra"] = 1.0
  rows = report.aggregate(cells)
  assert "extra" not in rows[0]["metrics"]
  gold = rows[0]["metrics"]["gold_reward"]
  assert (gold["n"], gold["n_nan"]) == (2, 1)


def test_comparisons_are_paired_by_seed():
  (comp,) = report.comparisons(CELLS, "gold_reward")
  assert (comp["a"], comp["b"]) == ("kl.init_coef=0.1", "kl.init_coef=0.01")
  assert comp["paired"] and comp["n"] == 3 and comp["resolved"]
  assert comp["mean"] == pytest.approx(-0.22)
  with pytest.raises(ValueError):
    report.comparisons(CELLS, "gold_reward", baseline="nope")


def test_markdown_marks_resolved_and_lists_failures():
  rows = report.aggregate(CELLS)
  comps = report.comparisons(CELLS, "gold_reward")
  text = report.markdown(rows, comps, ["gold_reward", "sqrt_kl"], "gold_reward", title="KL")
  assert text.startswith("# KL\n")
  assert "| `kl.init_coef=0.1` | 3 | 1.2" in text
  assert "3 (+1 failed)" in text
  assert "| yes | paired, 3 seeds |" in text
  assert "Student-t" in text and "Holm" in text and "excludes 0" in text
  assert "`kl.init_coef=0.01+seed=4`: FloatingPointError: NaN loss" in text
  # One seed per setting: "(n=1)" and no test.
  one = [CELLS[0], CELLS[3]]
  text = report.markdown(
    report.aggregate(one), report.comparisons(one, "gold_reward"), ["gold_reward"], "gold_reward"
  )
  assert "1 (n=1)" in text and "too few seeds" in text


def test_markdown_flags_a_difference_lost_to_holm():
  comps = [
    {"a": "x", "b": "y", "paired": True, "n": 3, "mean": 1.0, "low": 0.1, "high": 1.9,
     "p_value": 0.03, "p_holm": 0.09, "resolved": True, "resolved_holm": False, "reason": None},
  ]  # fmt: skip
  text = report.markdown([], comps, [], "m")
  assert text == "# Sweep\n\nNo cells.\n"
  rows = report.aggregate(CELLS)
  assert "yes (not after Holm)" in report.markdown(rows, comps, [], "m")


def test_write_report_json_and_plots(tmp_path):
  cells = [
    *CELLS,
    *(_cell(0.001, s, 1.1 + e) for s, e in SEED_EFFECT.items()),
    _cell(0.5, 1, None, status="failed"),  # a setting with no done cell
  ]
  out = report.write(str(tmp_path), cells, title="KL sweep")
  assert out["metric"] == "gold_reward"
  with open(tmp_path / "sweep_report.json") as f:
    saved = json.load(f)
  assert saved == out
  assert len(saved["rows"]) == 4 and len(saved["comparisons"]) == 6
  assert len(saved["cells"]) == len(cells)
  assert saved["cells"][6]["status"] == "failed"
  # The failed-only setting: its statistics are null in the JSON, not NaN.
  assert saved["rows"][-1]["metrics"]["gold_reward"]["mean"] is None
  assert saved["comparisons"][-1]["p_value"] is None
  plots = sorted(os.path.basename(p) for p in out["plots"])
  assert plots == ["gold_reward_vs_kl_init_coef.png", "reward_vs_kl.png"]
  for p in out["plots"]:
    assert os.path.getsize(p) > 5_000
  md = (tmp_path / "sweep_report.md").read_text()
  assert md.startswith("# KL sweep") and "](reward_vs_kl.png)" in md


def test_knob_plots_need_numeric_values(tmp_path):
  rows = report.aggregate(
    [_cell(0.1, s, 1.0, optim="adam") for s in (1, 2)]
    + [_cell(0.1, s, 1.1, optim="sgd") for s in (1, 2)]
  )
  path = str(tmp_path / "k.png")
  assert not report.plot_metric_vs_knob(rows, "gold_reward", "optim", path)
  assert not report.plot_metric_vs_knob(rows, "gold_reward", "kl.init_coef", path)  # one value
  assert not os.path.exists(path)
  out = report.write(str(tmp_path / "w"), [_cell(0.1, 1, 1.0, optim=o) for o in ("a", "b")])
  assert [os.path.basename(p) for p in out["plots"]] == ["reward_vs_kl.png"]
  # No sqrt_kl: no reward-vs-KL plot.
  for row in rows:
    del row["metrics"]["sqrt_kl"]
  assert not report.plot_reward_vs_kl(rows, path)


def test_log_axis_and_lines_per_other_key(tmp_path):
  cells = [
    _cell(coef, s, 1.0 + coef, optim=o)
    for coef in (0.001, 0.01, 0.1)
    for o in ("adam", "sgd")
    for s in (1, 2)
  ]
  path = str(tmp_path / "k.png")
  rows = report.aggregate(cells)
  assert report.plot_metric_vs_knob(rows, "gold_reward", "kl.init_coef", path)
  assert os.path.getsize(path) > 5_000
  assert math.isclose(rows[0]["metrics"]["gold_reward"]["mean"], 1.001)


def test_overoptimization_fit_pools_the_seeds_and_is_written(tmp_path):
  from rlhf_jax.sweeps import stats

  cells = []
  for seed, base in ((0, 0.5), (1, -0.2), (2, 0.1)):
    cell = _cell(0.001, seed, 1.0)
    ds = [0.0, 0.5, 1.0, 2.0, 3.0]
    cell["curve"] = [
      {"step": 10.0 * i, "sqrt_kl": d, "gold_reward": base + stats.gao_curve(d, 1.2, 0.5)}
      for i, d in enumerate(ds)
    ]
    cells.append(cell)
  (fit,) = report.gao_fits(cells)
  assert fit["n"] == 12 and fit["n_cells"] == 3  # each seed's gain is over its own step 0
  assert fit["alpha"] == pytest.approx(1.2) and fit["r2"] == pytest.approx(1.0)
  written = report.write(str(tmp_path), cells)
  assert str(tmp_path / "overoptimization.png") in written["plots"]
  text = (tmp_path / "sweep_report.md").read_text()
  assert "## Over-optimisation" in text and "| `kl.init_coef=0.001` | 3 | 12 |" in text
  assert written["overoptimization"][0]["beta"] == pytest.approx(0.5)
