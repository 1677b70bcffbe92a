"""The servin-shim daemon: assemble the parts, recover state, serve the CRI, stop gracefully.

Start-up order: directories, database, reaper, image service, runtimes; then reconcile the
records with what runc reports; then open the sockets. Shutdown order (SIGTERM or SIGINT): stop
accepting RPCs, let in-flight RPCs finish for a few seconds, stop reading container output, close
the database. Containers keep running: they belong to the runtime, and a restarted daemon
adopts them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

from grpclib.server import Server

from servin_shim import RUNTIME_NAME, __version__
from servin_shim.config import Settings
from servin_shim.cri.context import Paths, RuntimeContext
from servin_shim.cri.recovery import recover
from servin_shim.cri.service import CRIService
from servin_shim.errors import FailedPrecondition, ServinError
from servin_shim.images.service import ImageService
from servin_shim.network.netns import NetworkNamespaces
from servin_shim.oci.logs import LogRotation
from servin_shim.oci.monitor_client import MonitorClient
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime
from servin_shim.state import Database
from servin_shim.state.metadata import MetadataStore
from servin_shim.streaming import StreamingServer

log = logging.getLogger(__name__)

#: How long in-flight RPCs may run after a stop signal before the server closes anyway.
SHUTDOWN_GRACE = 10.0


def check_socket(path: Path) -> None:
    """Remove a stale socket file; raise FailedPrecondition if a live daemon accepts on it."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        log.info("removing stale socket left by a stopped daemon path=%s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise FailedPrecondition(
        f"another daemon is serving on {path}: stop it first or choose another --cri-socket"
    )


def lock_directory(directory: Path, flag: str) -> int:
    """Take the daemon's lock on a directory; fail if another daemon holds it."""
    fd = os.open(directory / "servin.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"another servin-shim daemon uses {directory} ({flag}): stop it first or give this "
            f"daemon its own {flag}"
        ) from None
    return fd


def build_runtimes(settings: Settings, reaper: Reaper) -> dict[str, OCIRuntime]:
    runtimes: dict[str, OCIRuntime] = {}
    for name, handler in settings.config.spec.runtime.runtime_handlers.items():
        engine = str(handler.runtime_engine)
        if shutil.which(engine) is None:
            log.warning("runtime handler %s is unavailable: %s is not installed", name, engine)
            continue
        runtimes[name] = OCIRuntime(reaper, name=name, binary=engine,
                                    root=Path(str(handler.runtime_root)))
    return runtimes


