"""Unit tests of request checks: pod hostname and DNS, resource values, stop signals, and how
runtime errors that mean "no such container" are recognised."""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path

import pytest

from servin_shim.api.runtime import v1 as cri
from servin_shim.cri.containers import check_resource_values, stop_signal
from servin_shim.cri.sandboxes import validate_dns, validate_hostname
from servin_shim.errors import InvalidArgument
from servin_shim.oci.runtime import _is_gone
from servin_shim.state.records import ContainerRecord


@pytest.mark.parametrize("hostname", [
    "", "web", "web-0", "Web0", "a" * 63, "web-0.default.svc", "a" * 31 + "." + "b" * 32,
])
def test_hostname_valid(hostname: str) -> None:
    validate_hostname(hostname)


@pytest.mark.parametrize("hostname", [
    "bad host", "host\nname", "-lead", "trail-", "under_score", "a" * 64, "a..b", ".a",
    "a.", "a" * 32 + "." + "b" * 32, "é",
])
def test_hostname_invalid(hostname: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_hostname(hostname)

    assert repr(hostname) in str(caught.value)


def test_dns_valid() -> None:
    validate_dns(cri.DnsConfig(
        servers=["10.96.0.10", "fd00::a", "fe80::1%eth0"],
        searches=["default.svc.cluster.local", "svc.cluster.local"],
        options=["ndots:5", "edns0"],
    ))


@pytest.mark.parametrize(("dns", "value"), [
    (cri.DnsConfig(servers=["not-an-ip"]), "not-an-ip"),
    (cri.DnsConfig(servers=["10.0.0.1\nnameserver 8.8.8.8"]), "10.0.0.1"),
    (cri.DnsConfig(servers=["1.2.3.4 "]), "1.2.3.4 "),
    (cri.DnsConfig(searches=["a b"]), "a b"),
    (cri.DnsConfig(searches=[""]), "''"),
    (cri.DnsConfig(options=["ndots:5\nnameserver 8.8.8.8"]), "ndots:5"),
    (cri.DnsConfig(options=["x\ty"]), "x\\ty"),
])
def test_dns_invalid(dns: cri.DnsConfig, value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_dns(dns)

    assert value in str(caught.value)


@pytest.mark.parametrize("field", ["cpu_shares", "memory_limit_in_bytes", "cpu_period"])
def test_resources_negative(field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_resource_values(cri.LinuxContainerResources(**{field: -1}))

    assert field in str(caught.value)


@pytest.mark.parametrize("field", ["cpu_quota", "memory_swap_limit_in_bytes"])
def test_resources_below_unlimited(field: str) -> None:
    check_resource_values(cri.LinuxContainerResources(**{field: -1}))
    with pytest.raises(InvalidArgument) as caught:
        check_resource_values(cri.LinuxContainerResources(**{field: -2}))

    assert field in str(caught.value)


def test_resources_oom_score_range() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_resource_values(cri.LinuxContainerResources(oom_score_adj=1001))

    assert "oom_score_adj" in str(caught.value)


def test_resources_valid() -> None:
    check_resource_values(cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=1 << 26,
        oom_score_adj=-998,
    ))


def record_with_signal(name: str) -> ContainerRecord:
    return ContainerRecord(
        id="c1", sandbox_id="s1", name="c", image_ref="img", image_id="sha256:" + "0" * 64,
        created_at=1, stop_signal=name,
    )


def test_stop_signal_from_image() -> None:
    assert stop_signal(record_with_signal("SIGINT")) == signal.SIGINT


def test_stop_signal_bad_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sig = stop_signal(record_with_signal("SIGBOGUS"))

    assert sig == signal.SIGTERM
    assert "SIGBOGUS" in caplog.text


@pytest.mark.parametrize("command", [["state", "nope"], ["kill", "nope", "9"], ["delete", "nope"]])
def test_crun_unknown_id_is_gone(tmp_path: Path, command: list[str]) -> None:
    # The real crun message for a container id its root does not have.
    result = subprocess.run(["crun", "--root", str(tmp_path), *command],
                            capture_output=True, text=True, check=False)

    assert result.returncode != 0
    assert _is_gone(result.stderr, "nope")


@pytest.mark.parametrize("command", [["state", "nope"], ["kill", "nope", "9"], ["delete", "nope"]])
def test_runc_unknown_id_is_gone(tmp_path: Path, command: list[str]) -> None:
    result = subprocess.run(["runc", "--root", str(tmp_path), *command],
                            capture_output=True, text=True, check=False)

    assert result.returncode != 0
    assert _is_gone(result.stderr, "nope")


def test_other_missing_file_not_gone() -> None:
    message = "error opening file `/etc/other/status`: No such file or directory"

    assert not _is_gone(message, "nope")
