"""Pure functions for RL on language models: sampling, losses, advantages, KL."""
