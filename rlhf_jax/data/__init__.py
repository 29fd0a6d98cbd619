"""Tokenizer, dataset builders, loaders and the synthetic testbed."""
