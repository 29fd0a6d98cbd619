"""Ablation sweeps: grids of config values over seeds, run and reported with statistics."""
