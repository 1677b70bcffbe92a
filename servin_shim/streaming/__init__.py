"""The streaming server: Exec, Attach and PortForward sessions over SPDY/3.1.

The CRI RPCs only validate a request and return a URL with a single-use token
(``StreamingServer.url_for``). The client then connects to that URL, and the session runs here.
"""

from __future__ import annotations

from servin_shim.streaming.requests import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    check_stdio,
)
from servin_shim.streaming.server import StreamingServer

__all__ = ["AttachRequest", "ExecRequest", "PortForwardRequest", "StreamingServer", "check_stdio"]
