"""Images: reference parsing, registry pulls, content store, layer unpacking and image records."""

from __future__ import annotations

from servin_shim.images.reference import Reference, parse_reference
from servin_shim.images.auth import RegistryAuth
from servin_shim.images.service import FsUsage, ImageService
from servin_shim.images.store import ImageRecord

__all__ = [
    "FsUsage",
    "ImageRecord",
    "ImageService",
    "Reference",
    "RegistryAuth",
    "parse_reference",
]
