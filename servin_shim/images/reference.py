"""Image reference parsing and normalization (the distribution reference grammar).

A reference is ``[registry/]path[:tag][@digest]``. Short names take a default registry, and on
``docker.io`` a single-component path gets the ``library/`` prefix, so ``busybox`` becomes
``docker.io/library/busybox:latest``. A reference with a digest pulls that digest, and its tag,
if any, is kept only as a name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
# Docker Hub serves the registry API on a different host than the name users type.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^\w[\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_ANY_DIGEST_RE = re.compile(
    r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$"
)
_IMAGE_ID_RE = re.compile(r"^[a-f0-9]{64}$")
# The distribution grammar caps the whole name (registry and path) at 255 characters.
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: ``tag`` and ``digest`` may both be set, or one of them."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Registry and repository without tag or digest, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Host (and port) that serves the registry API for this reference."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_reference(self) -> str:
        """Tag or digest to request from ``/v2/<repository>/manifests/``: the digest wins."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self) -> str | None:
        """Name with tag (``docker.io/library/busybox:1``), or None for a digest-only reference."""
        return f"{self.name}:{self.tag}" if self.tag else None

    def with_digest(self, digest: str) -> str:
        """Name with a digest, as listed in ``repo_digests``."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_image_id(text: str) -> bool:
    """Return True for a full image id: ``sha256:<64 hex>`` or the 64 hex digits alone."""
    return bool(_DIGEST_RE.match(text) or _IMAGE_ID_RE.match(text))


def parse_reference(text: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse and normalize ``text``, raising InvalidArgument that names an invalid reference."""
    if not text:
        raise InvalidArgument("invalid image reference '': the reference is empty")
    if _IMAGE_ID_RE.match(text):
        raise InvalidArgument(
            f"invalid image reference {text!r}: 64 hexadecimal digits are an image id, "
            "not a repository name"
        )

    remainder, digest = _split_digest(text)
    remainder, tag = _split_tag(text, remainder)
    registry, path = _split_registry(remainder, default_registry)

    if not _DOMAIN_RE.match(registry):
        raise InvalidArgument(f"invalid image reference {text!r}: invalid registry {registry!r}")
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            raise InvalidArgument(
                f"invalid image reference {text!r}: invalid path component {component!r}; "
                "use lowercase letters, digits and single separators (., _, __, -)"
            )
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"invalid image reference {text!r}: the name is longer than {_MAX_NAME_LENGTH} characters"
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    remainder, digest = text.split("@", 1)
    if not _ANY_DIGEST_RE.match(digest):
        raise InvalidArgument(f"invalid image reference {text!r}: invalid digest {digest!r}")
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument(
            f"invalid image reference {text!r}: unsupported digest {digest!r}; "
            "only sha256 with 64 lowercase hexadecimal digits is supported"
        )
    return remainder, digest


def _split_tag(text: str, remainder: str) -> tuple[str, str | None]:
    # A colon after the last slash starts the tag. A colon before it belongs to a registry port.
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon <= last_slash:
        return remainder, None
    tag = remainder[colon + 1 :]
    if not _TAG_RE.match(tag):
        raise InvalidArgument(
            f"invalid image reference {text!r}: invalid tag {tag!r}; a tag has 1 to 128 "
            "characters from letters, digits, '_', '.' and '-', and does not start with '.' or '-'"
        )
    return remainder[:colon], tag


def _split_registry(remainder: str, default_registry: str) -> tuple[str, str]:
    first, sep, rest = remainder.partition("/")
    # Like Docker, the first component names a registry only if it looks like a host: it has a
    # dot or a port, is "localhost", or has upper case (which a path component cannot have).
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry = first
        path = rest
    else:
        registry = default_registry
        path = remainder
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    return registry, path
