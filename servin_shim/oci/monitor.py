"""The exit monitor: one small process that outlives the daemon and records container exits.

A daemon that is the only parent of its containers cannot learn the exit code of a container
that exits while the daemon is down: the kernel reports the status to the parent of that moment.
So the daemon sends this process each ``runc create`` to run. The monitor is a child subreaper, so
when ``runc create`` exits the container's init process becomes the monitor's child, and the
monitor collects its exit status, writes it to ``<state>/exits/<container id>`` and tells the
connected daemon. A restarted daemon reads the files it missed. CRI-O's conmon plays this role
with one process per container; one monitor for all containers keeps the memory cost fixed.

The monitor uses only the standard library and no asyncio, to stay small (its resident size is
measured in benchmarks/monitor_memory.py). It exits once no daemon is connected and it has no
container left to watch; the daemon starts it again when needed.

Protocol: JSON lines over the unix socket ``<state>/monitor.sock``.

- daemon -> monitor ``{"op": "create", "id", "argv", "stdin", "stdout", "stderr", "pid_file"}``:
  run ``argv`` (a ``runc create`` command line) with its stdio opened from the given paths
  (``stdout`` and ``stderr`` read-write, so a FIFO keeps a reader; see oci/io.py) and reply
  ``{"op": "created", "id", "code", "pid"}`` where ``pid`` is the container's init pid read from
  ``pid_file`` (0 when create failed). With ``"console_socket": PATH`` the container has a
  terminal: the monitor listens on PATH, which ``argv`` names in ``--console-socket``, receives
  the pty master from the runtime and copies the terminal's output into ``stdout``.
- monitor -> daemon ``{"op": "exit", "id", "code", "finished_at"}`` when a watched init exits.
- daemon -> monitor ``{"op": "release", "id"}`` once the daemon has stored the exit and read the
  last output.

The monitor also holds each container's stdout and stderr FIFOs open until that release: a
pipe whose last holder closes it drops its buffered bytes, so without this hold the output of a
container that exits while no daemon runs would be lost with it.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36

#: How long the monitor lingers without a daemon and without containers before it exits.
IDLE_EXIT_SECONDS = 5.0


def exit_file(state_dir: Path, container_id: str) -> Path:
    return state_dir / "exits" / container_id


def write_exit(state_dir: Path, container_id: str, code: int, finished_at: int) -> None:
    """Record an exit atomically, so a reader never sees half a file."""
    directory = state_dir / "exits"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{container_id}.tmp"
    with open(tmp, "w") as f:
        json.dump({"code": code, "finished_at": finished_at}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / container_id)


def read_exit(state_dir: Path, container_id: str) -> tuple[int, int] | None:
    """Return ``(code, finished_at)`` recorded for a container, or None."""
    try:
        data = json.loads(exit_file(state_dir, container_id).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return int(data["code"]), int(data["finished_at"])


def _status_to_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Monitor:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / "monitor.sock"
        self.selector = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytearray] = {}
        #: init pid -> container id, for the containers this monitor watches.
        self.watched: dict[int, str] = {}
        #: runc create pid -> (client, container id, pid file) waiting for its reply.
        self.creating: dict[int, tuple[socket.socket | None, str, str]] = {}
        #: Exit statuses of pids not registered yet, such as an init that exits before its pid
        #: file was read.
        self.unclaimed: dict[int, tuple[int, int]] = {}
        #: container id -> FIFO fds held open until the daemon releases the container.
        self.held_fifos: dict[str, list[int]] = {}
        #: pty master fd -> the terminal copy of a container with ``terminal: true``.
        self.consoles: dict[int, Console] = {}
        self.idle_since = time.monotonic()

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # SIGCHLD wakes the selector through a pipe, so reaping happens in the main loop.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")

        self.socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        server.listen(8)
        server.setblocking(False)
        self.selector.register(server, selectors.EVENT_READ, "accept")
        (self.state_dir / "monitor.pid").write_text(f"{os.getpid()}\n")

        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "wake":
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                elif key.data == "accept":
                    conn, _ = server.accept()
                    conn.setblocking(False)
                    self.clients[conn] = bytearray()
                    self.selector.register(conn, selectors.EVENT_READ, "client")
                elif isinstance(key.data, Console):
                    key.data.on_event(self)
                else:
                    self._read_client(key.fileobj)  # type: ignore[arg-type]
            self._reap()
            if self.clients or self.watched or self.creating or self.held_fifos or self.consoles:
                self.idle_since = time.monotonic()
            elif time.monotonic() - self.idle_since > IDLE_EXIT_SECONDS:
                break
        self.socket_path.unlink(missing_ok=True)
        (self.state_dir / "monitor.pid").unlink(missing_ok=True)

    def _read_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self.clients[conn]
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("op") == "create":
                self._create(conn, message)
            elif message.get("op") == "release":
                self._release(str(message.get("id", "")))

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.clients.pop(conn, None)
        conn.close()

    def _hold(self, container_id: str, message: dict) -> None:  # type: ignore[type-arg]
        self._release(container_id)
        fds = []
        for stream in ("stdout", "stderr"):
            path = message.get(stream)
            if path:
                fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        self.held_fifos[container_id] = fds

    def _release(self, container_id: str) -> None:
        for console in [c for c in self.consoles.values() if c.container_id == container_id]:
            console.close(self)
        for fd in self.held_fifos.pop(container_id, []):
            os.close(fd)

    def _create(self, conn: socket.socket, message: dict) -> None:  # type: ignore[type-arg]
        container_id = str(message["id"])
        fds = []
        try:
            fds.append(os.open(message.get("stdin") or os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for stream in ("stdout", "stderr"):
                fds.append(os.open(message.get(stream) or os.devnull, os.O_RDWR | os.O_CLOEXEC))
            if message.get("console_socket"):
                # The runtime connects during create, so the socket must exist before the fork.
                Console.prepare(Path(message["console_socket"]))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child only sets up stdio and execs
                try:
                    os.setsid()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                    os.execvp(message["argv"][0], message["argv"])
                finally:
                    os._exit(127)
            self._hold(container_id, message)
            if message.get("console_socket"):
                Console.listen(self, container_id, Path(message["console_socket"]))
        except OSError as exc:
            self._release(container_id)
            self._send(conn, {"op": "created", "id": container_id, "code": -1, "pid": 0,
                              "error": str(exc)})
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.creating[pid] = (conn, container_id, str(message["pid_file"]))

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, _status_to_code(status), time.time_ns())

    def _exited(self, pid: int, code: int, finished_at: int) -> None:
        creating = self.creating.pop(pid, None)
        if creating is not None:
            conn, container_id, pid_file = creating
            init_pid = 0
            if code == 0:
                try:
                    init_pid = int(Path(pid_file).read_text().strip())
                except (OSError, ValueError):
                    init_pid = 0
            if init_pid:
                self.watched[init_pid] = container_id
                early = self.unclaimed.pop(init_pid, None)
            else:
                early = None
            if not init_pid:
                self._release(container_id)
            if conn is not None and conn in self.clients:
                self._send(conn, {"op": "created", "id": container_id, "code": code,
                                  "pid": init_pid})
            if early is not None:
                self._exited(init_pid, *early)
            return
        watched = self.watched.pop(pid, None)
        if watched is None:
            # Orphans of the containers (re-parented here) and inits not yet registered.
            if len(self.unclaimed) < 4096:
                self.unclaimed[pid] = (code, finished_at)
            return
        container_id = watched
        # Terminal output still in the pty must reach the FIFO before the daemon drains it.
        for console in [c for c in self.consoles.values() if c.container_id == container_id]:
            console.drain(self)
        write_exit(self.state_dir, container_id, code, finished_at)
        for conn in list(self.clients):
            self._send(conn, {"op": "exit", "id": container_id, "code": code,
                              "finished_at": finished_at})

    def _send(self, conn: socket.socket, message: dict) -> None:  # type: ignore[type-arg]
        try:
            conn.setblocking(True)
            conn.sendall(json.dumps(message).encode() + b"\n")
            conn.setblocking(False)
        except OSError:
            if conn in self.clients:
                self._drop(conn)


class Console:
    """The terminal of one container: a console socket, then its pty master.

    Output is copied into the container's held stdout FIFO. When the FIFO is full because no
    daemon reads, the copy waits for it to drain and stops reading the pty meanwhile, so the
    container blocks on its terminal rather than losing output.
    """

    def __init__(self, container_id: str, listener: socket.socket, path: Path) -> None:
        self.container_id = container_id
        self.listener: socket.socket | None = listener
        self.path = path
        self.master = -1
        self.pending = b""

    @staticmethod
    def prepare(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        _prepared[str(path)] = listener

    @classmethod
    def listen(cls, monitor: Monitor, container_id: str, path: Path) -> None:
        listener = _prepared.pop(str(path))
        listener.setblocking(False)
        console = cls(container_id, listener, path)
        monitor.selector.register(listener, selectors.EVENT_READ, console)

    def _output_fd(self, monitor: Monitor) -> int:
        fds = monitor.held_fifos.get(self.container_id) or [-1]
        return fds[0]

    def on_event(self, monitor: Monitor) -> None:
        if self.listener is not None:
            self._accept(monitor)
        elif self.pending:
            self._flush(monitor)
        else:
            self._copy(monitor)

    def _accept(self, monitor: Monitor) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(5)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        monitor.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        self.path.unlink(missing_ok=True)
        if not fds:
            return
        self.master = fds[0]
        os.set_blocking(self.master, False)
        monitor.consoles[self.master] = self
        monitor.selector.register(self.master, selectors.EVENT_READ, self)

    def _copy(self, monitor: Monitor) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the container closed its terminal.
        if not data:
            self.close(monitor)
            return
        self.pending = data
        self._flush(monitor)

    def _flush(self, monitor: Monitor) -> None:
        out = self._output_fd(monitor)
        try:
            written = os.write(out, self.pending) if out >= 0 else len(self.pending)
        except BlockingIOError:
            written = 0
        self.pending = self.pending[written:]
        # Read the terminal while the FIFO takes more, otherwise wait until it can.
        if self.pending and out >= 0:
            monitor.selector.unregister(self.master)
            monitor.selector.register(out, selectors.EVENT_WRITE, self)
        elif out >= 0 and monitor.selector.get_map().get(out) is not None:
            monitor.selector.unregister(out)
            monitor.selector.register(self.master, selectors.EVENT_READ, self)

    def drain(self, monitor: Monitor) -> None:
        """Copy what the pty still holds, as far as the FIFO takes it without blocking."""
        while self.master >= 0 and not self.pending:
            self._copy(monitor)

    def close(self, monitor: Monitor) -> None:
        for fileobj in (self.listener, self.master, self._output_fd(monitor)):
            if fileobj is None or fileobj == -1:
                continue
            key = monitor.selector.get_map().get(fileobj)
            if key is not None and key.data is self:
                monitor.selector.unregister(fileobj)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.path.unlink(missing_ok=True)
        if self.master >= 0:
            monitor.consoles.pop(self.master, None)
            os.close(self.master)
            self.master = -1


#: Console listeners bound before the fork of a create, by socket path.
_prepared: dict[str, socket.socket] = {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m servin_shim.oci.monitor STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(args[0])
    state_dir.mkdir(parents=True, exist_ok=True)
    Monitor(state_dir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
