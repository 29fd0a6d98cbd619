"""Declared checks for config fields: type, range and choices, named by the dotted key.

Every trainer declares `CONFIG_SPEC`, one check per field of its config, and
`config_utils.run` validates the whole stage graph with it before anything is
written or trained: the stage's own fields, and the sections of the upstream
stages it will train on demand (`config.sft`, `config.reward`), each with its
own trainer's spec. A field the spec does not know is an error too (a typo in a
config file would otherwise be ignored), and so is a value of the wrong type or
out of range:

    ConfigError: config.optim.lr=-0.01: must be > 0.
    ConfigError: config.reward.sft.checkpoint_every=0: must be an int >= 1.
    ConfigError: config.kl.target=0.0: must be > 0.

A spec is plain data, so forking a trainer and adding a field is one line:

    CONFIG_SPEC = config_spec.Spec(
      {**config_spec.RUN_FIELDS, "total_steps": Int(min=1), "optim": optim.CONFIG_SPEC, ...},
      checks=(config_spec.divides("minibatch_size", "rollout_batch_size"), ...),
    )

Checks across fields (`checks`) run after every field passed its own check;
they receive the section and its dotted prefix and raise ConfigError naming
the key at fault. This module imports no JAX at import time, so config-only
modules (the testbed's) can declare their specs too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax.errors import ConfigError

CrossCheck = Callable[[Any, str], None]


def _show(value: Any) -> str:
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


class Check:
  """One field's check; subclasses implement `problem(value) -> str | None`."""

  def problem(self, value: Any) -> str | None:
    raise NotImplementedError

  def __call__(self, value: Any, key: str, parent: Any) -> None:
    """Raises ConfigError naming `key`; `parent` is the section holding the field."""
    del parent
    problem = self.problem(value)
    if problem:
      raise ConfigError(f"{key}={_show(value)}: {problem}.")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Int(Check):
  """An int (not a bool) in [min, max]."""

  min: int | None = None
  max: int | None = None

  def problem(self, value):
    if not _is_int(value):
      return f"must be an int, got {type(value).__name__}"
    if self.min is not None and value < self.min:
      return f"must be an int >= {self.min}"
    if self.max is not None and value > self.max:
      return f"must be an int <= {self.max}"
    return None


@dataclasses.dataclass(frozen=True)
class Float(Check):
  """A finite real number (ints accepted) within the given bounds."""

  min: float | None = None  # value >= min
  max: float | None = None  # value <= max
  gt: float | None = None  # value > gt
  lt: float | None = None  # value < lt

  def problem(self, value):
    if not _is_number(value):
      return f"must be a number, got {type(value).__name__}"
    value = float(value)
    if not math.isfinite(value):
      return "must be a finite number"
    if self.gt is not None and not value > self.gt:
      return f"must be > {self.gt:g}"
    if self.min is not None and value < self.min:
      return f"must be >= {self.min:g}"
    if self.lt is not None and not value < self.lt:
      return f"must be < {self.lt:g}"
    if self.max is not None and value > self.max:
      return f"must be <= {self.max:g}"
    return None


@dataclasses.dataclass(frozen=True)
class Bool(Check):
  def problem(self, value):
    return None if isinstance(value, bool) else f"must be true or false, got {type(value).__name__}"


