"""A sweep's report: each setting's metrics over seeds, the comparisons between settings, plots.

The input is the runner's list of cell records, one per training run:

  {"name": "kl.init_coef=0.01+seed=1",
   "overrides": {"kl.init_coef": 0.01, "seed": 1},
   "setting": {"kl.init_coef": 0.01},   # the overrides less the seed keys
   "seeds": {"seed": 1},                # the seed keys' values
   "workdir": "...", "status": "done",  # or "failed", with "error"
   "metrics": {"gold_reward": 1.2, "sqrt_kl": 2.0, ...},
   "curve": [...]}

Cells with the same setting are replicates over seeds; only "done" ones count in the
statistics. `write` puts sweep_report.md (tables with t intervals, paired differences and
Holm's correction, see `markdown`), sweep_report.json and the plots in the sweep's folder.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rlhf_jax import utils
from rlhf_jax.sweeps import stats
from rlhf_jax.sweeps.hyper import is_seed_key

_DPI = 120


def _setting(cell: Mapping[str, Any]) -> dict[str, Any]:
  if "setting" in cell:
    return dict(cell["setting"])
  return {k: v for k, v in cell.get("overrides", {}).items() if not is_seed_key(k)}


def _seeds(cell: Mapping[str, Any]) -> dict[str, Any]:
  if "seeds" in cell:
    return dict(cell["seeds"])
  return {k: v for k, v in cell.get("overrides", {}).items() if is_seed_key(k)}


def _done(cell: Mapping[str, Any]) -> bool:
  return cell.get("status") == "done"


def setting_label(setting: Mapping[str, Any]) -> str:
  """ "k1=v1 k2=v2" in the setting's order; "base" for the empty setting (no overrides)."""
  return " ".join(f"{k}={v}" for k, v in setting.items()) or "base"


def _hashable(value: Any) -> Hashable:
  if isinstance(value, list | tuple):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


def seed_key(seeds: Mapping[str, Any]) -> tuple:
  """A hashable key of a cell's seed values (sorted items): cells with equal keys are paired."""
  return tuple(sorted((k, _hashable(v)) for k, v in seeds.items()))


def _group_key(setting: Mapping[str, Any]) -> tuple:
  # The same setting whatever the order of its keys.
  return tuple(sorted((str(k), repr(v)) for k, v in setting.items()))


def _groups(cells: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], list]]:
  """(setting, cells) per setting, in first-appearance order."""
  groups: dict[tuple, tuple[dict[str, Any], list]] = {}
  for cell in cells:
    setting = _setting(cell)
    groups.setdefault(_group_key(setting), (setting, []))[1].append(cell)
  return list(groups.values())


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
    value, bool | np.bool_
  )


def metric_names(cells: Sequence[Mapping[str, Any]]) -> list[str]:
  """The numeric metrics every done cell has, in the first done cell's order.

  A null value (a NaN once written as JSON) counts as the metric's, so one diverged
  seed does not drop it; it counts in that setting's n_nan.
  """
  done = [c.get("metrics") or {} for c in cells if _done(c)]
  names = []
  for name in done[0] if done else ():
    values = [m[name] for m in done if name in m]
    if len(values) == len(done) and all(v is None or _is_number(v) for v in values):
      if any(_is_number(v) for v in values):
        names.append(name)
  return names


def _value(cell: Mapping[str, Any], metric: str) -> float:
  value = (cell.get("metrics") or {}).get(metric)
  return float(value) if _is_number(value) else math.nan


def _error_line(error: Any) -> str:
  """The last non-empty line of an error (a traceback's last line names the exception)."""
  lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
  text = lines[-1] if lines else "(no error recorded)"
  return text if len(text) <= 300 else text[:297] + "..."


