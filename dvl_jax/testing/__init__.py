"""Helpers that build tiny random models, configs and checkpoints for tests, demos and notebooks (no downloads)."""
