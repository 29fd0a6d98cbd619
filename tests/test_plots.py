"""Reward-vs-sqrt(KL) plots from eval lines."""

import os

from rlhf_jax import plots

ROWS = [
  {"step": 0, "eval/sqrt_kl": 0.0, "eval/gold_reward": 0.1, "eval/proxy_reward": 0.0},
  {"step": 5, "loss": 1.0},  # a train line: ignored
  {"step": 20, "eval/sqrt_kl": 2.0, "eval/gold_reward": 0.4, "eval/proxy_reward": 2.5},
  {"step": 10, "eval/sqrt_kl": 1.0, "eval/gold_reward": 0.6, "eval/proxy_reward": 1.5},
]


def test_curve_keeps_eval_lines_in_step_order():
  c = plots.curve(ROWS)
  assert c == {"sqrt_kl": [0.0, 1.0, 2.0], "gold": [0.1, 0.6, 0.4], "proxy": [0.0, 1.5, 2.5]}
  # KL falling between evals stays in the path.
  back = [dict(ROWS[0]), dict(ROWS[2], step=10), dict(ROWS[3], step=20)]
  assert plots.curve(back)["sqrt_kl"] == [0.0, 2.0, 1.0]
  assert plots.curve([{"step": 1, "loss": 0.3}]) == {"sqrt_kl": [], "gold": [], "proxy": []}


def test_reward_vs_kl_writes_a_png(tmp_path):
  path = str(tmp_path / "sub" / "plot.png")
  fig = plots.reward_vs_kl(
    {"ppo": ROWS, "empty": []}, path, title="t", styles={"ppo": {"color": "red", "ls": "--"}}
  )
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 10_000
  gold_ax = fig.axes[0]
  assert len(gold_ax.lines) == 1  # the empty run draws nothing
  assert list(gold_ax.lines[0].get_ydata()) == [0.1, 0.6, 0.4]
  assert gold_ax.lines[0].get_color() == fig.axes[1].lines[0].get_color() == "red"