@dataclasses.dataclass(frozen=True)
class Str(Check):
  """A string; with `choices`, one of them; with `nonempty`, not blank."""

  choices: tuple[str, ...] | None = None
  nonempty: bool = False

  def problem(self, value):
    if not isinstance(value, str):
      return f"must be a string, got {type(value).__name__}"
    if self.choices is not None and value not in self.choices:
      close = difflib.get_close_matches(value, self.choices, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      return f"expected one of {', '.join(map(repr, self.choices))}{hint}"
    if self.nonempty and not value.strip():
      return "must not be empty"
    return None


def Choice(*choices: str) -> Str:
  return Str(choices=tuple(choices))


@dataclasses.dataclass(frozen=True)
class Seq(Check):
  """A tuple (or list) whose items each pass `item`, of `length` or at least `min_len` items."""

  item: Check
  length: int | None = None
  min_len: int = 0

  def __call__(self, value, key, parent):
    if not isinstance(value, tuple | list):
      raise ConfigError(f"{key}={_show(value)}: must be a tuple, got {type(value).__name__}.")
    if self.length is not None and len(value) != self.length:
      raise ConfigError(f"{key}={_show(value)}: must have {self.length} entries.")
    if len(value) < self.min_len:
      raise ConfigError(f"{key}={_show(value)}: must have at least {self.min_len} entries.")
    for i, item in enumerate(value):
      self.item(item, f"{key}[{i}]", parent)


@dataclasses.dataclass(frozen=True)
class Optional(Check):
  """None, or a value that passes `check`."""

  check: Check

  def __call__(self, value, key, parent):
    if value is not None:
      self.check(value, key, parent)


@dataclasses.dataclass(frozen=True)
class Path(Check):
  """A path string that must exist when set ("" = not set, if `optional`).

  kind: "file" or "dir"; checked before anything trains, so a typo in a data path
  fails in a second, not after the upstream stages trained.
  """

  kind: str = "file"
  optional: bool = True

  def problem(self, value):
    if not isinstance(value, str):
      return f"must be a path string, got {type(value).__name__}"
    if not value:
      return None if self.optional else "must be set"
    if "://" in value:
      return None  # Remote (gs://...): checked when opened.
    exists = os.path.isfile(value) if self.kind == "file" else os.path.isdir(value)
    return None if exists else f"no such {self.kind}"


@dataclasses.dataclass(frozen=True)
class Spec(Check):
  """A config section: a check per field, then the cross-field checks.

  Unknown fields are refused with the closest known names; with `required`, so
  are missing ones (a section like `optim` fills its missing fields with
  defaults and sets required=False). With `open_fields`, fields the spec does
  not list are accepted and each checked with `open_fields` (sections whose keys
  are data, e.g. the testbed's style weights).
  """

  fields: Mapping[str, Check]
  checks: Sequence[CrossCheck] = ()
  required: bool = True
  open_fields: Check | None = None

  def __call__(self, value, key, parent):
    del parent
    if not hasattr(value, "items") or isinstance(value, str):
      raise ConfigError(f"{key}={_show(value)}: must be a section of fields.")
    present = dict(value.items())
    for name, item in present.items():
      check = self.fields.get(name, self.open_fields)
      if check is None:
        close = difflib.get_close_matches(name, list(self.fields), n=3)
        hint = (" Did you mean " + " or ".join(f"{key}.{c}" for c in close) + "?") if close else ""
        raise ConfigError(
          f"{key}.{name} is not a known field.{hint} Fields of {key}: "
          f"{', '.join(sorted(self.fields))}."
        )
      check(item, f"{key}.{name}", value)
    if self.required:
      missing = sorted(name for name in self.fields if name not in present)
      if missing:
        listed = ", ".join(f"{key}.{name}" for name in missing)
        raise ConfigError(f"{key} lacks the field(s) {listed}.")
    for cross in self.checks:
      cross(value, key)

  def validate(self, config: Any, prefix: str = "config") -> None:
    """Raises ConfigError for the first field (or combination) that cannot run."""
    self(config, prefix, None)

  def extend(self, fields: Mapping[str, Check] = (), checks: Sequence[CrossCheck] = ()) -> Spec:
    """This spec with more (or replaced) fields and more cross-field checks."""
    return dataclasses.replace(
      self, fields={**self.fields, **dict(fields)}, checks=(*self.checks, *checks)
    )


@dataclasses.dataclass(frozen=True)
class Stage(Check):
  """An upstream stage's whole config, checked by the spec of the trainer it names.

  With `unless`, the stage is checked only when that field of the enclosing
  section is empty: `Stage(unless="policy_init")` checks `config.sft` only when
  no finished SFT stage is given, i.e. when it will be trained here. `when`
  (a function of the enclosing section) can narrow that further.
  """

  unless: str | None = None
  when: Callable[[Any], bool] | None = None

  def __call__(self, value, key, parent):
    if parent is not None:
      if self.unless is not None and parent.get(self.unless):
        return
      if self.when is not None and not self.when(parent):
        return
    if not hasattr(value, "get"):
      raise ConfigError(f"{key}={_show(value)}: must be a stage's config section.")
    from rlhf_jax import config_utils  # the trainer registry; imported late (no cycle)

    spec = config_utils.trainer_spec(value.get("trainer"), key)
    if spec is not None:
      spec.validate(value, key)


# ---------------------------------------------------------------------------- cross-field checks


def _get(section: Any, dotted: str) -> Any:
  node = section
  for part in dotted.split("."):
    node = node[part]
  return node


def _value(section: Any, spec: str) -> tuple[int, str]:
  """A dotted key or a product "a*b" of keys: its value, and how to name it."""
  names = spec.split("*")
  value = math.prod(_get(section, name) for name in names)
  return value, names


def divides(small: str, big: str) -> CrossCheck:
  """`big` must be a multiple of `small` (dotted keys within the section, or products "a*b")."""

  def check(section, prefix):
    (a, a_names), (b, b_names) = _value(section, small), _value(section, big)
    if b % a:
      name = lambda names: " * ".join(f"{prefix}.{n}" for n in names)
      raise ConfigError(f"{name(b_names)}={b} must be a multiple of {name(a_names)}={a}.")

  return check


def mesh_batch(*batch_keys: str) -> CrossCheck:
  """Each batch size (a dotted key, or a product "a*b") splits evenly over the mesh's batch
  shards (data x fsdp) and over the processes: every device and host gets equal rows."""

  def check(section, prefix):
    import jax

    from rlhf_jax import sharding

    shape = sharding.resolve_mesh_shape(tuple(section["mesh"]), jax.device_count())
    shards = shape[0] * shape[1]
    for spec in batch_keys:
      names = spec.split("*")
      value = math.prod(_get(section, name) for name in names)
      where = " x ".join(f"{prefix}.{n}" for n in names)
      for count, what in (
        (shards, "mesh batch shards (data x fsdp)"),
        (jax.process_count(), "processes"),
      ):
        if value % count:
          raise ConfigError(
            f"{where}={value} must be a multiple of the {count} {what} of "
            f"{prefix}.mesh={tuple(section['mesh'])}."
          )

  return check


class Mesh(Check):
  """(data, fsdp, tensor): sizes >= 1 or one -1, fitting the devices of this job."""

  def __call__(self, value, key, parent):
    del parent
    Seq(Int(), length=3)(value, key, None)
    import jax

    from rlhf_jax import sharding

    try:
      sharding.resolve_mesh_shape(tuple(value), jax.device_count())
    except ValueError as error:
      raise ConfigError(f"{key}={_show(value)}: {error}") from None


# Fields every trainer has: what runs, where, and how it logs and saves.
RUN_FIELDS: dict[str, Check] = {
  "trainer": Str(nonempty=True),
  "seed": Int(min=0),
  "mesh": Mesh(),
  "sharding_rules": Choice("dp", "fsdp", "fsdp_tp"),
}
LOOP_FIELDS: dict[str, Check] = {
  "total_steps": Int(min=1),
  "log_every": Int(min=1),
  "eval_every": Int(min=1),
  "checkpoint_every": Int(min=1),
  "keep_checkpoints": Int(min=1),
}


@dataclasses.dataclass(frozen=True)
class HfModel(Check):
  """ "" or `hf:DIR`, a Hugging Face model directory: a causal LM or a one-label sequence
  classifier (`rlhf_jax.hf.check` with kind "any")."""

  def problem(self, value):
    if not isinstance(value, str):
      return f"must be a path string, got {type(value).__name__}"
    if not value:
      return None
    if not value.startswith("hf:"):
      return "must be hf:DIR, a Hugging Face model directory (or empty)"
    from rlhf_jax import hf  # imported late: needs JAX

    return hf.check(value, "any")


@dataclasses.dataclass(frozen=True)
class FinishedStage(Check):
  """A finished stage's workdir of `kind` ("policy" or "reward"), or "" (trained on demand)."""

  kind: str

  def problem(self, value):
    if not isinstance(value, str):
      return f"must be a path string, got {type(value).__name__}"
    if not value or "://" in value:
      return None
    if value.startswith("hf:"):
      from rlhf_jax import hf  # imported late: needs JAX

      return hf.check(value, self.kind)
    if not os.path.isdir(value):
      return "no such directory"
    from rlhf_jax import errors, stages  # imported late: stages needs JAX

    try:
      kind = stages.read_meta(value).get("kind")
    except errors.Error as error:
      return str(error)
    if kind != self.kind:
      return f"exports a {kind!r}, not a {self.kind}"
    if not stages.is_complete(value):
      return "was trained past its export (a newer checkpoint); rerun that stage to finish it"
    return None
