"""PPO's length against seeds: how far the gold gain over SFT goes with more iterations.

    python -m experiments.sweep --config=configs/ppo.py --sweep=configs/sweeps/ppo_steps.py

The default PPO run (60 iterations, adaptive KL) and one twice as long, each at 3 seeds, on
one shared SFT policy and reward model; `steps=60-120-240` picks the lengths, `seeds=N` the
seeds. The report gives each length's gold gain with its interval, and the gain in units of
the SFT samples' gold spread (`gold_gain_in_sft_std`).
"""

from configs import common
from rlhf_jax.sweeps import hyper


def get_sweep(arg=None):
  arg = common.parse_arg(arg, steps="60-120", seeds=3)
  steps = [int(s) for s in arg.steps.split("-")]
  return hyper.product([hyper.sweep("total_steps", steps), hyper.seeds(arg.seeds)])
