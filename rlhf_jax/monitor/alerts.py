"""Alert rules over eval metrics, and the engine that checks them once per eval step.

A rule watches one metric (any key of the dict given to `AlertEngine.check`: the monitor's
`monitor/...` metrics, or the eval line's `eval/...`):

  kind "threshold"   the metric's value `op` `value`            (op ">" or "<")
  kind "trend"       the least-squares slope of the metric over the last `window`
                     evaluations (per evaluation) `op` `value`; needs `window` finite values
  for_evals          it fires only once the condition held at N consecutive evaluations,
                     and at every evaluation after that while it holds
  severity           "info", "warning" or "critical"
  action             "log" (just the alert), "stop" (`should_stop` is true: end the run),
                     "keep_best" (keep the best checkpoint by `criterion`, `mode` max/min:
                     `keep_best_requests`)
  why                one line for the person reading the alert

A missing or NaN metric never fires and breaks a for_evals streak. Rules come from config,
`config.monitor.alerts.<name>` (`default_rules`, `rule_config`), validated with the config
spec system so a bad rule names its dotted key:

  ConfigError: config.monitor.alerts.kl_spike.op='=>': expected one of '>', '<'.

`write(alerts, path)` appends them to `<workdir>/alerts.jsonl` (`read` reads it back).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from rlhf_jax import config_spec as cs
from rlhf_jax import utils
from rlhf_jax.monitor import detectors

ALERTS_FILENAME = "alerts.jsonl"
KINDS = ("threshold", "trend")
OPS = (">", "<")
SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("log", "stop", "keep_best")
MODES = ("max", "min")
STATE_VERSION = 1
# Evaluations of history a rule keeps beyond what it needs (`Rule.keeps`).
REPLAY = 8

# Every field of a rule but its name; metric, op and value have no default.
RULE_DEFAULTS: dict[str, Any] = {
  "enabled": True,
  "kind": "threshold",
  "window": 5,
  "for_evals": 1,
  "severity": "warning",
  "action": "log",
  "criterion": "eval/gold_reward",
  "mode": "max",
  "why": "",
}
REQUIRED = ("metric", "op", "value")


def _rule_checks(section: Any, prefix: str) -> None:
  present = dict(section.items())
  for name in REQUIRED:
    if name not in present:
      raise cs.ConfigError(f"{prefix} lacks the field {prefix}.{name}.")
  fields = {**RULE_DEFAULTS, **present}
  if fields["kind"] == "trend" and fields["window"] < 2:
    raise cs.ConfigError(
      f"{prefix}.window={fields['window']}: a trend rule needs a window of at least 2 evaluations."
    )
  if fields["action"] == "keep_best" and not fields["criterion"].strip():
    raise cs.ConfigError(
      f"{prefix}.criterion='': a keep_best rule needs the metric that ranks checkpoints."
    )


# One rule's fields; missing optional fields take RULE_DEFAULTS.
RULE_SPEC = cs.Spec(
  {
    "enabled": cs.Bool(),
    "metric": cs.Str(nonempty=True),
    "kind": cs.Choice(*KINDS),
    "op": cs.Choice(*OPS),
    "value": cs.Float(),
    "window": cs.Int(min=1),
    "for_evals": cs.Int(min=1),
    "severity": cs.Choice(*SEVERITIES),
    "action": cs.Choice(*ACTIONS),
    "criterion": cs.Str(),
    "mode": cs.Choice(*MODES),
    "why": cs.Str(),
  },
  checks=(_rule_checks,),
  required=False,
)
# `config.monitor.alerts`: any number of named rules.
ALERTS_SPEC = cs.Spec({}, open_fields=RULE_SPEC, required=False)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One alert rule (module docstring); checked when made, naming `alerts.<name>.<field>`."""

  name: str
  metric: str
  op: str
  value: float
  kind: str = RULE_DEFAULTS["kind"]
  window: int = RULE_DEFAULTS["window"]
  for_evals: int = RULE_DEFAULTS["for_evals"]
  severity: str = RULE_DEFAULTS["severity"]
  action: str = RULE_DEFAULTS["action"]
  criterion: str = RULE_DEFAULTS["criterion"]
  mode: str = RULE_DEFAULTS["mode"]
  why: str = RULE_DEFAULTS["why"]
  enabled: bool = RULE_DEFAULTS["enabled"]

  def __post_init__(self):
    fields = dataclasses.asdict(self)
    del fields["name"]
    RULE_SPEC.validate(fields, f"alerts.{self.name}")
    object.__setattr__(self, "value", float(self.value))

  @classmethod
  def from_config(cls, name: str, section: Any, prefix: str = "config.monitor.alerts") -> Rule:
    """The rule of a config section (missing optional fields take their defaults)."""
    RULE_SPEC.validate(section, f"{prefix}.{name}")
    return cls(name=name, **{**RULE_DEFAULTS, **dict(section.items())})

  def holds(self, x: float) -> bool:
    return x > self.value if self.op == ">" else x < self.value

  @property
  def needs(self) -> int:
    """How many evaluations of history the rule needs."""
    return max(self.window if self.kind == "trend" else 1, self.for_evals)

  @property
  def keeps(self) -> int:
    """How many it keeps: REPLAY more, so evals repeated after a resume see the same."""
    return self.needs + REPLAY


