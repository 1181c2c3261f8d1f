"""The command lines: one module of common options and the exit path, a thin module per command."""
