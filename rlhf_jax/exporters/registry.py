"""The exporters a config can switch on, their `config.exporters` section, and `make`.

Each kind is one entry of REGISTRY: its sub-section's defaults and checks, the field that
switches it on, the optional package it needs (and the pip extra that installs it), and how
to build it. A fork adds one with `register(Kind(...))` before building its spec with
`spec()`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from rlhf_jax import config_spec as cs
from rlhf_jax.exporters import base

PREFIX = "config.exporters"


@dataclasses.dataclass(frozen=True)
class Kind:
  """One kind of exporter.

  name: its sub-section of `config.exporters`.
  defaults: the sub-section's fields and their defaults (all off).
  fields: a check per field.
  switch: the field that turns it on; `is_on(fields)` says whether it is.
  module, extra: the package it imports when built and the rlhf_jax extra that installs it
    (None: nothing beyond the core install).
  build: (fields, context, key) -> the exporter; `key` is its dotted config key.
  """

  name: str
  defaults: Mapping[str, Any]
  fields: Mapping[str, cs.Check]
  switch: str
  is_on: Callable[[Mapping[str, Any]], bool]
  build: Callable[[Mapping[str, Any], base.Context, str], base.Exporter]
  module: str | None = None
  extra: str | None = None

  def missing_package(self, fields: Mapping[str, Any], key: str) -> cs.ConfigError | None:
    """The error for an exporter switched on without its package (None: fine, or off)."""
    if not self.is_on(fields) or self.module is None:
      return None
    if importlib.util.find_spec(self.module) is not None:
      return None
    return self.package_error(fields, key)

  def package_error(self, fields: Mapping[str, Any], key: str) -> cs.ConfigError:
    return cs.ConfigError(
      f"{key}.{self.switch}={fields[self.switch]!r} needs the Python package {self.module}, "
      f"which is not installed: pip install 'rlhf_jax[{self.extra}]' (or pip install "
      f"{self.module}), or switch the exporter off."
    )


def _prometheus(fields, context, key):
  from rlhf_jax.exporters import prometheus_exporter

  return prometheus_exporter.PrometheusExporter(
    context, host=fields["host"], port=fields["port"], key=key
  )


def _wandb(fields, context, key):
  from rlhf_jax.exporters import wandb_exporter

  del key
  return wandb_exporter.WandbExporter(
    context, project=fields["project"], entity=fields["entity"], mode=fields["mode"]
  )


def _statsd(fields, context, key):
  from rlhf_jax.exporters import statsd_exporter

  return statsd_exporter.StatsdExporter(context, host=fields["host"], port=fields["port"], key=key)


REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> None:
  """Adds (or replaces) a kind; `spec()` and `make` see it from then on."""
  REGISTRY[kind.name] = kind


register(
  Kind(
    name="prometheus",
    defaults={"enabled": False, "host": "127.0.0.1", "port": 0},
    fields={"enabled": cs.Bool(), "host": cs.Str(nonempty=True), "port": cs.Int(0, 65535)},
    switch="enabled",
    is_on=lambda f: f["enabled"],
    build=_prometheus,
    module="prometheus_client",
    extra="monitor",
  )
)
register(
  Kind(
    name="wandb",
    defaults={"project": "", "entity": "", "mode": "offline"},
    fields={
      "project": cs.Str(),
      "entity": cs.Str(),
      "mode": cs.Choice("online", "offline", "disabled"),
    },
    switch="project",
    is_on=lambda f: bool(f["project"].strip()),
    build=_wandb,
    module="wandb",
    extra="wandb",
  )
)
register(
  Kind(
    name="statsd",
    defaults={"enabled": False, "host": "127.0.0.1", "port": 8125},
    fields={"enabled": cs.Bool(), "host": cs.Str(nonempty=True), "port": cs.Int(1, 65535)},
    switch="enabled",
    is_on=lambda f: f["enabled"],
    build=_statsd,
  )
)


def exporters_section() -> ml_collections.ConfigDict:
  """The default `config.exporters`: every exporter off."""
  return ml_collections.ConfigDict({name: dict(k.defaults) for name, k in REGISTRY.items()})


def _filled(kind: Kind, section: Any) -> dict[str, Any]:
  return {**kind.defaults, **dict(section.items())}


def _package_check(kind: Kind) -> cs.CrossCheck:
  def check(section, prefix):
    error = kind.missing_package(_filled(kind, section), prefix)
    if error is not None:
      raise error

  return check


def spec() -> cs.Spec:
  """The checks of `config.exporters` (missing fields and sub-sections take the defaults);
  an exporter switched on without its package is a ConfigError naming its switch and extra."""
  return cs.Spec(
    {
      name: cs.Spec(kind.fields, checks=(_package_check(kind),), required=False)
      for name, kind in REGISTRY.items()
    },
    required=False,
  )


CONFIG_SPEC = spec()


def resolve(section: Any = None, prefix: str = PREFIX) -> dict[str, dict[str, Any]]:
  """name -> fields over the defaults, checked (`spec()`); None is every exporter off."""
  if section is None:
    return {name: dict(kind.defaults) for name, kind in REGISTRY.items()}
  spec().validate(section, prefix)
  return {
    name: _filled(kind, section[name]) if name in section else dict(kind.defaults)
    for name, kind in REGISTRY.items()
  }


def _plain(run_config: Any) -> dict[str, Any]:
  if run_config is None:
    return {}
  if hasattr(run_config, "to_dict"):  # a ConfigDict: FieldReferences resolved
    return run_config.to_dict()
  return dict(run_config)


def make(
  section: Any = None,
  *,
  workdir: str,
  stage: str,
  run_config: Any = None,
  prefix: str = PREFIX,
  primary: bool | None = None,
) -> base.Composite:
  """The exporters `section` (a stage's `config.exporters`; None: none) switches on, as one.

  Args:
    section: the config section (checked first: ConfigError naming the key at fault, or
      the pip extra an exporter that is on needs).
    workdir: the stage's folder; its basename is the `run` label/name.
    stage: the trainer's name (`config.trainer`), the `stage` label.
    run_config: the stage's whole config (ConfigDict or dict), shown with the W&B run; its
      `monitor.alerts` rules start Prometheus' alert counters at 0.
    prefix: the section's dotted key, for errors.
    primary: whether this process exports; None: JAX process 0 (asked only when some
      exporter is on). Elsewhere the result does nothing, so callers need not check.
  Returns:
    A `Composite` (falsy when nothing is on): `write(step, line)`, `alerts(alerts)`,
    `close()`.
  """
  fields = resolve(section, prefix)
  on = [name for name, kind in REGISTRY.items() if kind.is_on(fields[name])]
  if not on:
    return base.Composite()
  if primary is None:
    import jax  # only now: configs and the all-off default stay JAX-free

    primary = jax.process_index() == 0
  if not primary:
    return base.Composite()
  context = base.Context(workdir=str(workdir), stage=str(stage), run_config=_plain(run_config))
  built: list[base.Exporter] = []
  try:
    for name in on:
      kind, key = REGISTRY[name], f"{prefix}.{name}"
      try:
        built.append(kind.build(fields[name], context, key))
      except ImportError as error:
        if kind.module is None or error.name is None or error.name.split(".")[0] != kind.module:
          raise
        raise kind.package_error(fields[name], key) from error
  except BaseException:
    try:
      base.Composite(built).close()
    except Exception:
      pass  # the first error is the one to report
    raise
  return base.Composite(built)
