r"""Rater-quality report for a preference file: who agrees with whom, and how much.

  python -m experiments.label_report --data=prefs.jsonl [--out=report.json]

  --data=FILE       a JSONL or Parquet preference file with rater ids (the schema of
                    rlhf_jax/data/preferences.py), from the testbed or from real raters.
  --out=FILE        where the JSON goes; default <FILE stem>.label_report.json next to FILE.
  --skip_invalid    skip (and count) invalid records instead of stopping at the first.
  --pair_key=auto   how labels of one pair are matched: auto (pair_id, else the texts),
                    text, or pair_id.
  --min_shared=5    fewer shared items than this give NaN kappas and per-rater agreements.

Prints a table (per rater: labels, agreement with the leave-one-out majority, agreement on
anchors and with the anchor majority, tie rate, mean confidence, agreement with gold when
the file has gold rewards; panel: raw agreement, Fleiss' kappa, Krippendorff's alpha; the
matrix of pairwise Cohen's kappas) and writes all of it as JSON, NaN written as null. The
statistics are defined in rlhf_jax/data/agreement.py. When every record carries `p_chosen`
(the testbed's data), the noise ceiling (testbed.noise_ceiling) is reported too.

A malformed file stops with the DataError's message (file, line or row, field) and exit
status 2, without a traceback; so does a file without rater ids, or one whose pair_id names
two different pairs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from absl import app, flags

from rlhf_jax import errors, utils
from rlhf_jax.data import agreement, preferences, testbed
from rlhf_jax.data.builders import DataError

_DATA = flags.DEFINE_string("data", None, "A JSONL or Parquet preference file.")
_OUT = flags.DEFINE_string("out", None, "JSON output; default <data stem>.label_report.json.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "Skip and count invalid records.")
_PAIR_KEY = flags.DEFINE_enum(
  "pair_key", "auto", list(agreement.PAIR_KEYS), "How labels of one pair are matched."
)
_MIN_SHARED = flags.DEFINE_integer(
  "min_shared", agreement.MIN_SHARED_ITEMS, "Fewest shared items for a kappa or agreement."
)
flags.mark_flag_as_required("data")

# The kappa matrix is printed only up to this many raters; the JSON always has it.
_MAX_PRINTED_RATERS = 20


def default_out_path(data_path: str) -> str:
  """`<dir>/<stem>.label_report.json` for `<dir>/<stem>.<ext>`."""
  stem = os.path.splitext(os.path.basename(data_path))[0]
  return os.path.join(os.path.dirname(os.path.abspath(data_path)), f"{stem}.label_report.json")


def ceiling(records: list[dict[str, Any]]) -> dict[str, Any] | None:
  """testbed.noise_ceiling when every record has p_chosen (gold parts NaN without gold)."""
  if not records or any(not math.isfinite(r["p_chosen"]) for r in records):
    return None
  result = dict(testbed.noise_ceiling(records))
  has_gold = all(math.isfinite(r["gold_chosen"] + r["gold_rejected"]) for r in records)
  if not has_gold:
    # noise_ceiling would read a NaN gold difference as "gold prefers rejected".
    result["gold_accuracy"] = result["gold_expected_accuracy"] = math.nan
  return result


def make_report(
  path: str,
  *,
  skip_invalid: bool = False,
  pair_key: str = "auto",
  min_shared: int = agreement.MIN_SHARED_ITEMS,
) -> dict[str, Any]:
  """The report for one file, as written to JSON (before NaN becomes null).

  Raises:
    DataError: an invalid record (unless skip_invalid), no record with a rater id, or a
      pair_id naming different pairs.
  """
  skipped: list[DataError] = []
  records = preferences.read_preferences(path, skip_invalid=skip_invalid, skipped=skipped)
  if not any(r["rater_id"] for r in records):
    raise DataError(path, 0, "no record has a rater_id; agreement needs to know who labelled")
  try:
    panel = agreement.panel_report(records, pair_key=pair_key, min_shared=min_shared)
  except ValueError as error:  # a pair_id that names two different pairs of texts
    raise DataError(path, 0, str(error)) from None
  report = {
    "data": os.path.abspath(path),
    "num_skipped": len(skipped),
    "skipped_errors": [str(e) for e in skipped[:20]],
    **panel,
  }
  report["noise_ceiling"] = ceiling(records)
  return report


def write_json(report: dict[str, Any], path: str) -> None:
  """Strict JSON (NaN as null), written atomically."""
  text = json.dumps(utils.jsonable(report), indent=2, allow_nan=False) + "\n"
  with utils.atomic_open(path) as f:
    f.write(text)


def _number(value: float, width: int, digits: int = 3) -> str:
  return f"{'-':>{width}}" if not math.isfinite(value) else f"{value:>{width}.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
  """The human-readable table of a report."""
  counts, panel, per_rater = report["counts"], report["panel"], report["per_rater"]
  lines = [
    f"Label report: {report['data']}",
    f"  {counts['records']} records ({report['num_skipped']} skipped, "
    f"{counts['unattributed']} without rater, {counts['duplicate_labels']} repeat labels), "
    f"{counts['raters']} raters, {counts['items']} pairs ({counts['items_multi_rated']} "
    f"labelled by 2+ raters), {counts['anchor_items']} anchors ({counts['anchor_source']})",
    "",
    f"  {'rater':<10}{'labels':>7}{'majority':>10}{'anchors':>9}{'anchor':>8}"
    f"{'ties':>7}{'conf.':>7}{'gold':>7}",
    f"  {'':<10}{'':>7}{'(l.o.o.)':>10}{'(peers)':>9}{'major.':>8}{'':>7}{'':>7}{'':>7}",
  ]
  for rater, stats in per_rater.items():
    lines.append(
      f"  {rater:<10}{stats['num_labels']:>7}"
      + _number(stats["majority_agreement"], 10)
      + _number(stats["anchor_agreement"], 9)
      + _number(stats["anchor_majority_agreement"], 8)
      + _number(stats["tie_rate"], 7)
      + _number(stats["mean_confidence"], 7, 2)
      + _number(stats["gold_agreement"], 7)
    )
  lines += [
    "",
    "  panel",
    f"    raw agreement (pairs of labels)   {_number(panel['raw_agreement'], 7)}",
    f"    Fleiss' kappa, anchors            {_number(panel['fleiss_kappa_anchors'], 7)}",
    f"    Fleiss' kappa, all items          {_number(panel['fleiss_kappa'], 7)}",
    f"    Krippendorff's alpha (nominal)    {_number(panel['krippendorff_alpha'], 7)}",
    f"    mean pairwise Cohen's kappa       {_number(panel['mean_cohen_kappa'], 7)}",
  ]
  kappa = report["cohen_kappa"]
  raters = kappa["raters"]
  lines += ["", f"  Cohen's kappa (pairs sharing >= {kappa['min_shared']} items; - if fewer)"]
  if len(raters) > _MAX_PRINTED_RATERS:
    lines.append(f"    {len(raters)} raters: see the JSON file")
  else:
    width = max(6, *(len(r) + 1 for r in raters))
    lines.append("    " + " " * width + "".join(f"{r:>{width}}" for r in raters))
    for rater, row in zip(raters, kappa["matrix"], strict=True):
      lines.append(f"    {rater:<{width}}" + "".join(_number(v, width, 2) for v in row))
  ceiling_stats = report.get("noise_ceiling")
  if ceiling_stats:
    lines += ["", "  noise ceiling (testbed p_chosen)"]
    for key in ("bayes_accuracy", "bayes_log_loss", "gold_accuracy", "gold_expected_accuracy"):
      lines.append(f"    {key:<34}{_number(ceiling_stats[key], 7)}")
    lines.append(f"    {'tie_fraction':<34}{_number(ceiling_stats['tie_fraction'], 7)}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  path = _DATA.value
  try:
    report = make_report(
      path,
      skip_invalid=_SKIP_INVALID.value,
      pair_key=_PAIR_KEY.value,
      min_shared=_MIN_SHARED.value,
    )
  except errors.Error as error:
    # The message names what to fix (file, line, field); a traceback would bury it.
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  except OSError as error:  # a missing or unreadable file: its name is in the message
    sys.stderr.write(f"FATAL data error: {error}\n")
    sys.exit(errors.EXIT_CODE)
  out = _OUT.value or default_out_path(path)
  print(format_report(report))
  write_json(report, out)
  print(f"\nWrote {out}")


if __name__ == "__main__":
  app.run(main)
