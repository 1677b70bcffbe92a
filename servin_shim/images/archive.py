"""Import of image archives into the image store: OCI image layouts and ``docker save`` output.

An OCI layout archive is a tar with ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``.
A ``docker save`` archive has ``manifest.json`` listing each image's config file, layer tars
and RepoTags. Every blob is checked against its digest on the way into the content store, the
layers are unpacked into snapshots like pulled ones, and the images get their names.

Docker archives carry no registry manifest, so the import writes an OCI manifest for each image.
Its digest is the record's manifest digest, and no digest name (``repo@sha256:...``) is added
because no registry serves that manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from servin_shim.errors import InvalidArgument, NotFound
from servin_shim.images.content import digest_hex, sha256_digest
from servin_shim.images.reference import parse_reference
from servin_shim.images.registry import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Platform,
    ResolvedImage,
    host_platform,
)
from servin_shim.images.service import ImageService, config_diff_ids
from servin_shim.images.store import DIGEST, TAG
from servin_shim.images.unpack import chain_ids

log = logging.getLogger(__name__)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ImportedImage:
    """One image an import added: its id and the names it got."""

    id: str
    names: list[str]


async def import_archive(
    service: ImageService, path: Path, platform: Platform | None = None
) -> list[ImportedImage]:
    """Import every image of the archive at ``path`` and return what was added."""
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed below
    except (OSError, tarfile.TarError) as exc:
        raise InvalidArgument(f"cannot read image archive {path}: {exc}") from exc
    with archive:
        members = {_normal(m.name): m for m in archive.getmembers() if m.isfile()}
        reader = _ArchiveReader(path, archive, members)
        if "index.json" in members:
            images = await _import_oci(service, reader, platform or host_platform())
        elif "manifest.json" in members:
            images = await _import_docker(service, reader)
        else:
            raise InvalidArgument(
                f"{path} is neither an OCI image layout (no index.json) nor a docker save "
                "archive (no manifest.json)"
            )
    for image in images:
        log.info("image imported archive=%s image_id=%s names=%s", path, image.id, image.names)
    return images


class _ArchiveReader:
    """Random access to the regular files of an uncompressed or compressed tar."""

    def __init__(
        self, path: Path, archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo]
    ) -> None:
        self.path = path
        self.archive = archive
        self.members = members

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(_normal(name))
        if member is None:
            raise NotFound(f"image archive {self.path} has no file {name!r}")
        handle = self.archive.extractfile(member)
        if handle is None:
            raise InvalidArgument(f"image archive {self.path}: {name!r} is not a regular file")
        return handle

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise InvalidArgument(f"image archive {self.path}: {name} is not JSON: {exc}") from exc

    def size(self, name: str) -> int:
        return self.members[_normal(name)].size

    def digest(self, name: str) -> str:
        """Hash a member without storing it, for docker archives whose names are not digests."""
        hasher = hashlib.sha256()
        with self.open(name) as handle:
            while chunk := handle.read(_READ_CHUNK):
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()

    def store(self, service: ImageService, name: str, digest: str) -> None:
        """Copy a member into the content store, verified against ``digest``."""
        if service.content.has(digest):
            return
        with self.open(name) as handle, service.content.writer(digest, self.size(name)) as out:
            while chunk := handle.read(_READ_CHUNK):
                out.write(chunk)
            out.commit()


def _normal(name: str) -> str:
    return posixpath.normpath(name).lstrip("/")


def _blob_name(digest: str) -> str:
    algorithm, _, _ = digest.partition(":")
    return f"blobs/{algorithm}/{digest_hex(digest)}"


# --- OCI image layout ---------------------------------------------------------------------


async def _import_oci(
    service: ImageService, reader: _ArchiveReader, platform: Platform
) -> list[ImportedImage]:
    index = reader.json("index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f"image archive {reader.path}: index.json has no manifests list")
    images: dict[str, ImportedImage] = {}
    for raw in entries:
        top = Descriptor.from_json(raw, f"index.json of {reader.path}")
        annotations = raw.get("annotations") or {}
        name = _oci_name(annotations, service.default_registry)
        reader.store(service, _blob_name(top.digest), top.digest)
        documents = {top.digest: service.content.read_bytes(top.digest)}
        manifest_descriptor = top
        if top.media_type in INDEX_TYPES:
            manifest_descriptor = _choose(reader, service, top, platform)
            reader.store(
                service, _blob_name(manifest_descriptor.digest), manifest_descriptor.digest
            )
            documents[manifest_descriptor.digest] = service.content.read_bytes(
                manifest_descriptor.digest
            )
        elif top.platform is not None and not top.platform.matches(platform):
            log.info(
                "skipping manifest for another platform archive=%s digest=%s platform=%s",
                reader.path,
                top.digest,
                top.platform,
            )
            continue
        manifest = service.content.read_json(manifest_descriptor.digest)
        config, layers = _manifest_parts(reader, manifest, manifest_descriptor.digest)
        resolved = ResolvedImage(top.digest, manifest_descriptor.digest, documents, config, layers)
        for descriptor in (config, *layers):
            reader.store(service, _blob_name(descriptor.digest), descriptor.digest)
        names: list[tuple[str, str]] = []
        if name is not None:
            names = [(name, TAG), (f"{name.rsplit(':', 1)[0]}@{top.digest}", DIGEST)]
        image_id = await _finish(service, reader, resolved, names)
        known = images.get(image_id)
        merged = (known.names if known else []) + [n for n, _ in names]
        images[image_id] = ImportedImage(image_id, merged)
    return list(images.values())


def _oci_name(annotations: dict[str, Any], default_registry: str) -> str | None:
    """Return the tagged name an index entry carries, or None for an unnamed image."""
    full = annotations.get(CONTAINERD_NAME_ANNOTATION)
    if isinstance(full, str) and full:
        return parse_reference(full, default_registry).with_tag()
    ref_name = annotations.get(REF_NAME_ANNOTATION)
    if not isinstance(ref_name, str) or not ref_name:
        return None
    # The image spec allows a bare tag ("1.0") as ref.name, which names no repository.
    if "/" not in ref_name and ":" not in ref_name:
        return None
    return parse_reference(ref_name, default_registry).with_tag()


def _choose(
    reader: _ArchiveReader, service: ImageService, index: Descriptor, platform: Platform
) -> Descriptor:
    document = service.content.read_json(index.digest)
    available: list[str] = []
    for raw in document.get("manifests") or []:
        descriptor = Descriptor.from_json(raw, f"index {index.digest} in {reader.path}")
        if descriptor.platform is None:
            continue
        available.append(str(descriptor.platform))
        if descriptor.platform.matches(platform):
            return descriptor
    raise NotFound(
        f"image index {index.digest} in {reader.path} has no manifest for platform {platform}; "
        f"available: {', '.join(available) or 'none'}"
    )


def _manifest_parts(
    reader: _ArchiveReader, manifest: Any, digest: str
) -> tuple[Descriptor, list[Descriptor]]:
    where = f"manifest {digest} in {reader.path}"
    if not isinstance(manifest, dict):
        raise InvalidArgument(f"invalid {where}: not a JSON object")
    config = Descriptor.from_json(manifest.get("config"), where)
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArgument(
            f"{where} is not a container image: its config type is {config.media_type!r}"
        )
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"invalid {where}: 'layers' is not a list")
    return config, [Descriptor.from_json(item, where) for item in raw_layers]


# --- docker save --------------------------------------------------------------------------


async def _import_docker(service: ImageService, reader: _ArchiveReader) -> list[ImportedImage]:
    entries = reader.json("manifest.json")
    if not isinstance(entries, list):
        raise InvalidArgument(f"image archive {reader.path}: manifest.json is not a list")
    images: list[ImportedImage] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArgument(
                f"image archive {reader.path}: a manifest.json entry has no Config"
            )
        config_name = entry["Config"]
        config_digest = reader.digest(config_name)
        reader.store(service, config_name, config_digest)
        config = Descriptor(MEDIA_DOCKER_CONFIG, config_digest, reader.size(config_name))
        layers: list[Descriptor] = []
        for layer_name in entry.get("Layers") or []:
            digest = reader.digest(layer_name)
            reader.store(service, layer_name, digest)
            media_type = _layer_media_type(service, digest)
            layers.append(Descriptor(media_type, digest, reader.size(layer_name)))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {
                "mediaType": config.media_type,
                "digest": config.digest,
                "size": config.size,
            },
            "layers": [
                {"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in layers
            ],
        }
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest_digest = service.content.write_bytes(body, sha256_digest(body))
        resolved = ResolvedImage(
            manifest_digest, manifest_digest, {manifest_digest: body}, config, layers
        )
        names = [
            (parse_reference(tag, service.default_registry).with_tag() or tag, TAG)
            for tag in entry.get("RepoTags") or []
        ]
        image_id = await _finish(service, reader, resolved, names)
        images.append(ImportedImage(image_id, [name for name, _ in names]))
    return images


def _layer_media_type(service: ImageService, digest: str) -> str:
    with open(service.content.path(digest), "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"\x1f\x8b"):
        return MEDIA_OCI_LAYER_GZIP
    if magic == b"\x28\xb5\x2f\xfd":
        return MEDIA_OCI_LAYER_ZSTD
    return MEDIA_OCI_LAYER


# --- shared -------------------------------------------------------------------------------


async def _finish(
    service: ImageService,
    reader: _ArchiveReader,
    resolved: ResolvedImage,
    names: list[tuple[str, str]],
) -> str:
    """Unpack the layers of an imported image and write its record."""
    config = service.content.read_json(resolved.config.digest)
    if not isinstance(config, dict):
        raise InvalidArgument(f"image config {resolved.config.digest} in {reader.path} is invalid")
    diff_ids = config_diff_ids(str(reader.path), config, len(resolved.layers))
    chains = chain_ids(diff_ids)
    lowers: list[Path] = []
    for layer, diff_id, chain in zip(resolved.layers, diff_ids, chains, strict=True):
        fs = await service.snapshots.unpack(
            chain, service.content.path(layer.digest), diff_id, lowers
        )
        lowers.insert(0, fs)
    return service.save_image(resolved, config, chains, names)
