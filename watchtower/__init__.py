"""Watchtower: training observability and fault tolerance for PyTorch LLM training.

The package is kept import-light on purpose: `watchtower.hooks` runs inside every training rank and
must not pay for the supervisor, the TUI or torchft when it is imported.
"""

__version__ = "0.1.0"
