"""The `dvl` command line: `commands` registers and dispatches, `generate` and `bench` hold their subcommands."""

from dvl_jax.cli.commands import main

__all__ = ["main"]