def rule_config(metric: str, op: str, value: float, **fields: Any) -> ml_collections.ConfigDict:
  """A rule's config section, with every optional field filled in (RULE_DEFAULTS):

  config.monitor.alerts.my_rule = monitor.rule_config("eval/frac_no_eos", ">", 0.2,
                                                      why="responses stopped ending")
  """
  unknown = sorted(set(fields) - set(RULE_DEFAULTS))
  if unknown:
    raise cs.ConfigError(f"rule_config: unknown field(s) {', '.join(unknown)}.")
  return ml_collections.ConfigDict(
    {"metric": metric, "op": op, "value": float(value), **RULE_DEFAULTS, **fields}
  )


def default_rules() -> ml_collections.ConfigDict:
  """The default rules, one per main reward-hacking signal (docs/monitoring.md).

  The thresholds are starting points, set against the noise of an eval of ~100 prompts
  (a mean's standard error is ~0.1 reference standard deviations, a 5-point slope's ~0.03);
  `length_growth` and `entropy_collapse` were calibrated on 8 testbed PPO runs (session 22:
  they kept 6 healthy runs quiet that the first thresholds flagged). Calibrate them on your
  own runs with `experiments/alert_report.py --replay --rule=...` (`enabled=False` switches
  one off).
  """
  keep_best = dict(action="keep_best", criterion="eval/gold_reward", mode="max")
  rules = {
    "proxy_gold_gap_rising": rule_config(
      "monitor/proxy_gold_gap_trend", ">", 0.2, for_evals=2, **keep_best,
      why="the proxy reward is outgrowing the judge by > 0.2 reference std per eval "
      "(over-optimisation); a healthy run's gap grows by ~0.1 or less",
    ),
    "gold_falling": rule_config(
      "monitor/judge_gain", "<", -0.1, kind="trend", window=5, for_evals=2, **keep_best,
      why="the judge's score is falling by > 0.1 reference std per eval over 5 evals "
      "(~3 standard errors): past the peak of the over-optimisation curve",
    ),
    "reward_length_corr": rule_config(
      "monitor/reward_length_corr", ">", 0.5, for_evals=2, severity="info",
      why="the proxy reward is explained largely by response length (r > 0.5): the policy "
      "can gain reward by writing more (length hacking if length_growth fires too)",
    ),
    "length_growth": rule_config(
      "monitor/length_trend", ">", 0.08, for_evals=2,
      why="responses grow by > 8% of the reference length per eval: length hacking "
      "(healthy PPO runs on the testbed read up to ~0.09 once, then fall)",
    ),
    "repetition_rising": rule_config(
      "monitor/repeat_ngram_frac", ">", 0.03, kind="trend", window=5, for_evals=2,
      why="the share of responses that repeat a phrase grows by > 3 points per eval: "
      "the policy is looping on phrases the reward model likes",
    ),
    "ensemble_ood": rule_config(
      "monitor/ensemble_disagreement_ratio", ">", 1.5,
      why="the reward-model members disagree 50% more on the policy's samples than on "
      "in-distribution data: the samples left the reward model's training distribution",
    ),
    "kl_spike": rule_config(
      "monitor/kl_spike_ratio", ">", 4.0,
      why="KL to the reference jumped to > 4x its recent median: an unstable update "
      "(linear growth reads ~2x early on, falling towards 1)",
    ),
    "entropy_collapse": rule_config(
      "monitor/entropy_ratio", "<", 0.4, for_evals=2, severity="critical", action="stop",
      why="token entropy fell below 0.4 of the starting policy's: the policy collapsed onto "
      "a few phrasings and rarely recovers (healthy PPO runs on the testbed settle at ~0.5)",
    ),
    "response_drift": rule_config(
      "monitor/response_jsd", ">", 0.3, for_evals=2,
      why="the responses' token distribution moved far from the starting policy's (JSD > "
      "0.3 bits); resampling noise grows with the vocabulary: check a benign run's level",
    ),
    "prompt_drift": rule_config(
      "monitor/prompt_jsd", ">", 0.2, severity="info",
      why="the prompts differ from the reference window's: the figures compare other data",
    ),
  }  # fmt: skip
  return ml_collections.ConfigDict(rules)


