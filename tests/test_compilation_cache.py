"""The persistent compilation cache the launcher turns on, and the stage time table."""

import json
import os
import subprocess
import sys

from rlhf_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_folder_follows_the_environment():
  home = os.path.expanduser("~")
  default = os.path.join(home, ".cache", "rlhf_jax", "jax_compilation")
  assert config_utils.compilation_cache_dir({}) == default
  assert config_utils.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}) == (
    "/x/rlhf_jax/jax_compilation"
  )
  assert config_utils.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
  ours = {"RLHF_JAX_COMPILATION_CACHE": "/mine", "JAX_COMPILATION_CACHE_DIR": "/j"}
  assert config_utils.compilation_cache_dir(ours) == "/mine"
  for off in ("off", "0", "OFF", "false", "none"):
    env = {"RLHF_JAX_COMPILATION_CACHE": off, "JAX_COMPILATION_CACHE_DIR": "/j"}
    assert config_utils.compilation_cache_dir(env) is None
  assert config_utils.enable_compilation_cache(None) is None


_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from rlhf_jax import config_utils
hits = []
monitoring.register_event_listener(
  lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
)
config_utils.enable_compilation_cache(config_utils.compilation_cache_dir())
x = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(jnp.ones((64, 64)))
print(len(hits), float(x))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["RLHF_JAX_COMPILATION_CACHE"] = str(tmp_path / "cache")
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # the library's own default
  outs = []
  for _ in range(2):
    proc = subprocess.run(
      [sys.executable, "-c", _PROGRAM], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(proc.stdout.split())
  assert outs[0][0] == "0" and int(outs[1][0]) >= 1  # cold, then a hit
  assert outs[0][1] == outs[1][1]  # the same executable, the same result
  assert os.listdir(tmp_path / "cache")


def test_run_writes_the_stage_times(tmp_path):
  config = config_utils.load_config(os.path.join(REPO, "tests/fixtures/dummy_config.py:runlocal"))
  config_utils.run(config, str(tmp_path))
  with open(tmp_path / config_utils.TIMING_FILENAME) as f:
    record = json.load(f)
  [stage] = record["stages"]
  assert stage["stage"] == "tests.fixtures.dummy_trainer" and not stage["reused"]
  assert stage["seconds"] >= 0 and record["total_s"] == stage["seconds"]
  table = config_utils.timing_table(
    [
      dict(stage="sft", workdir="w/sft", seconds=0.0, reused=True),
      dict(stage="ppo", workdir="w", seconds=125.0, reused=False),
    ]
  )
  assert table.splitlines() == [
    "  sft            reused  w/sft",
    "  ppo             2m05s  w",
    "  total           2m05s",
  ]
