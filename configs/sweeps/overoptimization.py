"""PPO under a weak, fixed KL penalty over a long run: the over-optimisation curve.

    python -m experiments.sweep --config=configs/ppo.py \
      --sweep=configs/sweeps/overoptimization.py --workdir=runs/sweep_overopt

Every eval point (every 10 iterations) of each seed's run is a point of gold gain against
sqrt(KL to SFT); the report fits Gao et al. (2022)'s d (alpha - beta log d) to them
(`## Over-optimisation`, overoptimization.png) with its R^2. `steps=`, `coef=`, `seeds=`
change the length, the KL coefficient and the seeds.
"""

from configs import common
from rlhf_jax.sweeps import hyper


def get_sweep(arg=None):
  arg = common.parse_arg(arg, steps=240, coef=0.001, seeds=2)
  return hyper.product(
    [
      hyper.fixed("kl.controller", "fixed"),
      hyper.fixed("kl.init_coef", arg.coef),
      hyper.fixed("total_steps", arg.steps),
      hyper.fixed("eval_every", 10),
      hyper.fixed("checkpoint_every", 40),
      # The monitor's entropy-collapse rule would stop the run (at step 50 with coef 0.001, gold
      # still rising): here it only logs, so the curve goes on; its alerts stay in alerts.jsonl.
      hyper.fixed("monitor.alerts.entropy_collapse.action", "log"),
      hyper.seeds(arg.seeds),
    ]
  )