async def serve(settings: Settings) -> int:
    spec = settings.config.spec
    loop = asyncio.get_running_loop()
    socket_path = Path(settings.cri_socket)

    for directory in (settings.root, settings.state_dir):
        directory.mkdir(parents=True, exist_ok=True)
    # Held for the daemon's lifetime: two daemons on one root would corrupt each other's state.
    locks = [lock_directory(settings.root, "--root"), lock_directory(settings.state_dir,
                                                                      "--state-dir")]
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(socket_path.parent, 0o711)
    check_socket(socket_path)

    reaper = Reaper()
    reaper.install(loop)
    db = Database(settings.root / "servin.db")
    metadata = MetadataStore(db)
    runtimes = build_runtimes(settings, reaper)
    default_handler = spec.container.default_runtime
    if default_handler not in runtimes:
        raise FailedPrecondition(
            f"the default runtime handler {default_handler!r} is not available: install its "
            "binary or set spec.container.defaultRuntime to an installed handler"
        )

    def chain_ids_in_use() -> set[str]:
        # Containers record their layers at create, so an image removed under a running
        # container keeps its snapshots until that container is removed too.
        used: set[str] = set()
        for record in metadata.containers():
            chains = record.extra.get("chain_ids")
            if chains is None:
                image = images.store.get(record.image_id)
                chains = image.chain_ids if image is not None else []
            used.update(chains)
        return used

    images = ImageService(
        settings.root,
        db,
        default_registry=spec.image.default_registry,
        insecure_registries=spec.image.insecure_registries,
        registry_mirrors=spec.image.registry_mirrors,
        pull_timeout=spec.image_service.pull_timeout,
        progress_timeout=spec.image_service.progress_timeout,
        parallel_pulls=spec.image_service.parallel_pulls,
        in_use_chain_ids=chain_ids_in_use,
    )
    sandbox_image = ""
    if spec.pod_sandbox.image_repository:
        sandbox_image = spec.pod_sandbox.image_repository
        if spec.pod_sandbox.image_tag:
            sandbox_image += f":{spec.pod_sandbox.image_tag}"
    monitor = MonitorClient(settings.state_dir, reaper)
    ctx = RuntimeContext(
        paths=Paths(root=settings.root, state=settings.state_dir),
        metadata=metadata,
        reaper=reaper,
        monitor=monitor,
        netns=NetworkNamespaces(settings.state_dir / "netns"),
        images=images,
        runtimes=runtimes,
        default_handler=default_handler,
        sandbox_image=sandbox_image,
        config=spec,
        log_rotation=LogRotation(
            max_size=spec.container.log_max_size, max_files=spec.container.log_max_files
        ),
    )
    service = CRIService(ctx)
    # Like containerd's default stream server: loopback only, on a free port.
    stream_server = StreamingServer(reaper, host="127.0.0.1", port=0)
    service.streaming = stream_server
    await monitor.connect()
    await recover(service)
    # Layers kept for containers whose image was removed, if they went while the daemon was down.
    images.collect_snapshots()

    servers: list[Server] = []
    try:
        await stream_server.start()
        server = Server([service])
        old_umask = os.umask(0o117)
        try:
            await server.start(path=str(socket_path))
        finally:
            os.umask(old_umask)
        servers.append(server)
        os.chmod(socket_path, 0o660)
        if spec.cri_port is not None:
            tcp = Server([service])
            await tcp.start(host=spec.cri_port.host, port=spec.cri_port.port)
            servers.append(tcp)
            log.info("serving CRI over TCP address=%s:%d", spec.cri_port.host,
                     spec.cri_port.port)
    except OSError as exc:
        await _close(servers, stream_server, service, monitor, socket_path)
        raise FailedPrecondition(
            f"cannot listen for CRI requests: {exc}: free the address or change "
            "spec.criPort or --cri-socket"
        ) from exc

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s %s serving CRI on %s (runtimes: %s)", RUNTIME_NAME, __version__, socket_path,
             ", ".join(sorted(runtimes)))
    await stop.wait()

    log.info("stopping: new RPCs get UNAVAILABLE, waiting up to %.0fs for running ones",
             SHUTDOWN_GRACE)
    pending = await service.drain(SHUTDOWN_GRACE)
    if pending:
        log.warning("stopping with %d RPCs still running; their clients see the connection "
                    "close and retry", pending)
    await _close(servers, stream_server, service, monitor, socket_path)
    reaper.uninstall()
    db.close()
    for lock in locks:
        os.close(lock)
    log.info("stopped; containers keep running and are adopted at the next start")
    return 0


async def _close(
    servers: list[Server], stream_server: StreamingServer, service: CRIService,
    monitor: MonitorClient, socket_path: Path,
) -> None:
    """Close the listeners and detach every shim, leaving the containers running."""
    for srv in servers:
        srv.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(srv.wait_closed() for srv in servers)), 5)
    await stream_server.stop()
    # Output that arrives from now on waits in the FIFOs for the next daemon.
    for shim in list(service.containers.shims.values()) + list(service.sandboxes.shims.values()):
        shim.detach()
    await monitor.close()
    socket_path.unlink(missing_ok=True)


def run(settings: Settings) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the process exit code."""
    try:
        return asyncio.run(serve(settings))
    except ServinError as exc:
        log.error("%s", exc)
        return 1
