"""Build OCI images in Python and push them to a test registry, without Docker.

``LayerBuilder`` writes a layer tar entry by entry (files, directories, symlinks, hardlinks,
whiteouts, devices) and compresses it with gzip, zstd or nothing. ``make_image`` adds the config
and manifest, ``busybox_image`` makes a small runnable image from Debian's busybox-static, and
``push_image`` / ``push_index`` upload to a registry on 127.0.0.1. Output is deterministic:
the same input gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import httpx
import zstandard

log = logging.getLogger(__name__)

BUSYBOX_BINARY = Path("/usr/bin/busybox")
# A fixed timestamp keeps digests stable between runs (2024-01-01T00:00:00Z).
EPOCH = 1704067200
Compression = Literal["gzip", "zstd", "none"]
Flavor = Literal["oci", "docker"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES: dict[tuple[Flavor, Compression], str] = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_arch() -> str:
    """Return the OCI architecture name of this machine (amd64, arm64, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@dataclass(frozen=True)
class Blob:
    """Bytes with their media type. ``descriptor()`` returns the OCI descriptor."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer:
    """A compressed layer blob and the diff ID (digest of the uncompressed tar)."""

    blob: Blob
    diff_id: str
    tar: bytes


@dataclass(frozen=True)
class Image:
    """An image ready to push: layers, config and manifest blobs."""

    layers: list[Layer]
    config: dict[str, Any]
    config_blob: Blob
    manifest_blob: Blob

    @property
    def id(self) -> str:
        """Image id as servin-shim reports it: the config digest."""
        return self.config_blob.digest

    @property
    def manifest_digest(self) -> str:
        return self.manifest_blob.digest


class LayerBuilder:
    """Builder of one layer tar. Every ``add_*`` method returns self for chaining."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        # Closed by build(), which needs the finished archive.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT
        )

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid = uid
        info.gid = gid
        info.mtime = EPOCH
        return info

    def add_dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> LayerBuilder:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))
        return self

    def add_file(
        self,
        name: str,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        xattrs: dict[str, bytes] | None = None,
        mtime: int = EPOCH,
    ) -> LayerBuilder:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        info.mtime = mtime
        if xattrs:
            info.pax_headers = {
                f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
                for key, value in xattrs.items()
            }
        self._tar.addfile(info, io.BytesIO(data))
        return self

    def add_symlink(self, name: str, target: str) -> LayerBuilder:
        info = self._info(name, tarfile.SYMTYPE, 0o777, 0, 0)
        info.linkname = target
        self._tar.addfile(info)
        return self

    def add_hardlink(self, name: str, target: str) -> LayerBuilder:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = target
        self._tar.addfile(info)
        return self

    def add_whiteout(self, name: str) -> LayerBuilder:
        """Delete ``name`` from lower layers (adds ``<dir>/.wh.<base>``)."""
        parent, _, base = name.rpartition("/")
        return self.add_file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")

    def add_opaque(self, directory: str) -> LayerBuilder:
        """Hide everything lower layers have in ``directory``."""
        return self.add_file(f"{directory}/.wh..wh..opq")

    def add_device(
        self, name: str, kind: Literal["c", "b"], major: int, minor: int, mode: int = 0o666
    ) -> LayerBuilder:
        info = self._info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, 0, 0)
        info.devmajor = major
        info.devminor = minor
        self._tar.addfile(info)
        return self

    def add_fifo(self, name: str, mode: int = 0o644) -> LayerBuilder:
        self._tar.addfile(self._info(name, tarfile.FIFOTYPE, mode, 0, 0))
        return self

    def add_raw(self, info: tarfile.TarInfo, data: bytes = b"") -> LayerBuilder:
        """Add an entry exactly as given, for tests of unsafe archives."""
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data) if data else None)
        return self

    def build(self, compression: Compression = "gzip", flavor: Flavor = "oci") -> Layer:
        self._tar.close()
        return make_layer(self._buffer.getvalue(), compression, flavor)


def make_layer(tar: bytes, compression: Compression = "gzip", flavor: Flavor = "oci") -> Layer:
    """Compress an uncompressed layer tar into a Layer."""
    if compression == "gzip":
        data = gzip.compress(tar, compresslevel=1, mtime=0)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor(level=3).compress(tar)
    else:
        data = tar
    media_type = LAYER_MEDIA_TYPES[(flavor, compression)]
    return Layer(blob=Blob(media_type, data), diff_id=sha256(tar), tar=tar)


def make_image(
    layers: list[Layer],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str = "",
    user: str = "",
    stop_signal: str | None = None,
    labels: dict[str, str] | None = None,
    architecture: str | None = None,
    flavor: Flavor = "oci",
    diff_ids: list[str] | None = None,
) -> Image:
    """Make config and manifest for ``layers``. ``diff_ids`` overrides the real ones for broken images."""
    runtime: dict[str, Any] = {
        "Env": env
        if env is not None
        else ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    }
    if entrypoint is not None:
        runtime["Entrypoint"] = entrypoint
    if cmd is not None:
        runtime["Cmd"] = cmd
    if working_dir:
        runtime["WorkingDir"] = working_dir
    if user:
        runtime["User"] = user
    if stop_signal:
        runtime["StopSignal"] = stop_signal
    if labels:
        runtime["Labels"] = labels
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": architecture or host_arch(),
        "os": "linux",
        "config": runtime,
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids if diff_ids is not None else [layer.diff_id for layer in layers],
        },
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "servin tests"}],
    }
    config_blob = Blob(OCI_CONFIG if flavor == "oci" else DOCKER_CONFIG, _json(config))
    manifest_type = OCI_MANIFEST if flavor == "oci" else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_blob.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    manifest_blob = Blob(manifest_type, _json(manifest))
    return Image(layers, config, config_blob, manifest_blob)


