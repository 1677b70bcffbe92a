"""CRILogWriter: record format, long-line splitting, reopen after rename and rotation."""

from __future__ import annotations

import re
from pathlib import Path

from servin_shim.oci.logs import CRILogWriter, LogRotation

RECORD = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")


def records(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """Return (stream, tag, text) of every record in a CRI log file."""
    result = []
    for line in path.read_bytes().splitlines():
        match = RECORD.match(line)
        assert match is not None, line
        result.append((match.group(2), match.group(3), match.group(4)))
    return result


def test_lines_become_full_records(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path)

    writer.feed("stdout", b"one\ntwo\r\nthr")
    writer.feed("stderr", b"err\n")
    writer.feed("stdout", b"ee\n")
    writer.close()

    assert records(path) == [
        (b"stdout", b"F", b"one"),
        (b"stdout", b"F", b"two"),
        (b"stderr", b"F", b"err"),
        (b"stdout", b"F", b"three"),
    ]


def test_timestamp_is_rfc3339_nano(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path)
    writer.feed("stdout", b"x\n")
    writer.close()

    stamp = path.read_bytes().split(b" ", 1)[0]

    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp)


def test_long_line_splits_into_partials(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path, max_line=16 * 1024)
    line = bytes(ord("a") + i % 26 for i in range(40 * 1024))

    # Fed in odd chunk sizes, as a pipe delivers it.
    for start in range(0, len(line), 7000):
        writer.feed("stdout", line[start:start + 7000])
    writer.feed("stdout", b"\nnext\n")
    writer.close()

    got = records(path)
    assert [tag for _, tag, _ in got] == [b"P", b"P", b"F", b"F"]
    assert [len(text) for _, _, text in got[:3]] == [16384, 16384, 8192]
    assert b"".join(text for _, _, text in got[:3]) == line
    assert got[3] == (b"stdout", b"F", b"next")


def test_unfinished_line_flushes_as_partial(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path)

    writer.feed("stdout", b"no newline")
    writer.close()

    assert records(path) == [(b"stdout", b"P", b"no newline")]


def test_reopen_after_rename_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    rotated = tmp_path / "c.log.20240101"
    writer = CRILogWriter(path)

    writer.feed("stdout", b"1\n2\n")
    path.rename(rotated)
    writer.feed("stdout", b"3\n")
    writer.reopen()
    writer.feed("stdout", b"4\n")
    writer.close()

    assert [text for _, _, text in records(rotated)] == [b"1", b"2", b"3"]
    assert [text for _, _, text in records(path)] == [b"4"]


def test_rotation_keeps_max_files(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    # One record of "NN\n" text is about 45 bytes, so three fit into 150 bytes.
    writer = CRILogWriter(path, rotation=LogRotation(max_size=150, max_files=3))

    for number in range(30):
        writer.feed("stdout", b"%02d\n" % number)
    writer.close()

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["c.log", "c.log.1", "c.log.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 150
    kept = [text for name in ("c.log.2", "c.log.1", "c.log") for _, _, text in
            records(tmp_path / name)]
    assert kept == [b"%02d" % n for n in range(30 - len(kept), 30)]


def test_rotation_never_splits_a_record(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path, rotation=LogRotation(max_size=100, max_files=50))

    writer.feed("stdout", b"".join(b"line-%03d\n" % n for n in range(40)))
    writer.close()

    texts = []
    for index in range(49, 0, -1):
        old = tmp_path / f"c.log.{index}"
        if old.exists():
            texts += [text for _, _, text in records(old)]
    texts += [text for _, _, text in records(path)]
    assert texts == [b"line-%03d" % n for n in range(40)]


def test_rotation_with_one_file_truncates(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    writer = CRILogWriter(path, rotation=LogRotation(max_size=100, max_files=1))

    for number in range(10):
        writer.feed("stdout", b"%d\n" % number)
    writer.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log"]
    assert records(path)[-1] == (b"stdout", b"F", b"9")
    assert path.stat().st_size <= 100


def test_rotation_skips_devnull(tmp_path: Path) -> None:
    writer = CRILogWriter(Path("/dev/null"), rotation=LogRotation(max_size=10, max_files=2))

    writer.feed("stdout", b"a long enough line for a rotation\n" * 3)
    writer.close()

    assert not Path("/dev/null.1").exists()
