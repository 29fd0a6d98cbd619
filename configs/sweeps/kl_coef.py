"""PPO's KL coefficient (held fixed) against seeds: the KL trade-off with intervals.

    python -m experiments.sweep --config=configs/ppo.py --sweep=configs/sweeps/kl_coef.py
    python -m experiments.sweep --config=configs/ppo.py:runlocal \
      --sweep=configs/sweeps/kl_coef.py:runlocal --workdir=/tmp/sweep_kl

Every cell shares one SFT policy and one reward model (the seeds vary PPO's sampling and
initialisation only); `seeds=N` sets the number of seeds, `upstream` also varies the SFT and
reward-model seeds with PPO's (each seed then trains its own SFT and reward model).
"""

from configs import common
from rlhf_jax.sweeps import hyper


def get_sweep(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seeds=3, upstream=False)
  values = (0.01, 0.1) if arg.runlocal else (0.005, 0.05, 0.2)
  seeds = hyper.seeds(arg.seeds)
  if arg.upstream:
    seeds = hyper.zipit(
      [seeds, hyper.seeds(arg.seeds, "sft.seed"), hyper.seeds(arg.seeds, "reward.seed")]
    )
  return hyper.product(
    [
      hyper.fixed("kl.controller", "fixed"),
      hyper.sweep("kl.init_coef", values),
      seeds,
    ]
  )
