"""The image service: pull, list, inspect and remove images, and hand out their layers.

It ties the registry client, the content store, the snapshot store and the image records
together. It speaks plain Python and pydantic types; the CRI layer maps them to protobuf.

Pull pipeline: resolve the reference to a platform manifest on the first endpoint that serves
it (mirrors in order, then the registry unless ``skip_upstream``), and store manifest and
config. Then start all layer downloads, at most ``parallel_pulls`` at a time across the daemon,
and unpack each layer while it downloads, all layers at once, each in its own thread. A layer
waits for the layers below it only when it hardlinks to one of their files. The snapshot is
renamed into place only after both its blob digest and its diff ID check out. Finally write the
image record.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from servin_shim.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServinError,
    Unauthenticated,
    Unavailable,
)
from servin_shim.images.auth import RegistryAuth, TokenCache
from servin_shim.images.content import ContentStore
from servin_shim.images.progress import PullProgress
from servin_shim.images.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API_HOST,
    Reference,
    is_image_id,
    parse_reference,
)
from servin_shim.images.registry import Descriptor, Platform, RegistryClient, ResolvedImage
from servin_shim.images.store import DIGEST, TAG, ImageRecord, ImageStore
from servin_shim.images.unpack import SnapshotStore, UnpackStopped, chain_ids
from servin_shim.state.db import Database

log = logging.getLogger(__name__)

# Short hex strings are valid repository names too ("abc" is docker.io/library/abc), so an id
# prefix is only tried after name lookup fails, and only from this length on.
MIN_ID_PREFIX = 4
_HEX_RE = re.compile(r"^[a-f0-9]+$")
# Errors after which the next endpoint is tried. Errors in the request itself (an invalid
# reference, an unsafe layer) would repeat on every endpoint, so they fail the pull at once.
_ENDPOINT_ERRORS = (Unavailable, NotFound, Unauthenticated, FailedPrecondition)


@dataclass(frozen=True)
class MirrorSettings:
    """Mirror endpoints of one registry, tried in order, and whether to skip the registry."""

    endpoints: tuple[str, ...]
    skip_upstream: bool = False

    @classmethod
    def coerce(cls, value: Any) -> MirrorSettings:
        """Accept a list of endpoints or an object with ``endpoints`` and ``skip_upstream``."""
        if isinstance(value, MirrorSettings):
            return value
        if isinstance(value, str):
            return cls((value,))
        if hasattr(value, "endpoints"):
            endpoints = tuple(str(e) for e in value.endpoints)
            return cls(endpoints, bool(getattr(value, "skip_upstream", False)))
        return cls(tuple(str(e) for e in value))


@dataclass(frozen=True)
class Endpoint:
    """One place to pull from: a mirror or the registry itself."""

    host: str
    scheme: str | None  # None: http for loopback hosts, https otherwise
    is_mirror: bool

    @classmethod
    def from_mirror(cls, text: str) -> Endpoint:
        url = httpx.URL(text if "://" in text else f"//{text}")
        scheme = url.scheme if url.scheme in ("http", "https") else None
        return cls(url.netloc.decode(), scheme, True)


class _LayerBarrier:
    """Completion of each layer of one pull, for unpack threads that need the layers below."""

    def __init__(self, count: int) -> None:
        self._done = [threading.Event() for _ in range(count)]
        self._paths: list[Path | None] = [None] * count
        self._aborted = False

    def finish(self, index: int, fs: Path | None) -> None:
        """Record the snapshot fs of layer ``index``, or None when it failed."""
        self._paths[index] = fs
        self._done[index].set()

    def abort(self) -> None:
        """Wake every waiter; layers not finished by now count as failed."""
        self._aborted = True
        for event in self._done:
            event.set()

    def wait_below(self, index: int) -> list[Path]:
        """Block until the layers below ``index`` are unpacked; return their fs dirs, top first."""
        lowers: list[Path] = []
        for lower in range(index - 1, -1, -1):
            self._done[lower].wait()
            path = self._paths[lower]
            if path is None:
                raise UnpackStopped(f"layer {lower} failed, so layer {index} cannot finish")
            lowers.append(path)
        return lowers


class _SharedPull:
    """A pull task and the number of callers waiting for it."""

    def __init__(self, task: asyncio.Task[str]) -> None:
        self.task = task
        self.waiters = 0


class FsUsage(BaseModel):
    """Disk use of the image filesystem (content store plus snapshots), for ImageFsInfo."""

    mount_point: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


class ImageService:
    """Pulls images into ``root`` and keeps their records in ``db``."""

    def __init__(
        self,
        root: Path,
        db: Database,
        *,
        default_registry: str = "docker.io",
        insecure_registries: Collection[str] = (),
        registry_mirrors: Mapping[str, Sequence[str] | Any] | None = None,
        pull_timeout: float | None = None,
        progress_timeout: float = 60.0,
        parallel_pulls: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        platform: Platform | None = None,
        in_use_chain_ids: Callable[[], Collection[str]] | None = None,
        clean_partial: bool = True,
    ) -> None:
        """Open the image store under ``root``.

        ``registry_mirrors`` maps a registry host to a list of endpoints or to an object with
        ``endpoints`` and ``skip_upstream`` (the config's RegistryMirror). ``progress_timeout``
        cancels a pull that received no bytes for that many seconds. ``clean_partial=False``
        keeps the partial downloads and unpacks of a daemon that may be running, for tools such
        as ``servin-shim image import``.
        """
        if parallel_pulls < 1:
            raise InvalidArgument(f"invalid parallel_pulls {parallel_pulls}: must be at least 1")
        if progress_timeout <= 0:
            raise InvalidArgument(
                f"invalid progress_timeout {progress_timeout}: must be a positive number of seconds"
            )
        self.root = root
        self.default_registry = default_registry
        self.insecure_registries = frozenset(insecure_registries)
        self.registry_mirrors = {
            host: MirrorSettings.coerce(value) for host, value in (registry_mirrors or {}).items()
        }
        self.pull_timeout = pull_timeout
        self.progress_timeout = progress_timeout
        self.parallel_pulls = parallel_pulls
        self.content = ContentStore(root)
        self.snapshots = SnapshotStore(root)
        self.store = ImageStore(db)
        # Tests set transport and platform. The daemon leaves them unset.
        self._transport = transport
        self._platform = platform
        # Containers keep their image layers mounted, so removal must not delete those.
        self._in_use_chain_ids = in_use_chain_ids
        self._tokens = TokenCache()
        self._download_slots = asyncio.Semaphore(parallel_pulls)
        self._pulls: dict[tuple[str, str], _SharedPull] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._pinned_by_pulls: list[set[str]] = []
        if clean_partial:
            self.content.clean_ingest()
            self.snapshots.clean_temp()

    # --- pull ------------------------------------------------------------------------------

    async def pull(self, ref: str, auth: RegistryAuth | None = None) -> str:
        """Pull ``ref`` and return the image id. Concurrent pulls of one reference share work.

        Cancelling the call stops the downloads once no other caller waits for the same pull.
        """
        reference = parse_reference(ref, self.default_registry)
        auth = self._credentials_for(reference, auth)
        key = (str(reference), auth.fingerprint() if auth else "")
        shared = self._pulls.get(key)
        if shared is None:
            shared = _SharedPull(asyncio.create_task(self._pull_with_timeout(reference, auth)))
            self._pulls[key] = shared
            shared.task.add_done_callback(lambda done: self._pull_done(key, done))
        else:
            log.info("joining pull in progress ref=%s", reference)
        shared.waiters += 1
        try:
            # shield: one caller giving up must not cancel the pull that others wait for.
            return await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                log.info("pull cancelled, no caller waits for it ref=%s", reference)
                shared.task.cancel()

    def _credentials_for(
        self, reference: Reference, auth: RegistryAuth | None
    ) -> RegistryAuth | None:
        """Drop credentials whose ``server_address`` names another registry."""
        if auth is None or not auth.server_address:
            return auth
        if _registry_host(auth.server_address) in (reference.registry, reference.api_host):
            return auth
        log.warning(
            "credentials are for another registry, pulling anonymously ref=%s server_address=%s",
            reference,
            auth.server_address,
        )
        return None

    def _pull_done(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        shared = self._pulls.get(key)
        if shared is not None and shared.task is task:
            del self._pulls[key]
        if not task.cancelled() and task.exception() is not None:
            log.info("pull failed ref=%s error=%s", key[0], task.exception())

    async def _pull_with_timeout(self, reference: Reference, auth: RegistryAuth | None) -> str:
        progress = PullProgress(str(reference), self.progress_timeout)
        current = asyncio.current_task()
        assert current is not None
        watcher = asyncio.create_task(progress.watch(current))
        try:
            async with asyncio.timeout(self.pull_timeout):
                image_id = await self._pull_from_endpoints(reference, auth, progress)
        except TimeoutError:
            raise DeadlineExceeded(
                f"pull of {reference} did not finish within {self.pull_timeout} s; "
                "raise imageService.pullTimeout or check the registry"
            ) from None
        except asyncio.CancelledError:
            if not progress.stalled:
                raise
            current.uncancel()
            raise DeadlineExceeded(
                f"pull of {reference} received no data for {self.progress_timeout} s from "
                f"{progress.endpoint or reference.registry}; check the registry or raise the "
                "progress timeout"
            ) from None
        finally:
            watcher.cancel()
        progress.log_line("image pulled")
        return image_id

    def _endpoints(self, reference: Reference) -> list[Endpoint]:
        """Return the endpoints to try in order: mirrors, then the registry itself."""
        mirrors = self.registry_mirrors.get(reference.registry)
        if mirrors is None:
            return [Endpoint(reference.api_host, None, False)]
        endpoints = [Endpoint.from_mirror(text) for text in mirrors.endpoints]
        if not mirrors.skip_upstream:
            endpoints.append(Endpoint(reference.api_host, None, False))
        return endpoints

    async def _pull_from_endpoints(
        self, reference: Reference, auth: RegistryAuth | None, progress: PullProgress
    ) -> str:
        endpoints = self._endpoints(reference)
        if not endpoints:
            raise FailedPrecondition(
                f"no endpoint to pull {reference} from: the mirrors of {reference.registry} set "
                "skipUpstream but list no endpoints"
            )
        last_error: ServinError | None = None
        for endpoint in endpoints:
            progress.endpoint = endpoint.host
            client = RegistryClient(
                endpoint.host,
                insecure_registries=self.insecure_registries,
                # Credentials belong to the registry they were given for, never to a mirror.
                auth=None if endpoint.is_mirror else auth,
                token_cache=self._tokens,
                timeout=self.progress_timeout,
                transport=self._transport,
                platform=self._platform,
                scheme=endpoint.scheme,
            )
            async with client:
                try:
                    resolved = await client.resolve(reference)
                    image_id = await self._fetch_image(client, reference, resolved, progress)
                except _ENDPOINT_ERRORS as exc:
                    if endpoint == endpoints[-1]:
                        if last_error is None:
                            raise
                        raise type(exc)(
                            f"pull of {reference} failed on every endpoint "
                            f"({', '.join(e.host for e in endpoints)}); last error: {exc}"
                        ) from exc
                    last_error = exc
                    log.warning(
                        "endpoint failed, trying the next one ref=%s endpoint=%s error=%s",
                        reference,
                        endpoint.host,
                        exc,
                    )
                    continue
            log.info(
                "image served ref=%s endpoint=%s mirror=%s image_id=%s",
                reference,
                endpoint.host,
                endpoint.is_mirror,
                image_id,
            )
            return image_id
        raise AssertionError("unreachable: the last endpoint returns or raises")

    async def _fetch_image(
        self,
        client: RegistryClient,
        reference: Reference,
        resolved: ResolvedImage,
        progress: PullProgress,
    ) -> str:
        for digest, body in resolved.documents.items():
            self.content.write_bytes(body, digest)
        busy: set[str] = set(resolved.documents) | {resolved.config.digest}
        busy.update(layer.digest for layer in resolved.layers)
        self._pinned_by_pulls.append(busy)
        try:
            if not self.content.has(resolved.config.digest):
                progress.bytes_total += resolved.config.size
            await self._fetch_blob(client, reference.repository, resolved.config, progress)
            config = self.content.read_json(resolved.config.digest)
            diff_ids = config_diff_ids(reference, config, len(resolved.layers))
            chains = chain_ids(diff_ids)
            busy.update(chains)
            progress.layers_total = len(resolved.layers)
            progress.bytes_total += sum(
                layer.size
                for layer, chain in zip(resolved.layers, chains, strict=True)
                if not self.snapshots.has(chain) and not self.content.has(layer.digest)
            )
            await self._fetch_layers(client, reference, resolved.layers, diff_ids, chains, progress)
        finally:
            self._pinned_by_pulls.remove(busy)

        names: list[tuple[str, str]] = []
        tagged = reference.with_tag()
        if tagged:
            names.append((tagged, TAG))
        names.append((reference.with_digest(resolved.digest), DIGEST))
        return self.save_image(resolved, config, chains, names)

    def save_image(
        self,
        resolved: ResolvedImage,
        config: dict[str, Any],
        chains: builtins.list[str],
        names: builtins.list[tuple[str, str]],
    ) -> str:
        """Write the record of an image whose blobs and snapshots are in place; return its id.

        ``names`` are (name, TAG or DIGEST) pairs. An image that loses its last name to this
        one is removed.
        """
        record = ImageRecord(
            id=resolved.config.digest,
            size=resolved.config.size + sum(layer.size for layer in resolved.layers),
            manifest_digest=resolved.manifest_digest,
            config=config,
            chain_ids=chains,
            blobs=[
                *resolved.documents,
                resolved.config.digest,
                *(layer.digest for layer in resolved.layers),
            ],
        )
        for orphan in self.store.save(record, names):
            self._delete_record(orphan)
        return record.id

    async def _fetch_layers(
        self,
        client: RegistryClient,
        reference: Reference,
        layers: list[Descriptor],
        diff_ids: list[str],
        chains: list[str],
        progress: PullProgress,
    ) -> None:
        """Download and unpack all layers at once; the first failure stops the others."""
        barrier = _LayerBarrier(len(layers))
        tasks = [
            asyncio.create_task(
                self._fetch_layer(
                    client,
                    reference,
                    index,
                    layer,
                    diff_ids[index],
                    chains[index],
                    barrier,
                    progress,
                )
            )
            for index, layer in enumerate(layers)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            barrier.abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_layer(
        self,
        client: RegistryClient,
        reference: Reference,
        index: int,
        layer: Descriptor,
        diff_id: str,
        chain: str,
        barrier: _LayerBarrier,
        progress: PullProgress,
    ) -> None:
        fs: Path | None = None
        try:
            async with self._lock(f"snapshot:{chain}"):
                # A layer whose snapshot exists needs no download at all.
                if self.snapshots.has(chain):
                    fs = self.snapshots.fs(chain)
                elif self.content.has(layer.digest):
                    fs = await self.snapshots.unpack(
                        chain,
                        self.content.path(layer.digest),
                        diff_id,
                        lambda: barrier.wait_below(index),
                        on_entry=progress.touch,
                    )
                else:
                    fs = await self._stream_layer(
                        client, reference, index, layer, diff_id, chain, barrier, progress
                    )
        finally:
            barrier.finish(index, fs)
        progress.layer_done()

    async def _stream_layer(
        self,
        client: RegistryClient,
        reference: Reference,
        index: int,
        layer: Descriptor,
        diff_id: str,
        chain: str,
        barrier: _LayerBarrier,
        progress: PullProgress,
    ) -> Path:
        """Unpack a layer while it downloads, and keep the snapshot only if the blob checks out."""
        follower = self.content.follow(layer.digest, layer.size)
        unpack = asyncio.create_task(
            self.snapshots.unpack(
                chain, follower, diff_id, lambda: barrier.wait_below(index), progress.touch
            )
        )
        try:
            await self._fetch_blob(client, reference.repository, layer, progress)
            follower.finish()
        except BaseException:
            # The unpack thread may wait for bytes that will never come.
            follower.fail(f"download of blob {layer.digest} failed")
            unpack.cancel()
            await asyncio.gather(unpack, return_exceptions=True)
            raise
        finally:
            self.content.unfollow(follower)
        return await unpack

    async def _fetch_blob(
        self,
        client: RegistryClient,
        repository: str,
        blob: Descriptor,
        progress: PullProgress,
    ) -> None:
        async with self._lock(f"blob:{blob.digest}"):
            if self.content.has(blob.digest):
                log.debug("blob present, skipping download digest=%s", blob.digest)
                return
            async with self._download_slots:
                await client.fetch_blob(repository, blob, self.content, progress.add_bytes)

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    # --- queries ---------------------------------------------------------------------------

    def list(self, filter_ref: str | None = None) -> builtins.list[ImageRecord]:
        """Return all images, or the one ``filter_ref`` resolves to."""
        if not filter_ref:
            return self.store.all()
        record = self.status(filter_ref)
        return [record] if record else []

    def status(self, ref_or_id: str, *, strict: bool = False) -> ImageRecord | None:
        """Return the image for an id, id prefix, tag, digest reference or short name.

        With ``strict``, text that is neither an image id, an id prefix nor a valid reference
        raises InvalidArgument instead of returning None.
        """
        resolved = self._resolve(ref_or_id, strict=strict)
        return self.store.get(resolved[0]) if resolved else None

    def _resolve(
        self, ref_or_id: str, *, strict: bool = False
    ) -> tuple[str, str | None] | None:
        """Return (image id, name used) where name is None when resolved by id."""
        text = ref_or_id.strip()
        if is_image_id(text):
            image_id = text if text.startswith("sha256:") else f"sha256:{text}"
            return (image_id, None) if self.store.get(image_id) else None
        try:
            reference = parse_reference(text, self.default_registry)
        except InvalidArgument:
            if strict and not _HEX_RE.match(text.removeprefix("sha256:")):
                raise
            reference = None
        if reference is not None:
            name = (
                reference.with_digest(reference.digest)
                if reference.digest
                else reference.with_tag()
            )
            found = self.store.find_name(name) if name else None
            if found:
                return found[0], name
        prefix = text.removeprefix("sha256:")
        if len(prefix) >= MIN_ID_PREFIX and _HEX_RE.match(prefix):
            matches = self.store.ids_with_prefix(f"sha256:{prefix}")
            if len(matches) == 1:
                return matches[0], None
        return None

    def config(self, image_id: str) -> dict[str, Any]:
        """Return the OCI image config (``config.Entrypoint``, ``Cmd``, ``Env`` and so on)."""
        return self._require(image_id).config

    def rootfs_layers(self, image_id: str) -> builtins.list[Path]:
        """Return the snapshot fs directories of an image, bottom layer first."""
        record = self._require(image_id)
        layers = [self.snapshots.fs(chain) for chain in record.chain_ids]
        for chain, layer in zip(record.chain_ids, layers, strict=True):
            if not layer.is_dir():
                raise FailedPrecondition(
                    f"layer {chain} of image {image_id} is missing on disk; pull the image again"
                )
        return layers

    def pin(self, image_id: str, pinned: bool = True) -> None:
        """Mark an image as pinned (the kubelet's image GC skips pinned images)."""
        self._require(image_id)
        self.store.set_pinned(image_id, pinned)

    async def fs_info(self) -> FsUsage:
        """Measure the disk use of content and snapshots (walks the trees in a thread)."""
        content, snapshots = await asyncio.gather(
            asyncio.to_thread(self.content.usage), asyncio.to_thread(self.snapshots.usage)
        )
        return FsUsage(
            mount_point=str(self.root),
            used_bytes=content.used_bytes + snapshots.used_bytes,
            inodes_used=content.inodes_used + snapshots.inodes_used,
            timestamp_ns=time.time_ns(),
        )

    def _require(self, image_id: str) -> ImageRecord:
        record = self.store.get(image_id)
        if record is None:
            raise NotFound(f"image {image_id} not found; pull it first")
        return record

    # --- removal ---------------------------------------------------------------------------

    async def remove(self, ref_or_id: str) -> None:
        """Remove a tag, or the whole image when given its id, a digest or its last tag.

        An unknown image is not an error. Blobs and snapshots that no other image, running
        pull or container uses are deleted.
        """
        resolved = self._resolve(ref_or_id)
        if resolved is None:
            log.info("remove of unknown image ignored ref=%s", ref_or_id)
            return
        image_id, name = resolved
        if name is not None and (self.store.find_name(name) or ("", ""))[1] == TAG:
            self.store.remove_name(name)
            remaining_tags = [n for n, kind in self.store.names(image_id) if kind == TAG]
            if remaining_tags:
                log.info("image tag removed name=%s image_id=%s", name, image_id)
                return
        self._delete_record(image_id)
        log.info("image removed image_id=%s ref=%s", image_id, ref_or_id)

    def _delete_record(self, image_id: str) -> None:
        record = self.store.get(image_id)
        if record is None:
            return
        # Ask for the layers containers use before the record goes: the callback may look the
        # containers' images up in this store.
        in_use = set(self._in_use_chain_ids()) if self._in_use_chain_ids is not None else set()
        self.store.delete(image_id)
        blobs, chains = self.store.referenced()
        for busy in self._pinned_by_pulls:
            blobs |= busy
            chains |= busy
        chains |= in_use
        for digest in record.blobs:
            if digest not in blobs:
                self.content.delete(digest)
        for chain in record.chain_ids:
            if chain not in chains:
                self.snapshots.delete(chain)

    def collect_snapshots(self) -> builtins.list[str]:
        """Delete snapshots that no image and no container uses; return their chain IDs.

        A container keeps the layers of an image removed while it ran, so they are freed here
        once the container is gone. Blobs are left alone: a layer blob without an image may be
        waiting for an interrupted pull to resume.
        """
        _, chains = self.store.referenced()
        for busy in self._pinned_by_pulls:
            chains |= busy
        if self._in_use_chain_ids is not None:
            chains |= set(self._in_use_chain_ids())
        freed = [chain for chain in self.snapshots.chain_ids() if chain not in chains]
        for chain in freed:
            self.snapshots.delete(chain)
        if freed:
            log.info("freed snapshots no image or container uses count=%d", len(freed))
        return freed


def config_diff_ids(reference: Reference | str, config: Any, layer_count: int) -> list[str]:
    """Return ``rootfs.diff_ids`` from an image config after checking it fits the manifest."""
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArgument(f"invalid image config of {reference}: missing rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise InvalidArgument(
            f"invalid image {reference}: the config lists {len(diff_ids)} diff IDs but the "
            f"manifest has {layer_count} layers"
        )
    return list(diff_ids)


def _registry_host(server_address: str) -> str:
    """Return the registry host of a credentials' ``server_address`` (a host or a URL)."""
    url = httpx.URL(server_address if "://" in server_address else f"//{server_address}")
    host = url.netloc.decode() or server_address
    if host in ("index.docker.io", DOCKER_HUB_API_HOST):
        return DOCKER_HUB
    return host
