"""Duration and byte-size values for the configuration, as reusable pydantic-annotated types.

Durations use Go's notation (``300s``, ``15m``, ``1h30m``, ``500ms``, units ``ns us µs ms s m h``)
or a plain number of seconds. Sizes use Kubernetes-style suffixes: ``k``/``kB``, ``M``/``MB``,
``G``/``GB``, ``T``/``TB`` are decimal (powers of 1000), ``Ki``, ``Mi``, ``Gi``, ``Ti`` (with an
optional trailing ``B``) are binary (powers of 1024), and a plain number or ``B`` means bytes.
Each type parses text on input and writes the shortest exact text back on output, so a dumped
configuration loads to the same values.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer
from pydantic_core import PydanticCustomError

from servin_shim.config.errors import show_value

log = logging.getLogger(__name__)

DURATION_FORM = "a number with a unit such as 300s, 15m or 1h"
SIZE_FORM = "a whole number of bytes or a number with a unit such as 512Ki, 10MB or 1Gi"

_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "μs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
# Longest units first so that "ms" is not read as "m" followed by a stray "s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "k": 1000,
    "kB": 1000,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "Ki": 1024,
    "KiB": 1024,
    "Mi": 1024**2,
    "MiB": 1024**2,
    "Gi": 1024**3,
    "GiB": 1024**3,
    "Ti": 1024**4,
    "TiB": 1024**4,
}
_SIZE_TEXT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)")


def _duration_error(value: object) -> PydanticCustomError:
    return PydanticCustomError(
        "servin_duration",
        "invalid duration {value}: expected {form}",
        {"value": show_value(value), "form": DURATION_FORM},
    )


def _size_error(value: object) -> PydanticCustomError:
    return PydanticCustomError(
        "servin_byte_size",
        "invalid size {value}: expected {form}",
        {"value": show_value(value), "form": SIZE_FORM},
    )


def parse_duration(value: object) -> Decimal:
    """Parse a duration in Go notation or a plain number of seconds into exact seconds.

    Raises PydanticCustomError (type ``duration``) for anything else, including negative values
    and booleans, which YAML produces from words such as ``yes``.
    """
    if isinstance(value, bool):
        raise _duration_error(value)
    if isinstance(value, int | float):
        seconds = Decimal(str(value))
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip(), value)
    else:
        raise _duration_error(value)
    if not seconds.is_finite() or seconds < 0:
        raise _duration_error(value)
    return seconds


def _parse_duration_text(text: str, original: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        pass
    position = 0
    total = Decimal(0)
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            raise _duration_error(original)
        total += Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise _duration_error(original)
    return total


def format_duration(seconds: Decimal | float) -> str:
    """Format seconds in Go notation (``1h30m``, ``500ms``); the result parses back exactly."""
    remaining = Decimal(str(seconds))
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, scale in (("h", Decimal(3600)), ("m", Decimal(60))):
        whole = int(remaining // scale)
        if whole:
            parts.append(f"{whole}{unit}")
            remaining -= whole * scale
    if remaining:
        if parts or remaining >= 1:
            parts.append(f"{_plain(remaining)}s")
        elif (remaining * 1000) == (remaining * 1000).to_integral_value():
            parts.append(f"{_plain(remaining * 1000)}ms")
        else:
            parts.append(f"{_plain(remaining)}s")
    return "".join(parts)


def _plain(number: Decimal) -> str:
    return format(number.normalize(), "f")


def _to_seconds(value: object) -> float:
    return float(parse_duration(value))


def _to_microseconds(value: object) -> int:
    micros = parse_duration(value) * 1_000_000
    if micros != micros.to_integral_value():
        raise PydanticCustomError(
            "servin_duration",
            "invalid duration {value}: expected a whole number of microseconds such as 100ms",
            {"value": show_value(value)},
        )
    return int(micros)


def parse_size(value: object) -> int:
    """Parse a byte size such as ``10MB``, ``1Gi``, ``512Ki`` or ``1024`` into bytes."""
    if isinstance(value, bool):
        raise _size_error(value)
    if isinstance(value, int):
        number, unit = Decimal(value), ""
    elif isinstance(value, float):
        number, unit = Decimal(str(value)), ""
    elif isinstance(value, str):
        match = _SIZE_TEXT.fullmatch(value.strip())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise _size_error(value)
        number, unit = Decimal(match.group(1)), match.group(2)
    else:
        raise _size_error(value)
    size = number * _SIZE_UNITS[unit]
    # A size that is not a whole number of bytes (0.5B, 1.0000001k) is almost always a typo.
    if size < 0 or size != size.to_integral_value():
        raise _size_error(value)
    return int(size)


def format_size(size: int) -> str:
    """Format bytes with the largest unit that divides them exactly (``10MB``, ``1Gi``)."""
    if size == 0:
        return "0"
    for unit in ("Ti", "TB", "Gi", "GB", "Mi", "MB", "Ki", "kB"):
        scale = _SIZE_UNITS[unit]
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _serialize_seconds(value: float) -> str:
    return format_duration(value)


def _serialize_microseconds(value: int) -> str:
    return format_duration(Decimal(value) / 1_000_000)


def _serialize_size(value: int) -> str | int:
    text = format_size(value)
    return int(text) if text.isdigit() else text


Duration = Annotated[
    float, BeforeValidator(_to_seconds), PlainSerializer(_serialize_seconds, return_type=str)
]
"""A non-negative duration, stored as float seconds."""

MicrosecondDuration = Annotated[
    int,
    BeforeValidator(_to_microseconds),
    PlainSerializer(_serialize_microseconds, return_type=str),
]
"""A non-negative duration, stored as whole microseconds (the unit of the cgroup CPU limits)."""

ByteSize = Annotated[
    int, BeforeValidator(parse_size), PlainSerializer(_serialize_size, return_type=Any)
]
"""A non-negative size, stored as whole bytes."""
