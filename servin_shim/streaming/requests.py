"""Validated streaming requests, as the CRI RPCs store them behind a token."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from servin_shim.errors import InvalidArgument
from servin_shim.oci.runtime import OCIRuntime

log = logging.getLogger(__name__)


def check_stdio(rpc: str, *, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    """Reject stream choices a client cannot use, with kubelet's own rules."""
    if tty and stderr:
        # A terminal merges stderr into stdout, so no separate stderr stream exists.
        raise InvalidArgument(f"{rpc} with tty cannot also request stderr: set stderr to false")
    if not (stdin or stdout or stderr):
        raise InvalidArgument(f"{rpc} needs at least one of stdin, stdout or stderr")


@dataclass(frozen=True)
class ExecRequest:
    """A command to run in a running container over a streaming connection."""

    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool
    runtime: OCIRuntime
    #: Directory for the pid and runtime log files of each exec; removed afterwards.
    work_dir: Path
    #: Short directory for console sockets, whose paths must stay under 108 bytes.
    socket_dir: Path


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardRequest:
    """Forwarding into one pod's network namespace; the client names the ports per stream."""

    sandbox_id: str
    netns_path: str


StreamingRequest = ExecRequest | AttachRequest | PortForwardRequest
