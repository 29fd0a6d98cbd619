"""Runs the peer benchmark side by side and prints the table: `bash benchmarks/peers/run.sh`.

    python -m benchmarks.peers.compare --trl_python=PY --tunix_python=PY [--runs=3]
        [--repeats=5] [--tasks=ppo,dpo,dpo_two_rows,grpo,train_step,decode] [--out=FILE]

For every task and run, this project's side (`ours.py`, in this interpreter) and the peer's
(`tunix_side.py` or `trl_side.py`, in the peer's own interpreter) run one after the other in
fresh processes, so both meet the same machine state; the figure is the median over runs of
each run's median repetition. Prints one JSON line per task (both figures, the ratio: ours
over theirs, higher is better for rates and lower for seconds, the ratio is always "times as
fast") and a Markdown table at the end; `--out` writes the JSON lines to a file too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.peers import shape

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEER = {
  "ppo": "tunix",
  "dpo": "trl",
  "dpo_two_rows": "trl",
  "grpo": "trl",
  "train_step": "torch",
  "decode": "torch",
}


def _args(argv: list[str]) -> dict[str, str]:
  args = {}
  for a in argv:
    key, _, value = a.lstrip("-").partition("=")
    args[key] = value
  return args


def run_side(python: str, script: list[str], task: str, repeats: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)  # one CPU device on both sides
  proc = subprocess.run(
    [python, *script, f"--task={task}", f"--repeats={repeats}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=3600,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    raise SystemExit(f"{' '.join(script)} --task={task} failed:\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1])


def main(argv: list[str]) -> None:
  args = _args(argv)
  runs, repeats = int(args.get("runs", "3")), int(args.get("repeats", "5"))
  tasks = [t for t in args.get("tasks", ",".join(shape.TASKS)).split(",") if t]
  pythons = {"tunix": args.get("tunix_python", ""), "trl": args.get("trl_python", "")}
  pythons["torch"] = pythons["trl"]
  rows = []
  for task in tasks:
    peer = PEER[task]
    if not pythons[peer]:
      print(f"# {task}: skipped, no --{'tunix' if peer == 'tunix' else 'trl'}_python", flush=True)
      continue
    peer_script = [os.path.join(HERE, "tunix_side.py" if peer == "tunix" else "trl_side.py")]
    ours, theirs, meta = [], [], {}
    for _ in range(runs):
      mine = run_side(sys.executable, ["-m", "benchmarks.peers.ours"], task, repeats)
      other = run_side(pythons[peer], peer_script, task, repeats)
      ours.append(mine["value"])
      theirs.append(other["value"])
      meta = {k: v for k, v in other.items() if k not in ("value", "seconds", "task", "unit")}
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = b / a if shape.UNITS[task].startswith("s/") else a / b
    row = dict(
      task=task, unit=shape.UNITS[task], rlhf_jax=a, peer=meta.get("side", peer), peer_value=b,
      ratio=ratio, runs=runs, rlhf_jax_runs=ours, peer_runs=theirs, peer_versions=meta,
    )  # fmt: skip
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.get("out"):
    with open(args["out"], "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  print("\n| task | rlhf_jax | peer | ratio |\n|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['task']} ({r['unit']}) | {r['rlhf_jax']:.3g} | {r['peer']}: {r['peer_value']:.3g} "
      f"| {r['ratio']:.2f} |"
    )


if __name__ == "__main__":
  main(sys.argv[1:])
