"""The one place where servin-shim errors become gRPC statuses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.errors import ServinError

log = logging.getLogger("servin_shim.cri")


@contextlib.contextmanager
def as_grpc_status(method: str, ids: str) -> Iterator[None]:
    """Translate our errors into GRPCError; log unexpected ones and return INTERNAL."""
    try:
        yield
    except GRPCError:
        raise
    except ServinError as exc:
        status = Status[exc.grpc_status]
        level = logging.ERROR if status is Status.INTERNAL else logging.INFO
        log.log(level, "%s failed %s code=%s: %s", method, ids, status.name, exc)
        raise GRPCError(status, str(exc)) from exc
    except Exception as exc:
        log.exception("%s failed %s with an unexpected error", method, ids)
        raise GRPCError(Status.INTERNAL, f"{method}: internal error: {exc}") from exc
