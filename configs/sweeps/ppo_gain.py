"""What PPO's gold gain over SFT depends on: one lever at a time, against seeds.

    python -m experiments.sweep --config=configs/ppo.py \
      --sweep=configs/sweeps/ppo_gain.py:lever=kl_target --workdir=runs/sweep_kl_target

`lever` picks the knob and its values (the default first):
  kl_target   the adaptive KL controller's target: 6, 3, 12
  rm_members  reward-model members (an ensemble's mean score is the reward): 1, 3
  rm_layers   blocks added on top of the reward model's SFT trunk: 0, 2
  rm_labels   labelled pairs the reward model trains on: 64000, 16000
Each value runs at `seeds` seeds (3); a reward-model lever trains one reward model per value
(the cells of one value share it). The report's `gold_gain_in_sft_std` is the gain in units
of the SFT samples' gold spread; configs/sweeps/ppo_steps.py is the PPO-length lever.
"""

from configs import common
from rlhf_jax.sweeps import hyper

LEVERS = {
  "kl_target": ("kl.target", [6.0, 3.0, 12.0]),
  "rm_members": ("reward.ensemble_size", [1, 3]),
  "rm_layers": ("reward.extra_layers", [0, 2]),
  "rm_labels": ("reward.data.num_train", [64000, 16000]),
}


def get_sweep(arg=None):
  arg = common.parse_arg(arg, lever="kl_target", seeds=3)
  if arg.lever not in LEVERS:
    raise ValueError(f"lever={arg.lever!r}; expected one of {', '.join(LEVERS)}.")
  key, values = LEVERS[arg.lever]
  return hyper.product([hyper.sweep(key, values), hyper.seeds(arg.seeds)])
