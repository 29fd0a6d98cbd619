#!/usr/bin/env bash
# The peer benchmark (docs/benchmarks.md): installs TRL and Tunix in their own environments,
# then runs every task side by side with this project (`compare.py`) and prints the table.
#
#   bash benchmarks/peers/run.sh [--runs=3] [--repeats=5] [--tasks=ppo,dpo,...] [--out=FILE]
#
# Run it from the repository root in this project's environment (`pip install -e .`). The
# peers' environments live in $RLHF_JAX_PEERS (default ~/.cache/rlhf_jax/peers) and are made
# once; delete the folder to make them again. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS="${RLHF_JAX_PEERS:-$HOME/.cache/rlhf_jax/peers}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$PEERS"

make_env() {  # name, then one pip install's arguments per remaining argument
  local name="$1"
  shift
  if [ ! -f "$PEERS/$name/.done" ]; then
    echo "# installing $name into $PEERS/$name" >&2
    rm -rf "${PEERS:?}/$name"
    "$PYTHON" -m venv "$PEERS/$name"
    local step
    for step in "$@"; do
      # shellcheck disable=SC2086
      "$PEERS/$name/bin/pip" install -q $step >&2
    done
    touch "$PEERS/$name/.done"
  fi
}

# CPU PyTorch first, so that TRL's dependency on torch does not pull a CUDA build.
make_env trl "torch==2.13.0" "trl==1.16.0 transformers>=4.56 datasets accelerate"
make_env tunix "google-tunix==0.1.7"

"$PYTHON" -m benchmarks.peers.compare \
  --trl_python="$PEERS/trl/bin/python" --tunix_python="$PEERS/tunix/bin/python" "$@"
