"""Grids of config values, in the style of big_vision's and XManager's hyper-parameter files.

A sweep file sits next to the configs and returns its cells from `get_sweep(arg=None)`:

    from rlhf_jax.sweeps import hyper

    def get_sweep(arg=None):
      return hyper.product([
          hyper.sweep("kl.init_coef", [0.01, 0.05, 0.2]),
          hyper.seeds(3),
      ])

Every function returns a list of cells, each a dict of dotted config keys (without the
`config.` prefix; one given is dropped) to values, so they nest: `product` takes the cartesian
product of grids, `zipit` pairs grids of equal length element by element, `chain` lists
grids one after another. The key `config` names the config file of a cell (e.g. to compare
methods, each with its own knob), overriding the sweep command's --config.

Seed keys are `seed` and keys ending in `.seed` (`sft.seed`, `reward.seed`): cells that differ
only in them are replicates of one setting, and statistics pair settings on equal seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

Cell = dict[str, Any]


def _key(key: str) -> str:
  if not isinstance(key, str) or not key:
    raise ValueError(f"A sweep key must be a non-empty string, got {key!r}.")
  return key.removeprefix("config.")


def sweep(key: str, values: Iterable[Any]) -> list[Cell]:
  """One cell per value of `key`."""
  values = list(values)
  if not values:
    raise ValueError(f"hyper.sweep({key!r}, ...) got no values.")
  return [{_key(key): value} for value in values]


def fixed(key: str, value: Any) -> list[Cell]:
  """One cell with `key` set to `value` (a constant inside a product)."""
  return [{_key(key): value}]


def seeds(n_or_values: int | Sequence[int], key: str = "seed") -> list[Cell]:
  """Cells over seeds: `seeds(3)` is seed 0, 1, 2; `seeds([4, 7])` those two."""
  values = range(n_or_values) if isinstance(n_or_values, int) else n_or_values
  return sweep(key, values)


def _merge(parts: Sequence[Cell]) -> Cell:
  out: Cell = {}
  for part in parts:
    clash = sorted(set(out) & set(part))
    if clash:
      raise ValueError(f"Sweep key {clash[0]!r} is set twice in one cell.")
    out.update(part)
  return out


def product(grids: Sequence[Sequence[Cell]]) -> list[Cell]:
  """Every combination of one cell from each grid; the first grid varies slowest."""
  return [_merge(parts) for parts in itertools.product(*grids)]


def zipit(grids: Sequence[Sequence[Cell]]) -> list[Cell]:
  """The i-th cells of all grids merged (the grids must have one length)."""
  lengths = {len(g) for g in grids}
  if len(lengths) > 1:
    raise ValueError(f"hyper.zipit got grids of different lengths {sorted(lengths)}.")
  return [_merge(parts) for parts in zip(*grids, strict=True)]


def chain(grids: Sequence[Sequence[Cell]]) -> list[Cell]:
  """The cells of every grid, one grid after another."""
  return [dict(cell) for grid in grids for cell in grid]


def is_seed_key(key: str) -> bool:
  """`seed` and `<section>.seed` vary the randomness, not the setting."""
  return key == "seed" or key.endswith(".seed")
