"""The ``distckpt`` command (see :mod:`lightning_distckpt.cli.main`)."""

from lightning_distckpt.cli.main import main

__all__ = ["main"]