def aggregate(
  cells: Sequence[Mapping[str, Any]],
  metrics: Sequence[str] | None = None,
  confidence: float = 0.95,
) -> list[dict[str, Any]]:
  """One row per setting, in first-appearance order, with each metric summarized over seeds.

  Args:
    cells: the runner's cell records.
    metrics: the metric names to summarize; None for every numeric metric all done cells
      have (`metric_names`).
    confidence: the t intervals' coverage.
  Returns:
    Rows {"label", "setting", "n_cells" (all), "n_done", "n_failed" (status "failed"),
    "seeds" (the done cells' seed dicts), "names" (theirs), "failed" ([{"name", "seeds", "status",
    "error"}] of the cells not done), "metrics" ({name: stats.summarize(...)}, over
    the done cells; a cell missing a metric counts in its n_nan)}.
  """
  names = metric_names(cells) if metrics is None else list(metrics)
  rows = []
  for setting, group in _groups(cells):
    done = [c for c in group if _done(c)]
    rows.append(
      {
        "label": setting_label(setting),
        "setting": setting,
        "n_cells": len(group),
        "n_done": len(done),
        "n_failed": sum(c.get("status") == "failed" for c in group),
        "seeds": [_seeds(c) for c in done],
        "names": [c.get("name", "") for c in done],
        "failed": [
          {
            "name": c.get("name", ""),
            "seeds": _seeds(c),
            "status": c.get("status"),
            "error": c.get("error"),
          }
          for c in group
          if not _done(c)
        ],
        "metrics": {
          name: stats.summarize([_value(c, name) for c in done], confidence) for name in names
        },
      }
    )
  return rows


def comparisons(
  cells: Sequence[Mapping[str, Any]],
  metric: str,
  baseline: str | None = None,
  confidence: float = 0.95,
) -> list[dict[str, Any]]:
  """`stats.compare` of the settings on `metric`, paired by seed values where they share them.

  Args:
    cells: the runner's cell records; only done ones count (cells repeated with the same
      setting and seeds are averaged).
    metric: the metric compared.
    baseline: a setting label (`setting_label`) to compare every other setting with;
      None for all pairs (up to 10 settings, else against the first).
    confidence: the intervals' coverage and 1 - the tests' alpha.
  Returns:
    `stats.compare`'s rows; a and b are setting labels.
  Raises:
    ValueError: `baseline` is not a setting's label.
  """
  groups: dict[str, dict[Hashable, float]] = {}
  for setting, group in _groups(cells):
    values: dict[Hashable, list[float]] = {}
    for cell in group:
      if _done(cell):
        values.setdefault(seed_key(_seeds(cell)), []).append(_value(cell, metric))
    groups[setting_label(setting)] = {k: float(np.mean(v)) for k, v in values.items()}
  return stats.compare(groups, baseline=baseline, confidence=confidence)


def _fmt(x: float, digits: int = 4) -> str:
  if x is None or not math.isfinite(x):
    return "nan"
  return f"{x:.{digits}g}"


def _decimals(half: float, mean: float) -> int | None:
  """Decimals that show a half-width to 2 significant digits; None when it is NaN, 0 or
  only rounding error next to the mean."""
  if not math.isfinite(half) or half <= 1e-9 * abs(mean):
    return None
  return min(8, max(0, 1 - math.floor(math.log10(half))))


def _fmt_interval(summary: Mapping[str, Any]) -> str:
  """ "mean ± half-width", "mean (n=1)", or "-" without a value; NaN cells noted."""
  n, mean, half = summary["n"], summary["mean"], summary["half_width"]
  if n == 0:
    text = "-"
  elif n == 1:
    text = f"{_fmt(mean)} (n=1)"
  else:
    d = _decimals(half, mean)
    text = f"{_fmt(mean)} ± 0" if d is None else f"{mean:.{d}f} ± {half:.{d}f}"
  if summary.get("n_nan"):
    text += f" [{summary['n_nan']} NaN]"
  return text


def _fmt_difference(row: Mapping[str, Any]) -> str:
  mean, low, high = row["mean"], row["low"], row["high"]
  if not math.isfinite(mean):
    return "-"
  if not (math.isfinite(low) and math.isfinite(high)):
    return f"{mean:+.4g} (no interval)"
  d = _decimals((high - low) / 2, mean)
  if d is None:
    return f"{mean:+.4g} [{low:+.4g}, {high:+.4g}]"
  return f"{mean:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"


def _fmt_p(p: float) -> str:
  if p is None or not math.isfinite(p):
    return "-"
  return "<1e-4" if 0 < p < 1e-4 else f"{p:.3g}"


