"""RLOO on the testbed: REINFORCE with a leave-one-out baseline, KL in the reward.

    python -m experiments.launch --config=configs/rloo.py
    python -m experiments.launch --config=configs/rloo.py:runlocal
    python -m experiments.launch --config=configs/rloo.py \
      --config.policy_init=runs/sft --config.reward_init=runs/reward

configs/grpo.py with the RLOO choices (Ahmadian et al. 2024; TRL's RLOOTrainer):
a response's advantage is its reward minus the mean reward of the other G - 1
samples of its prompt (no std scaling), and the KL to the SFT policy is taken
out of the sequence reward, r = score - coef * sum_t k1_t, before the baseline,
as in PPO, rather than added to the loss. The same trainer runs it
(rlhf_jax/trainers/grpo.py); the summary's method is "rloo".
"""

from configs import common
from configs import grpo as grpo_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  config = grpo_config.get_config(f"runlocal={arg.runlocal},seed={arg.seed}")

  config.advantage = "rloo"
  config.scale_rewards = False  # unused by "rloo": the leave-one-out baseline is not scaled
  config.kl.mode = "reward"
  config.kl.estimator = "k1"  # the reward uses the sequence sum of k1 whatever this says
  config.kl.coef = 0.05
  return config
