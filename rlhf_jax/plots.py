"""Plots of a run's eval lines: gold and proxy reward against sqrt(KL to the reference).

Gao et al. (2022) plot reward against d = sqrt(KL): the proxy (reward-model)
score keeps rising with d while the gold reward rises, peaks and falls, the
signature of over-optimisation. Every method here logs `eval/gold_reward`,
`eval/proxy_reward` and `eval/sqrt_kl` on its eval lines, so one function
draws any of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure


def curve(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
  """(sqrt_kl, gold, proxy) lists in step order, from the eval lines of a metrics.jsonl.

  Step order, not KL order: a run's KL need not grow monotonically, and the
  path it takes is part of the picture.
  """
  points = sorted(
    (r["step"], r["eval/sqrt_kl"], r["eval/gold_reward"], r["eval/proxy_reward"])
    for r in rows
    if "eval/gold_reward" in r
  )
  return {
    "sqrt_kl": [p[1] for p in points],
    "gold": [p[2] for p in points],
    "proxy": [p[3] for p in points],
  }


def reward_vs_kl(
  curves: Mapping[str, Sequence[Mapping[str, Any]]],
  path: str | None = None,
  title: str = "",
  styles: Mapping[str, Mapping[str, Any]] | None = None,
):
  """Gold (left) and proxy (right) reward against sqrt(KL), one line per labelled run.

  Args:
    curves: label -> eval lines (dicts with eval/sqrt_kl, eval/gold_reward,
      eval/proxy_reward), e.g. `metrics.read_metrics(workdir)` of each run.
    path: where to save a PNG (directories created); None to only return the figure.
    title: the figure's title.
    styles: label -> matplotlib line keyword arguments (color, linestyle, ...).
  Returns:
    The matplotlib Figure.
  """
  # pyplot-free: no global figure state and no GUI backend; a notebook displays the
  # returned Figure, a script saves it.
  fig = Figure(figsize=(12, 4.8))
  ax_gold, ax_proxy = fig.subplots(1, 2, sharex=True)
  for label, rows in curves.items():
    c = curve(rows)
    if not c["sqrt_kl"]:
      continue
    style = {"marker": "o", "ms": 3, **(styles or {}).get(label, {})}
    (line,) = ax_gold.plot(c["sqrt_kl"], c["gold"], label=label, **style)
    style["color"] = line.get_color()
    ax_proxy.plot(c["sqrt_kl"], c["proxy"], label=label, **style)
  ax_gold.set(xlabel="sqrt(KL to SFT) [sqrt nats]", ylabel="gold reward", title="gold (the truth)")
  ax_proxy.set(xlabel="sqrt(KL to SFT) [sqrt nats]", ylabel="proxy reward (RM, normalised)")
  ax_proxy.set_title("proxy (what is optimised)")
  for ax in (ax_gold, ax_proxy):
    ax.grid(alpha=0.3)
  ax_proxy.legend(fontsize=8, loc="best")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
  return fig
