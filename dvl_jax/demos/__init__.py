"""Runnable demos: the CPU training demo (`dvl demo`) and the PyTorch logit-parity check (`dvl demo --parity`)."""
