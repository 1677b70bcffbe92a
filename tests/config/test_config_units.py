"""Duration and size parsing and formatting."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from servin_shim.config.units import (
    ByteSize,
    Duration,
    MicrosecondDuration,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


class Sample(BaseModel):
    timeout: Duration = 0.0
    period: MicrosecondDuration = 0
    size: ByteSize = 0


DURATIONS = [
    ("300s", Decimal(300)),
    ("15m", Decimal(900)),
    ("1h30m", Decimal(5400)),
    ("500ms", Decimal("0.5")),
    ("1.5s", Decimal("1.5")),
    ("2h", Decimal(7200)),
    ("100us", Decimal("0.0001")),
    ("100µs", Decimal("0.0001")),
    ("10ns", Decimal("0.00000001")),
    ("1m30s500ms", Decimal("90.5")),
    ("90", Decimal(90)),
    ("0", Decimal(0)),
    (45, Decimal(45)),
    (2.5, Decimal("2.5")),
    (" 15m ", Decimal(900)),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_duration_parses(text: object, seconds: Decimal) -> None:
    assert parse_duration(text) == seconds


BAD_DURATIONS = ["5 minutes", "15x", "", "m", "1h 30m", "-5s", "-3", "1d", "15M", "s15", True, None]


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_duration_rejects(text: object) -> None:
    with pytest.raises(ValidationError) as info:
        Sample(timeout=text)
    message = str(info.value)
    assert "invalid duration" in message
    assert "expected a number with a unit such as 300s, 15m or 1h" in message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (900, "15m"),
        (5400, "1h30m"),
        (0.5, "500ms"),
        (0, "0s"),
        (90.5, "1m30.5s"),
        (3, "3s"),
        (0.0001, "0.0001s"),
        (3600, "1h"),
    ],
)
def test_duration_formats(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [900.0, 5400.0, 0.5, 0.0, 90.5, 3.0, 0.0001, 86400.0, 1.25])
def test_duration_round_trip(seconds: float) -> None:
    assert float(parse_duration(format_duration(seconds))) == seconds


def test_duration_model_stores_seconds() -> None:
    assert Sample(timeout="15m").timeout == 900.0


def test_microseconds_model() -> None:
    assert Sample(period="100ms").period == 100_000


def test_microseconds_rejects_fraction() -> None:
    with pytest.raises(ValidationError, match="whole number of microseconds"):
        Sample(period="1ns")


def test_duration_dumps_text() -> None:
    dumped = Sample(timeout="1h30m", period="100ms").model_dump(mode="json")
    assert dumped["timeout"] == "1h30m"
    assert dumped["period"] == "100ms"


SIZES = [
    ("10MB", 10_000_000),
    ("10M", 10_000_000),
    ("1Gi", 1024**3),
    ("512Ki", 512 * 1024),
    ("1024", 1024),
    (1024, 1024),
    ("1kB", 1000),
    ("1k", 1000),
    ("2GB", 2_000_000_000),
    ("1.5Gi", 1536 * 1024**2),
    ("3MiB", 3 * 1024**2),
    ("1Ti", 1024**4),
    ("1TB", 1000**4),
    ("7B", 7),
    ("0", 0),
    ("64 Mi", 64 * 1024**2),
]


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_size_parses(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["10 megs", "10mb", "1.5", "0.5B", "-1", "Gi", "1Gb", "", False, [1]]
)
def test_size_rejects(text: object) -> None:
    with pytest.raises(ValidationError) as info:
        Sample(size=text)
    message = str(info.value)
    assert "invalid size" in message
    assert "such as 512Ki, 10MB or 1Gi" in message


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (10_000_000, "10MB"),
        (1024**3, "1Gi"),
        (512 * 1024, "512Ki"),
        (1000, "1kB"),
        (1023, "1023"),
        (0, "0"),
        (2 * 1024**4, "2Ti"),
    ],
)
def test_size_formats(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [10_000_000, 1024**3, 512 * 1024, 1000, 1023, 0, 1536 * 1024**2])
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_size_dumps_plain_bytes_as_int() -> None:
    assert Sample(size=1023).model_dump(mode="json")["size"] == 1023
