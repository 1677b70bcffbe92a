"""The servin-shim command line (typer) and the process-wide logging setup."""

from __future__ import annotations

from servin_shim.cli.logging import configure_logging

__all__ = ["configure_logging"]
