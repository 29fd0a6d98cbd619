"""The `config.monitor` section: `monitor_section()` (the defaults) and its `CONFIG_SPEC`.

A trainer that monitors adds the section to its config and its spec:

  config.monitor = monitor.monitor_section()
  CONFIG_SPEC = cs.Spec({..., "monitor": monitor.CONFIG_SPEC})

Missing fields take the defaults (the spec has required=False, like `optim`), except
`alerts`: a section that is given holds exactly the rules it names.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rlhf_jax import config_spec as cs
from rlhf_jax.monitor import alerts as alerts_lib
from rlhf_jax.monitor import detectors

# Every field but `alerts`, with its default.
DEFAULTS: dict[str, Any] = {
  "enabled": True,
  # The first `reference_evals` evaluations (the step-0 eval of the starting policy, by
  # default) are pooled into the reference statistics every later eval is compared with.
  "reference_evals": 1,
  # Evaluations of metric history kept (in the state, so it survives a resume).
  "history_size": 64,
  # Slopes (proxy-gold gap, length) over the last `trend_window` evaluations, defined once
  # `trend_min_points` evaluations exist (a slope of 2 noisy points is mostly noise).
  "trend_window": 5,
  "trend_min_points": 3,
  # KL spikes: the latest KL against the median of the previous `kl_window` evaluations,
  # defined once `kl_min_history` of them exist (the reference evals, KL 0, are left out).
  "kl_window": 5,
  "kl_min_history": 3,
  # n of the repeated-n-gram detector.
  "repeat_n": 3,
  # The reference token frequencies keep the `max_vocab` most frequent tokens (or words),
  # the rest pooled into one bin: a bounded state for any vocabulary.
  "max_vocab": 4096,
  # PSI's floor for empty bins.
  "psi_epsilon": detectors.PSI_EPSILON,
}


def monitor_section() -> ml_collections.ConfigDict:
  """The default `config.monitor`: DEFAULTS plus `alerts = default_rules()`."""
  return ml_collections.ConfigDict({**DEFAULTS, "alerts": alerts_lib.default_rules()})


def _windows_fit(section: Any, prefix: str) -> None:
  fields = {**DEFAULTS, **dict(section.items())}
  need = max(fields["trend_window"], fields["kl_window"]) + 1
  if fields["history_size"] < need:
    raise cs.ConfigError(
      f"{prefix}.history_size={fields['history_size']}: must be >= {need}, the longest window "
      f"({prefix}.trend_window, {prefix}.kl_window) plus 1."
    )
  if fields["trend_min_points"] > fields["trend_window"]:
    raise cs.ConfigError(
      f"{prefix}.trend_min_points={fields['trend_min_points']}: must be <= "
      f"{prefix}.trend_window={fields['trend_window']}."
    )
  if fields["kl_min_history"] > fields["kl_window"]:
    raise cs.ConfigError(
      f"{prefix}.kl_min_history={fields['kl_min_history']}: must be <= "
      f"{prefix}.kl_window={fields['kl_window']}."
    )


CONFIG_SPEC = cs.Spec(
  {
    "enabled": cs.Bool(),
    "reference_evals": cs.Int(min=1),
    "history_size": cs.Int(min=2),
    "trend_window": cs.Int(min=2),
    "trend_min_points": cs.Int(min=2),
    "kl_window": cs.Int(min=1),
    "kl_min_history": cs.Int(min=1),
    "repeat_n": cs.Int(min=1),
    "max_vocab": cs.Int(min=1),
    "psi_epsilon": cs.Float(gt=0, lt=1),
    "alerts": alerts_lib.ALERTS_SPEC,
  },
  checks=(_windows_fit,),
  required=False,
)


def resolve(section: Any = None, prefix: str = "config.monitor") -> dict[str, Any]:
  """The section's fields (but `alerts`) over DEFAULTS, validated; None = the defaults."""
  if section is None:
    return dict(DEFAULTS)
  CONFIG_SPEC.validate(section, prefix)
  return {**DEFAULTS, **{k: v for k, v in section.items() if k != "alerts"}}
