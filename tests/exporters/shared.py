"""What the exporters' tests share: a representative line and alerts."""

from rlhf_jax.monitor import METRIC_NAMES, Alert

# The eval line of an RL stage (rlhf_jax/evaluation.py `Evaluator.report`), its monitor
# metrics (`monitor.METRIC_NAMES`, plus `monitor/alerts`) and a training line's keys.
EVAL_KEYS = (
  "eval/gold_reward", "eval/gold_reward_std", "eval/proxy_reward", "eval/win_rate_vs_sft",
  "eval/win_rate_vs_sft_low", "eval/win_rate_vs_sft_high", "eval/kl_to_ref", "eval/sqrt_kl",
  "eval/response_length", "eval/frac_no_eos", "eval/distinct_2",
)  # fmt: skip
TRAIN_KEYS = ("objective/kl", "objective/scores", "policy/entropy", "steps_per_s", "tokens_per_s")


def line(step: int = 10) -> dict[str, float]:
  """A representative line: every key, distinct values (step + i / 100)."""
  keys = (*TRAIN_KEYS, *EVAL_KEYS, *METRIC_NAMES, "monitor/alerts")
  return {key: step + i / 100 for i, key in enumerate(keys)}


def alerts(step: int = 10) -> list[Alert]:
  def alert(rule, metric, severity, action="log"):
    return Alert(
      step=step, rule=rule, metric=metric, value=0.9, threshold=0.5, severity=severity,
      action=action, message=f"step {step}: {rule} ({severity}): {metric} = 0.9 > 0.5",
    )  # fmt: skip

  return [
    alert("response_drift", "monitor/response_jsd", "warning"),
    alert("entropy_collapse", "monitor/entropy_ratio", "critical", "stop"),
  ]
