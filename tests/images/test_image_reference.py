"""Tests of image reference parsing and normalization."""

from __future__ import annotations

import pytest

from servin_shim.errors import InvalidArgument
from servin_shim.images.reference import is_image_id, parse_reference

DIGEST = "sha256:" + "ab" * 32

VALID = [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ("someone/app", "docker.io/someone/app:latest"),
    ("quay.io/org/app:v1", "quay.io/org/app:v1"),
    ("127.0.0.1:5000/foo/bar:1", "127.0.0.1:5000/foo/bar:1"),
    ("127.0.0.1:5000/foo/bar", "127.0.0.1:5000/foo/bar:latest"),
    ("localhost/x", "localhost/x:latest"),
    ("localhost:5000/x:tag", "localhost:5000/x:tag"),
    (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
    (f"busybox:1@{DIGEST}", f"docker.io/library/busybox:1@{DIGEST}"),
    ("a/b-c/d__e/f.g:Tag_1.0-x", "docker.io/a/b-c/d__e/f.g:Tag_1.0-x"),
    ("[::1]:5000/app:1", "[::1]:5000/app:1"),
]

INVALID = [
    "",
    "Busybox",
    "docker.io/Library/busybox",
    "busybox:",
    "busybox:.bad",
    "busybox@sha256:1234",
    "busybox@md5:" + "a" * 32,
    "bad//path",
    "trailing/",
    "-leading",
    "a" * 64,
    "busybox:" + "t" * 129,
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_parse_normalizes(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize("text", INVALID)
def test_parse_rejects_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference(text)
    assert repr(text) in str(info.value)


def test_digest_decides_pull() -> None:
    ref = parse_reference(f"busybox:1@{DIGEST}")
    assert ref.manifest_reference == DIGEST
    assert ref.tag == "1"
    assert ref.with_tag() == "docker.io/library/busybox:1"


def test_fields_of_host_with_port() -> None:
    ref = parse_reference("127.0.0.1:5000/foo/bar:1")
    assert ref.registry == "127.0.0.1:5000"
    assert ref.repository == "foo/bar"
    assert ref.tag == "1"
    assert ref.digest is None


def test_docker_hub_api_host() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("quay.io/a/b").api_host == "quay.io"


def test_default_registry_configurable() -> None:
    ref = parse_reference("busybox", default_registry="127.0.0.1:5000")
    assert str(ref) == "127.0.0.1:5000/busybox:latest"


def test_image_id_forms() -> None:
    assert is_image_id(DIGEST)
    assert is_image_id("ab" * 32)
    assert not is_image_id("busybox")