def make_index(images: list[tuple[Image, dict[str, str]]], flavor: Flavor = "oci") -> Blob:
    """Make an index over ``(image, platform)`` pairs, e.g. ``{"os": "linux", "architecture": "arm64"}``."""
    media_type = OCI_INDEX if flavor == "oci" else DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [image.manifest_blob.descriptor(platform=plat) for image, plat in images],
    }
    return Blob(media_type, _json(index))


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def busybox_layer(compression: Compression = "gzip") -> Layer:
    """Return a layer with /bin/busybox, a symlink per applet, /etc/passwd and /etc/group."""
    applets = subprocess.run(
        [str(BUSYBOX_BINARY), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    builder = LayerBuilder()
    for directory in ("bin", "dev", "etc", "home", "proc", "root", "sys", "usr", "usr/bin", "var"):
        builder.add_dir(directory, mode=0o700 if directory == "root" else 0o755)
    builder.add_dir("tmp", mode=0o1777)
    builder.add_dir("home/app", uid=1000, gid=1000)
    builder.add_file("bin/busybox", BUSYBOX_BINARY.read_bytes(), mode=0o755)
    for applet in sorted(set(applets) - {"busybox"}):
        builder.add_symlink(f"bin/{applet}", "busybox")
    # Scripts often start with #!/usr/bin/env.
    builder.add_symlink("usr/bin/env", "/bin/busybox")
    builder.add_file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n"
        b"app:x:1000:1000:app:/home/app:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    builder.add_file("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n")
    return builder.build(compression)


def busybox_image(
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str = "",
    user: str = "",
    stop_signal: str | None = None,
    extra_layers: list[Layer] | None = None,
) -> Image:
    """Return a runnable busybox image whose ``cmd`` defaults to ``["sh"]``."""
    layers = [_busybox_layer_cached(), *(extra_layers or [])]
    return make_image(
        layers,
        entrypoint=entrypoint,
        cmd=cmd if cmd is not None else ["sh"],
        env=env,
        working_dir=working_dir,
        user=user,
        stop_signal=stop_signal,
    )


_BUSYBOX_LAYER: list[Layer] = []


def _busybox_layer_cached() -> Layer:
    # Compressing the 2 MB binary takes a moment, so one copy serves every image of a session.
    if not _BUSYBOX_LAYER:
        _BUSYBOX_LAYER.append(busybox_layer())
    return _BUSYBOX_LAYER[0]


@dataclass
class Pusher:
    """Uploads blobs and manifests to one registry on 127.0.0.1 over plain HTTP.

    With ``https`` set, it uses HTTPS without certificate verification, for a test registry
    with a self-signed certificate.
    """

    host: str
    auth: tuple[str, str] | None = None
    # A ready bearer token, for registries with token auth (see TokenServer.token_for).
    bearer: str | None = None
    https: bool = False
    _client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        if not self.host.startswith(("127.0.0.1:", "localhost:")):
            raise ValueError(f"refusing to push to {self.host}: tests push to 127.0.0.1 only")
        headers = {"Authorization": f"Bearer {self.bearer}"} if self.bearer else {}
        self._client = httpx.Client(
            base_url=f"{'https' if self.https else 'http'}://{self.host}",
            auth=self.auth,
            headers=headers,
            timeout=60,
            verify=not self.https,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def push_blob(self, repository: str, blob: Blob) -> None:
        """Upload a blob with a monolithic POST + PUT, unless the registry has it."""
        head = self._client.head(f"/v2/{repository}/blobs/{blob.digest}")
        if head.status_code == 200:
            return
        start = self._client.post(f"/v2/{repository}/blobs/uploads/")
        start.raise_for_status()
        location = httpx.URL(start.headers["location"])
        upload = self._client.base_url.join(location).copy_merge_params({"digest": blob.digest})
        response = self._client.put(
            upload, content=blob.data, headers={"Content-Type": "application/octet-stream"}
        )
        response.raise_for_status()

    def push_manifest(self, repository: str, reference: str, blob: Blob) -> None:
        response = self._client.put(
            f"/v2/{repository}/manifests/{reference}",
            content=blob.data,
            headers={"Content-Type": blob.media_type},
        )
        response.raise_for_status()

    def push_image(self, repository: str, tag: str, image: Image) -> str:
        """Push layers, config and manifest, and return the reference ``HOST/REPO:TAG``."""
        for layer in image.layers:
            self.push_blob(repository, layer.blob)
        self.push_blob(repository, image.config_blob)
        self.push_manifest(repository, tag, image.manifest_blob)
        return f"{self.host}/{repository}:{tag}"

    def push_index(
        self,
        repository: str,
        tag: str,
        images: list[tuple[Image, dict[str, str]]],
        flavor: Flavor = "oci",
    ) -> Blob:
        """Push every image by digest, then an index of them under ``tag``, and return the index."""
        for image, _ in images:
            for layer in image.layers:
                self.push_blob(repository, layer.blob)
            self.push_blob(repository, image.config_blob)
            self.push_manifest(repository, image.manifest_digest, image.manifest_blob)
        index = make_index(images, flavor)
        self.push_manifest(repository, tag, index)
        return index


def push_image(
    host: str,
    repository: str,
    tag: str,
    image: Image,
    auth: tuple[str, str] | None = None,
    https: bool = False,
) -> str:
    """Push ``image`` to ``host`` and return its reference ``HOST/REPO:TAG``."""
    with Pusher(host, auth, https=https) as pusher:
        return pusher.push_image(repository, tag, image)