def rules_from_config(section: Any = None, prefix: str = "config.monitor.alerts") -> list[Rule]:
  """The enabled rules of `config.monitor.alerts` (None: `default_rules()`); ConfigError
  naming the key at fault."""
  section = default_rules() if section is None else section
  ALERTS_SPEC.validate(section, prefix)
  rules = [Rule.from_config(name, rule, prefix) for name, rule in section.items()]
  return [rule for rule in rules if rule.enabled]


# ----------------------------------------------------------------------------------- alerts


@dataclasses.dataclass
class Alert:
  """A rule that fired at `step`: `value` is the metric (threshold) or its slope (trend)."""

  step: int
  rule: str
  metric: str
  value: float
  threshold: float
  severity: str
  action: str
  message: str
  kind: str = "threshold"
  op: str = ">"
  held_for: int = 1  # consecutive evaluations the condition held (capped at the rule's needs)
  criterion: str = ""  # keep_best: the metric that ranks checkpoints, and its mode
  mode: str = "max"

  def to_dict(self) -> dict[str, Any]:
    return _strict(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Alert:
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in d.items() if k in names}
    for key in ("value", "threshold"):
      fields[key] = math.nan if fields.get(key) is None else float(fields[key])
    return cls(**fields)


def _strict(d: Mapping[str, Any]) -> dict[str, Any]:
  """A flat dict with non-finite floats as None (strict JSON)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _number(value: Any) -> float:
  """A metric as a float; NaN for a missing or non-numeric value."""
  if value is None or isinstance(value, bool | str):
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


class AlertEngine:
  """Checks its rules once per evaluation and keeps the history they need.

  engine = AlertEngine.from_config(config.monitor.alerts)
  alerts = engine.check(step, {**eval_metrics, **monitor_metrics})
  write(alerts, os.path.join(workdir, ALERTS_FILENAME))
  if should_stop(alerts): ...

  The state (`state_dict`, JSON-safe) is per rule: the last evaluations' (step, value,
  held). A step at or before one already seen replaces the entries from that step on, so an
  eval repeated after a resume is not counted twice (and, up to REPLAY evaluations back,
  is judged on the same history as the first time).
  """

  def __init__(self, rules: Iterable[Rule]):
    self.rules: dict[str, Rule] = {}
    for rule in rules:
      if rule.name in self.rules:
        raise cs.ConfigError(f"Two alert rules are named {rule.name!r}.")
      if rule.enabled:
        self.rules[rule.name] = rule
    self._history: dict[str, list[tuple[int, float, bool]]] = {name: [] for name in self.rules}

  @classmethod
  def from_config(cls, section: Any = None, prefix: str = "config.monitor.alerts") -> AlertEngine:
    """The engine of `config.monitor.alerts` (None: the default rules)."""
    return cls(rules_from_config(section, prefix))

  def check(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
    """The alerts of this evaluation (possibly none), in rule order."""
    step = int(step)
    fired = []
    for name, rule in self.rules.items():
      history = [entry for entry in self._history[name] if entry[0] < step]
      x = _number(metrics.get(rule.metric))
      value = math.nan
      if not math.isnan(x):
        if rule.kind == "threshold":
          value = x
        else:
          values = [v for _, v, _ in history[-(rule.window - 1) :]] + [x]
          if len(values) == rule.window and all(math.isfinite(v) for v in values):
            value = detectors.slope(values)
      held = not math.isnan(value) and rule.holds(value)
      history.append((step, x, held))
      self._history[name] = history[-rule.keeps :]
      streak = 0
      for _, _, h in reversed(self._history[name][-rule.needs :]):
        if not h:
          break
        streak += 1
      if held and streak >= rule.for_evals:
        fired.append(self._alert(rule, step, value, streak))
    return fired

  @staticmethod
  def _alert(rule: Rule, step: int, value: float, streak: int) -> Alert:
    what = f"{rule.metric} trend over {rule.window} evals" if rule.kind == "trend" else rule.metric
    held = f" for {streak} evals" if rule.for_evals > 1 else ""
    message = f"step {step}: {rule.name} ({rule.severity}): {what} = {value:.4g} {rule.op} "
    message += f"{rule.value:g}{held}"
    if rule.why:
      message += f": {rule.why}"
    if rule.action != "log":
      message += f" [action: {rule.action}]"
    return Alert(
      step=step, rule=rule.name, metric=rule.metric, value=float(value),
      threshold=rule.value, severity=rule.severity, action=rule.action, message=message,
      kind=rule.kind, op=rule.op, held_for=streak, criterion=rule.criterion, mode=rule.mode,
    )  # fmt: skip

  def state_dict(self) -> dict[str, Any]:
    """The per-rule history as strict JSON (non-finite values as null)."""
    rules = {
      name: [[s, v if math.isfinite(v) else None, h] for s, v, h in entries]
      for name, entries in self._history.items()
    }
    return {"version": STATE_VERSION, "rules": rules}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()`; rules it lacks start fresh, rules no longer configured are
    dropped."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"Alert state version {state.get('version')!r}; expected {STATE_VERSION}.")
    saved = state.get("rules", {})
    for name, rule in self.rules.items():
      entries = [
        (int(s), math.nan if v is None else float(v), bool(h)) for s, v, h in saved.get(name, [])
      ]
      self._history[name] = entries[-rule.keeps :]


# ------------------------------------------------------------------------------------- files


def write(alerts: Sequence[Alert], path: str) -> None:
  """Appends one JSON line per alert to `path` (a file, or a workdir: its alerts.jsonl).

  One write call per line, then flush and fsync: a kill leaves whole lines behind (a cut
  last line is skipped by `read`). Nothing is written (or created) for no alerts.
  """
  if not alerts:
    return
  if os.path.isdir(path):
    path = os.path.join(path, ALERTS_FILENAME)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for alert in alerts:
      f.write(json.dumps(alert.to_dict(), allow_nan=False, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())


def read(path: str) -> list[Alert]:
  """The alerts of an alerts.jsonl (or a workdir holding one); [] if there is none.
  A last line without its newline (a write cut off) is left out."""
  if os.path.isdir(path):
    path = os.path.join(path, ALERTS_FILENAME)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")[:-1]  # the part after the last newline is incomplete
  return [Alert.from_dict(json.loads(line)) for line in lines if line.strip()]


def drop_after(path: str, step: int) -> None:
  """Removes the alerts of steps after `step` (call on resume from checkpoint `step`, as
  `MetricWriter` does with metrics.jsonl: those evals run again). Atomic rewrite."""
  if os.path.isdir(path):
    path = os.path.join(path, ALERTS_FILENAME)
  if not os.path.exists(path):
    return
  kept = [a for a in read(path) if a.step <= step]
  utils.write_jsonl_atomic(path, [a.to_dict() for a in kept])


def should_stop(alerts: Iterable[Alert]) -> bool:
  """Whether any alert asks to stop the run (action "stop")."""
  return any(alert.action == "stop" for alert in alerts)


def keep_best_requests(alerts: Iterable[Alert]) -> list[tuple[str, str]]:
  """The distinct (criterion, mode) pairs that keep_best alerts ask for, in order."""
  out: list[tuple[str, str]] = []
  for alert in alerts:
    if alert.action == "keep_best" and (alert.criterion, alert.mode) not in out:
      out.append((alert.criterion, alert.mode))
  return out
