"""Error kinds shared by every part of servin-shim.

Each kind maps to exactly one gRPC status, so that the CRI layer translates errors in one place
(servin_shim.cri.errors) and callers branch on the kind, never on the message text::

    ServinError                 INTERNAL: a bug or an unexpected failure of a part we run
    ├── NotFound                NOT_FOUND: no sandbox, container or image with that id or name
    ├── InvalidArgument         INVALID_ARGUMENT: the request itself is malformed
    ├── AlreadyExists           ALREADY_EXISTS: a name or id is taken
    ├── FailedPrecondition      FAILED_PRECONDITION: valid request, wrong state (e.g. start of an exited container)
    ├── Unauthenticated         UNAUTHENTICATED: a registry rejected the credentials
    ├── Unavailable             UNAVAILABLE: a registry or another peer could not be reached
    ├── DeadlineExceeded        DEADLINE_EXCEEDED: an operation ran past its timeout
    ├── ResourceExhausted       RESOURCE_EXHAUSTED: a limit of this node was hit
    └── Unimplemented           UNIMPLEMENTED: servin-shim does not offer this operation

Messages are lowercase, name the offending value and, where one exists, say what to do next.
"""

from __future__ import annotations


class ServinError(Exception):
    """Base of every error that servin-shim raises on purpose."""

    #: Name of the grpclib ``Status`` member that this kind becomes at the API edge.
    grpc_status = "INTERNAL"


class NotFound(ServinError):
    """A sandbox, container, image or blob with the given id or name does not exist."""

    grpc_status = "NOT_FOUND"


class InvalidArgument(ServinError):
    """A request or configuration value is malformed."""

    grpc_status = "INVALID_ARGUMENT"


class AlreadyExists(ServinError):
    """A name or id is already in use."""

    grpc_status = "ALREADY_EXISTS"


class FailedPrecondition(ServinError):
    """The request is valid but the object is in the wrong state for it."""

    grpc_status = "FAILED_PRECONDITION"


class Unauthenticated(ServinError):
    """A registry rejected the credentials, or required some and none were given."""

    grpc_status = "UNAUTHENTICATED"


class Unavailable(ServinError):
    """A registry or another peer could not be reached or failed transiently."""

    grpc_status = "UNAVAILABLE"


class DeadlineExceeded(ServinError):
    """An operation did not finish within its timeout."""

    grpc_status = "DEADLINE_EXCEEDED"


class ResourceExhausted(ServinError):
    """A limit of this node or of a registry was reached."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unimplemented(ServinError):
    """servin-shim does not offer this operation."""

    grpc_status = "UNIMPLEMENTED"
