"""Entry points for running experiments: `python -m experiments.launch --config=...`."""
