"""Effective daemon settings: the config document merged with command-line flags.

Flags override the file. When ``--state-dir`` moves the state directory away from /run/servin,
every path of the document that still has its built-in value under /run/servin moves with it:

* ``spec.criSocket`` /run/servin/servin.sock becomes ``<state_dir>/servin.sock``, unless
  ``--cri-socket`` is given, which always wins;
* the runtime root /run/servin/<handler> of each runtime handler (runc, crun and any handler
  without an explicit runtimeRoot) becomes ``<state_dir>/<handler>``.

Paths the document sets to anything else stay as written. This keeps a daemon started with a
private state dir (as the tests do) away from the system-wide runc state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from servin_shim.config.errors import ConfigError, show_value
from servin_shim.config.loader import load_config
from servin_shim.config.models import DEFAULT_CRI_SOCKET, DEFAULT_STATE_DIR, ServinCRIConfig

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/servin")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
# sun_path in struct sockaddr_un is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs to start, after flags are applied to the config file."""

    #: The effective document: criSocket and runtime roots already reflect the flags.
    config: ServinCRIConfig
    #: The file the document came from; None means the built-in defaults.
    config_path: Path | None
    #: Persistent data: image store and metadata database.
    root: Path
    #: Volatile state: sockets, runtime roots, sandbox files. Lost on reboot.
    state_dir: Path
    #: Unix socket path that the CRI gRPC server listens on.
    cri_socket: str
    #: Level of the root logger: debug, info, warning or error.
    log_level: str
    #: Level of the servin_shim.cri logger, which logs one line per RPC at debug.
    cri_log_level: str


def _check_level(flag: str, value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"{flag}: invalid log level {show_value(value)}: expected one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _check_socket_length(source: str, path: str) -> None:
    size = len(path.encode())
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{source}: invalid socket path {show_value(path)}: it is {size} bytes long: expected "
            f"at most {MAX_SOCKET_PATH_BYTES} bytes (the Unix socket limit); choose a shorter "
            "--state-dir or --cri-socket"
        )


def _rebase_state_paths(config: ServinCRIConfig, state_dir: Path) -> ServinCRIConfig:
    """Move runtime roots that still have their built-in value under state_dir."""
    config = config.model_copy(deep=True)
    runtime = config.spec.runtime
    for name, handler in runtime.runtime_handlers.items():
        if handler.runtime_root == DEFAULT_STATE_DIR / name:
            handler.runtime_root = state_dir / name
    runtime.runtime_root = runtime.runtime_handlers[runtime.name].runtime_root
    return config


def load_settings(
    config_path: Path | None,
    *,
    cri_socket: str | None = None,
    log_level: str | None = None,
    cri_log_level: str | None = None,
    root: Path | None = None,
    state_dir: Path | None = None,
) -> Settings:
    """Load the config file (or the built-in defaults) and apply the command-line flags.

    cri_log_level defaults to log_level. Raises ConfigError for any invalid file or flag.
    """
    config = load_config(config_path) if config_path is not None else ServinCRIConfig()
    effective_root = (root or DEFAULT_ROOT).absolute()
    effective_state_dir = (state_dir or DEFAULT_STATE_DIR).absolute()
    level = _check_level("--log-level", log_level or DEFAULT_LOG_LEVEL)
    cri_level = _check_level("--cri-log-level", cri_log_level) if cri_log_level else level

    if effective_state_dir != DEFAULT_STATE_DIR:
        config = _rebase_state_paths(config, effective_state_dir)

    if cri_socket is not None:
        socket = str(Path(cri_socket.removeprefix("unix://")).absolute())
        source = "--cri-socket"
    elif config.spec.cri_socket == DEFAULT_CRI_SOCKET:
        socket = str(effective_state_dir / "servin.sock")
        source = "--state-dir"
    else:
        socket = config.spec.cri_socket
        source = f"{config_path}: spec.criSocket"
    _check_socket_length(source, socket)
    if socket != config.spec.cri_socket:
        config = config.model_copy(deep=True)
        config.spec.cri_socket = socket

    settings = Settings(
        config=config,
        config_path=config_path,
        root=effective_root,
        state_dir=effective_state_dir,
        cri_socket=socket,
        log_level=level,
        cri_log_level=cri_level,
    )
    log.debug(
        "settings loaded config=%s root=%s state_dir=%s cri_socket=%s",
        config_path or "built-in defaults",
        effective_root,
        effective_state_dir,
        socket,
    )
    return settings
