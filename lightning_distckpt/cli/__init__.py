"""The ``distckpt`` command (see ``lightning_distckpt.cli.main``)."""

from lightning_distckpt.cli.main import main

__all__ = ["main"]
