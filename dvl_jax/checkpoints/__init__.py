"""Checkpoints and their storage: loading and saving converted models, the train-state checkpoint manager."""
