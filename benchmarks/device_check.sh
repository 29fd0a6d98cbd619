#!/usr/bin/env bash
# The project's accelerator figures (docs/benchmarks.md): the sharding and sampler tests on
# the device, train-step MFU, decode against the memory roofline and one PPO iteration's
# time split, one JSON line each on stdout, logs on stderr.
#
#   bash benchmarks/device_check.sh                  # full size on a GPU/TPU, tiny on CPU
#   bash benchmarks/device_check.sh --size=tiny      # the CI run: well under a minute
#
# Arguments go to `python -m benchmarks.device_check`. PYTHON picks the interpreter;
# by default the active one, or the repository's .venv when none is active.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python
  fi
fi
exec "${PYTHON}" -m benchmarks.device_check "$@"