def _resolved(row: Mapping[str, Any]) -> str:
  if row.get("reason"):
    return "- (too few seeds)"
  if row["resolved"]:
    return "yes" if row["resolved_holm"] else "yes (not after Holm)"
  return "no"


def _test(row: Mapping[str, Any]) -> str:
  if row["paired"]:
    return f"paired, {row['n']} seeds"
  n_a, n_b = row["n"]
  return f"Welch, {n_a} vs {n_b} seeds" if row.get("test") else f"none ({n_a} vs {n_b} seeds)"


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> list[str]:
  out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(_cell(x) for x in line) + " |" for line in lines]
  return out


def markdown(
  rows: Sequence[Mapping[str, Any]],
  comps: Sequence[Mapping[str, Any]],
  metrics: Sequence[str],
  metric: str | None,
  confidence: float = 0.95,
  title: str = "Sweep",
) -> str:
  """The report as Markdown: a table of settings, a table of comparisons, a legend, failures.

  Args:
    rows: `aggregate`'s rows.
    comps: `comparisons`' rows on `metric`.
    metrics: the metrics shown in the settings table (each must be in the rows' metrics).
    metric: the metric the comparisons are on.
    confidence: the intervals' coverage.
    title: the report's heading.
  """
  pct = f"{100 * confidence:g}%"
  alpha = f"{1 - confidence:.3g}"
  out = [f"# {title}", ""]
  if not rows:
    return "\n".join([*out, "No cells.", ""])

  lines = []
  for row in rows:
    seeds = str(row["n_done"])
    if row["n_cells"] > row["n_done"]:
      seeds += f" (+{row['n_cells'] - row['n_done']} failed)"
    lines.append([f"`{row['label']}`", seeds, *(_fmt_interval(row["metrics"][m]) for m in metrics)])
  out += ["## Settings", "", *_table(["setting", "seeds", *metrics], lines), ""]

  if metric is not None:
    out += [f"## Comparisons on `{metric}`", ""]
    if comps:
      lines = [
        [
          f"`{c['a']}`",
          f"`{c['b']}`",
          _fmt_difference(c),
          _fmt_p(c["p_value"]),
          _fmt_p(c["p_holm"]),
          _resolved(c),
          _test(c),
        ]
        for c in comps
      ]
      header = ["a", "b", "difference a - b [low, high]", "p", "p (Holm)", "resolved", "test"]
      out += [*_table(header, lines), ""]
    else:
      out += ["Only one setting: nothing to compare.", ""]

  t3 = stats.t_quantile(confidence, 2)
  out += [
    f"Each metric is the mean over seeds ± the half-width of its {pct} Student-t confidence "
    "interval (n - 1 degrees of freedom, so wide with few seeds: with 3 the half-width is "
    f"{t3:.2f} standard errors); `(n=1)` marks a single seed, with no interval. Each "
    f"difference is the mean of a - b with its {pct} interval: a paired t interval over "
    "the seeds both settings ran (the same seed values share their upstream randomness, "
    "so the seed's effect cancels), or Welch's unpaired one when they share fewer than 2 "
    "seeds. A difference is *resolved* when its "
    f"interval excludes 0 (p < {alpha}); the Holm column adjusts p for the number of "
    "comparisons in the table (Holm-Bonferroni), and `yes (not after Holm)` marks a "
    f"difference resolved alone but not once corrected (p (Holm) >= {alpha}).",
    "",
  ]

  failed = [(row, f) for row in rows for f in row.get("failed", [])]
  if failed:
    out += ["## Failed cells", ""]
    for row, f in failed:
      name = f["name"] or f"{row['label']} {setting_label(f['seeds'])}"
      status = f"[{f['status']}] " if f.get("status") not in (None, "failed") else ""
      out.append(f"- `{name}`: {status}{_error_line(f.get('error'))}")
    out.append("")
  return "\n".join(out)


def _save(fig: Figure, path: str) -> None:
  with utils.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=_DPI)


def _colors(n: int) -> list:
  from matplotlib import colormaps

  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _err(summary: Mapping[str, Any]) -> list[list[float]] | None:
  """[[below], [above]] the mean, for errorbar; None (no bar) without an interval."""
  low, high, mean = summary["low"], summary["high"], summary["mean"]
  if not (math.isfinite(low) and math.isfinite(high)):
    return None
  return [[mean - low], [high - mean]]


