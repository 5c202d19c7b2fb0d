"""Helpers shared by the tests: checkpoints, tokenizers, fake engines, Serve and load-generation utilities."""
