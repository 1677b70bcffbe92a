"""Persistent metadata of sandboxes, containers and images, kept in SQLite under the daemon's root."""

from servin_shim.state.db import Database

__all__ = ["Database"]