def _has(row: Mapping[str, Any], metric: str) -> bool:
  s = row["metrics"].get(metric)
  return s is not None and s["n"] > 0 and math.isfinite(s["mean"])


def plot_reward_vs_kl(
  rows: Sequence[Mapping[str, Any]],
  path: str,
  title: str = "Reward against sqrt(KL to the reference), mean over seeds",
) -> bool:
  """Gold (left, filled) and proxy (right, hollow) reward against sqrt(KL), one point per setting.

  Each point is a setting's mean final sqrt_kl and reward over seeds, with its t interval
  as error bars in both directions; a setting has one colour in both panels. The proxy
  panel is left out when no row has proxy_reward.

  Args:
    rows: `aggregate`'s rows; those without sqrt_kl and gold_reward are left out.
    path: the PNG to write (atomically; directories created).
    title: the figure's title.
  Returns:
    Whether the plot was written (False when no row has both metrics).
  """
  rows = [r for r in rows if _has(r, "sqrt_kl") and _has(r, "gold_reward")]
  if not rows:
    return False
  with_proxy = any(_has(r, "proxy_reward") for r in rows)
  fig = Figure(figsize=(12 if with_proxy else 7, 5.2))
  axes = fig.subplots(1, 2 if with_proxy else 1, sharex=True, squeeze=False)[0]
  markers = "osD^vP*Xh<>"
  for i, (row, color) in enumerate(zip(rows, _colors(len(rows)), strict=True)):
    m = row["metrics"]
    marker = markers[(i // 10) % len(markers)] if len(rows) > 10 else "o"
    style = {"fmt": marker, "color": color, "ms": 7, "capsize": 3, "elinewidth": 1.2}
    x, xerr = m["sqrt_kl"]["mean"], _err(m["sqrt_kl"])
    n = m["gold_reward"]["n"]
    axes[0].errorbar(
      x,
      m["gold_reward"]["mean"],
      xerr=xerr,
      yerr=_err(m["gold_reward"]),
      label=f"{row['label']} (n={n})",
      **style,
    )
    if with_proxy and _has(row, "proxy_reward"):
      axes[1].errorbar(
        x,
        m["proxy_reward"]["mean"],
        xerr=xerr,
        yerr=_err(m["proxy_reward"]),
        mfc="none",
        mew=1.5,
        **style,
      )
  axes[0].set(xlabel="sqrt(KL to reference) [sqrt nats]", ylabel="gold reward")
  axes[0].set_title("gold (the truth), filled")
  if with_proxy:
    axes[1].set(xlabel="sqrt(KL to reference) [sqrt nats]", ylabel="proxy reward (RM)")
    axes[1].set_title("proxy (what is optimised), hollow")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, loc="best", title="setting (seeds)", title_fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_metric_vs_knob(
  rows: Sequence[Mapping[str, Any]], metric: str, knob: str, path: str
) -> bool:
  """A metric's mean over seeds against a numeric knob, with its t interval as a band.

  One line per combination of the other setting keys; rows without the knob are left
  out. The x axis is logarithmic when every value is positive and they span a factor of
  20 or more.

  Args:
    rows: `aggregate`'s rows.
    metric: the metric on the y axis.
    knob: the setting key on the x axis.
    path: the PNG to write (atomically; directories created).
  Returns:
    Whether the plot was written: False when the knob has a non-numeric value, or fewer
    than 2 distinct values among the rows with a value of the metric.
  """
  rows = [r for r in rows if knob in r["setting"]]
  if not all(_is_number(r["setting"][knob]) for r in rows):
    return False
  rows = [r for r in rows if _has(r, metric)]
  xs = sorted({float(r["setting"][knob]) for r in rows})
  if len(xs) < 2:
    return False
  lines: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in rows:
    rest = {k: v for k, v in row["setting"].items() if k != knob}
    lines.setdefault(_group_key(rest), []).append(row)

  fig = Figure(figsize=(7.5, 5))
  ax = fig.subplots()
  for group, color in zip(lines.values(), _colors(len(lines)), strict=True):
    group = sorted(group, key=lambda r: float(r["setting"][knob]))
    rest = {k: v for k, v in group[0]["setting"].items() if k != knob}
    x = np.array([float(r["setting"][knob]) for r in group])
    s = [r["metrics"][metric] for r in group]
    y = np.array([v["mean"] for v in s])
    low = np.array([v["low"] for v in s])
    high = np.array([v["high"] for v in s])
    yerr = np.stack([y - low, high - y])  # NaN: no bar
    label = setting_label(rest)  # "base": none of the other keys set
    ax.errorbar(x, y, yerr=yerr, fmt="-o", color=color, ms=5, capsize=3, label=label)
    if (np.isfinite(low) & np.isfinite(high)).sum() >= 2:
      # NaN (a single seed) breaks the band rather than bridging it.
      ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
    for xi, yi, v in zip(x, y, s, strict=True):
      ax.annotate(f"n={v['n']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
  if xs[0] > 0 and xs[-1] / xs[0] >= 20:
    ax.set_xscale("log")
  ax.set_xticks(xs, [f"{v:g}" for v in xs])
  ax.set_xticks([], minor=True)
  ax.set(xlabel=knob, ylabel=metric, title=f"{metric} against {knob} (mean, t interval over seeds)")
  ax.grid(alpha=0.3)
  if len(lines) > 1 or next(iter(lines)) != ():
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  _save(fig, path)
  return True


def _file_part(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def _knobs(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Setting keys with numeric values that take 2 or more values, in first-appearance order."""
  keys: dict[str, set] = {}
  for row in rows:
    for k, v in row["setting"].items():
      keys.setdefault(k, set()).add(float(v) if _is_number(v) else repr(v))
  return [
    k for k, vals in keys.items() if len(vals) >= 2 and all(isinstance(v, float) for v in vals)
  ]


def gao_fits(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per setting, Gao et al.'s RL curve fitted to every eval point of its done cells.

  A cell's points are its curve's (sqrt_kl, gold_reward minus the gold reward of its first
  eval, the reference policy's), after that first one; the seeds' points are pooled. Settings
  with fewer than 3 such points get no row. Each row: label, setting, n_cells, the fit
  (`stats.fit_gao`) and the points themselves (d, gain).
  """
  out = []
  for setting, group in _groups([c for c in cells if _done(c)]):
    d, gain = [], []
    for cell in group:
      curve = [p for p in cell.get("curve", []) if "sqrt_kl" in p and "gold_reward" in p]
      if len(curve) < 2 or curve[0]["gold_reward"] is None:
        continue
      for point in curve[1:]:
        if point["sqrt_kl"] is not None and point["gold_reward"] is not None:
          d.append(point["sqrt_kl"])
          gain.append(point["gold_reward"] - curve[0]["gold_reward"])
    fit = stats.fit_gao(d, gain)
    if fit["n"] >= 3:
      label = setting_label(setting)
      out.append(
        {"label": label, "setting": setting, "n_cells": len(group), **fit, "d": d, "gain": gain}
      )
  return out


def gao_markdown(fits: Sequence[Mapping[str, Any]]) -> str:
  """The fits as a Markdown section ("" when there are none)."""
  if not fits:
    return ""
  lines = _table(
    ["setting", "runs", "points", "alpha", "beta", "R^2", "peak sqrt(KL)", "peak gain"],
    [
      [f"`{f['label']}`", f["n_cells"], f["n"], _fmt(f["alpha"]), _fmt(f["beta"]),
       _fmt(f["r2"]), _fmt(f["d_peak"]), _fmt(f["gain_peak"])]
      for f in fits
    ],
  )  # fmt: skip
  return "\n".join(
    [
      "## Over-optimisation: gold gain against sqrt(KL)",
      "",
      *lines,
      "",
      "Gao et al. (2022)'s RL form, gain = d (alpha - beta log d), d = sqrt(KL to the "
      "reference), least squares over every eval point of the setting's runs (each run's "
      "gain is over its own first eval). R^2 is about the gains' mean; the peak is where "
      "the fitted curve turns over (none when beta <= 0).",
      "",
    ]
  )


def plot_gao(fits: Sequence[Mapping[str, Any]], path: str) -> bool:
  """Each setting's points (gain against sqrt(KL)) and its fitted curve; False without fits."""
  if not fits:
    return False
  fig = Figure(figsize=(7.5, 5.2))
  ax = fig.subplots()
  for fit, color in zip(fits, _colors(len(fits)), strict=True):
    ax.plot(fit["d"], fit["gain"], "o", color=color, ms=4, alpha=0.6)
    grid = np.linspace(0.0, max(fit["d"]) * 1.1, 200)
    label = f"{fit['label']}: R^2 {fit['r2']:.2f}"
    ax.plot(grid, stats.gao_curve(grid, fit["alpha"], fit["beta"]), "-", color=color, label=label)
  ax.axhline(0.0, color="0.6", lw=0.8)
  ax.set(xlabel="sqrt(KL to reference) [sqrt nats]", ylabel="gold reward gain over reference")
  ax.set_title("Gold gain against sqrt(KL): eval points and d (alpha - beta log d) fits")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)
  return True


def write(
  workdir: str,
  cells: Sequence[Mapping[str, Any]],
  metrics: Sequence[str] | None = None,
  metric: str | None = None,
  baseline: str | None = None,
  confidence: float = 0.95,
  title: str = "Sweep",
) -> dict[str, Any]:
  """Writes a sweep's report into `workdir`, atomically.

  Files: sweep_report.md (`markdown`, with links to the plots), sweep_report.json
  (title, metric, metrics, baseline, confidence, rows, comparisons, cells, plots; NaN as
  null), reward_vs_kl.png when the cells have sqrt_kl and gold_reward, and
  `<metric>_vs_<knob>.png` (dots as underscores) for each numeric knob with 2 or more
  values.

  Args:
    workdir: the sweep's folder (created).
    cells: the runner's cell records.
    metrics: the metrics in the settings table; None for every numeric metric all done
      cells have.
    metric: the metric compared and plotted against the knobs; None for gold_reward if
      present, else the first metric.
    baseline: a setting label to compare every other setting with; None for all pairs.
    confidence: the intervals' coverage.
    title: the report's heading.
  Returns:
    The JSON written (with "plots", the paths of the plots written).
  """
  names = metric_names(cells) if metrics is None else list(metrics)
  if metric is None:
    metric = "gold_reward" if "gold_reward" in names else (names[0] if names else None)
  table_metrics = list(names)
  if metric is not None and metric not in names:
    names.append(metric)
  rows = aggregate(cells, names, confidence)
  comps = comparisons(cells, metric, baseline, confidence) if metric is not None else []

  plots = []
  path = os.path.join(workdir, "reward_vs_kl.png")
  if plot_reward_vs_kl(rows, path, title=f"{title}: reward against sqrt(KL), mean over seeds"):
    plots.append(path)
  if metric is not None:
    for knob in _knobs(rows):
      path = os.path.join(workdir, f"{_file_part(metric)}_vs_{_file_part(knob)}.png")
      if plot_metric_vs_knob(rows, metric, knob, path):
        plots.append(path)

  fits = gao_fits(cells)
  path = os.path.join(workdir, "overoptimization.png")
  if plot_gao(fits, path):
    plots.append(path)

  text = markdown(rows, comps, table_metrics, metric, confidence, title)
  text = text.rstrip("\n") + "\n\n" + gao_markdown(fits) if fits else text
  if plots:
    text += "\n## Plots\n\n"
    text += "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n\n" for p in plots)
  with utils.atomic_open(os.path.join(workdir, "sweep_report.md")) as f:
    f.write(text.rstrip("\n") + "\n")

  report = utils.jsonable(
    {
      "title": title,
      "metric": metric,
      "metrics": table_metrics,
      "baseline": baseline,
      "confidence": confidence,
      "rows": rows,
      "comparisons": comps,
      "overoptimization": [{k: v for k, v in f.items() if k not in ("d", "gain")} for f in fits],
      "cells": list(cells),
      "plots": plots,
    }
  )
  utils.write_json_atomic(os.path.join(workdir, "sweep_report.json"), report)
  return report
