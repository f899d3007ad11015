"""Damaged, torn and old-format log files: what ``open`` and ``salvage`` recover, cut, set
aside and report. Each test writes real files in tmp_path and edits their bytes."""

import time
import zlib
from functools import cache
from pathlib import Path

import pytest

from exo.shared.event_log import LOG_FILE_NAME, DiskEventLog, LogDamagedError, encode_record
from exo.shared.types.events import IndexedEvent, ProbeEmitted


@cache
def probe(index: int) -> IndexedEvent:
    """The same event for an index throughout a test run (each event has a random id)."""
    return IndexedEvent(idx=index, event=ProbeEmitted(probe_id=str(index), sent_at=0.0))


def checksummed(indices: range) -> list[bytes]:
    return [encode_record(probe(index)) for index in indices]


def legacy(indices: range) -> list[bytes]:
    """Lines of the format before checksums: plain JSON."""
    return [probe(index).model_dump_json().encode() + b"\n" for index in indices]


def body_of(indexed: IndexedEvent) -> bytes:
    return indexed.model_dump_json().encode()


def write_file(directory: Path, lines: list[bytes]) -> bytes:
    data = b"".join(lines)
    (directory / LOG_FILE_NAME).write_bytes(data)
    return data


def damage_on_open(directory: Path, lines: list[bytes], base: int = 0) -> LogDamagedError:
    """Write lines, open the log and return the LogDamagedError it raises; the file must be
    left exactly as it was."""
    data = write_file(directory, lines)
    with pytest.raises(LogDamagedError) as raised:
        DiskEventLog(directory).open(base)
    assert (directory / LOG_FILE_NAME).read_bytes() == data
    return raised.value


def indices(events: list[IndexedEvent]) -> list[int]:
    return [indexed.idx for indexed in events]


# --- what LogDamagedError reports -----------------------------------------------------


def test_the_error_names_the_record_its_line_counted_from_the_base_and_the_reason(
    tmp_path: Path,
) -> None:
    log = DiskEventLog(tmp_path)
    log.open(base=5)
    for index in range(5, 10):
        log.append(probe(index))
    log.close()
    lines = (tmp_path / LOG_FILE_NAME).read_bytes().splitlines(keepends=True)
    lines[2] = b"abcdefgh" + lines[2][8:]  # record 7, not hex any more
    error = damage_on_open(tmp_path, lines, base=5)
    path = tmp_path / LOG_FILE_NAME
    assert (error.path, error.record_idx, error.line, error.reason) == (path, 7, 3, "no checksum")
    assert str(error) == (
        f"event log {path}: record 7 (line 3) is damaged (no checksum); "
        f"the records before it are intact"
    )
    assert isinstance(error, ValueError)


# --- checksummed records: each way a line before the last can be bad -------------------


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"0123abcd\n", "no checksum"),  # exactly the checksum's digits, nothing after
        (b"0123abc\n", "no checksum"),
        (b"\n", "no checksum"),
        (b"0123abcd{}\n", "no checksum"),  # no space after the checksum
        (b"0123abcg {}\n", "no checksum"),
        (b"00000000 \n", "its checksum matches but it is not an event"),  # crc32(b"") == 0
        (b'{"idx": 1}\n', "no checksum: a record of the old format"),
    ],
)
def test_a_bad_line_before_the_last_is_damage_with_its_reason(
    tmp_path: Path, bad_line: bytes, reason: str
) -> None:
    lines = checksummed(range(3))
    lines[1] = bad_line
    error = damage_on_open(tmp_path, lines)
    assert (error.record_idx, error.line, error.reason) == (1, 2, reason)


def test_a_record_whose_checksum_matches_json_that_is_no_event_is_damage(tmp_path: Path) -> None:
    body = b'{"idx": 1, "event": {"kind": "NoSuchEvent"}}'
    lines = checksummed(range(3))
    lines[1] = f"{zlib.crc32(body):08x} ".encode() + body + b"\n"
    error = damage_on_open(tmp_path, lines)
    assert (error.record_idx, error.reason) == (1, "its checksum matches but it is not an event")


def has_a_leading_zero_and_a_letter(indexed: IndexedEvent) -> bool:
    digits = f"{zlib.crc32(body_of(indexed)):08x}"
    return digits.startswith("0") and any(digit in "abcdef" for digit in digits)


def test_a_checksum_must_be_eight_lowercase_hex_digits(tmp_path: Path) -> None:
    """A checksum spelled another way that still reads as the right number (uppercase, a
    sign or a space for its leading zero) is not one this log writes: damage."""
    index = next(i for i in range(10_000) if has_a_leading_zero_and_a_letter(probe(i)))
    body = body_of(probe(index))
    crc = zlib.crc32(body)
    for spelling in (f"+{crc:07x}", f" {crc:07x}", f"{crc:08X}"):
        assert int(spelling, 16) == crc
        lines = [encode_record(probe(i)) for i in range(index, index + 3)]
        lines[0] = spelling.encode() + b" " + body + b"\n"
        error = damage_on_open(tmp_path, lines, base=index)
        assert (error.record_idx, error.line, error.reason) == (index, 1, "no checksum")


# --- the last line: torn (cut) or damaged (raise) --------------------------------------


def test_a_whole_last_record_with_a_later_index_is_cut_as_a_bad_last_line(
    tmp_path: Path, log_lines: list[str]
) -> None:
    lines = [*checksummed(range(3)), encode_record(probe(4))]  # record 3 never got written
    write_file(tmp_path, lines)
    log = DiskEventLog(tmp_path)
    assert indices(log.open()) == [0, 1, 2]
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(lines[:3])
    warnings = [line for line in log_lines if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert f"cutting {len(lines[3])} bytes" in warnings[0]
    assert "after index 2" in warnings[0]
    log.append(probe(3))
    log.close()


def test_the_cut_warning_counts_the_bytes_cut_and_the_last_record_kept(
    tmp_path: Path, log_lines: list[str]
) -> None:
    lines = checksummed(range(5))
    torn = lines[4][:7]
    write_file(tmp_path, [*lines[:4], torn])
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1, 2, 3]
    path = tmp_path / LOG_FILE_NAME
    assert f"WARNING event log {path}: cutting 7 bytes of truncated or corrupt records " in (
        "\n".join(log_lines)
    )
    assert any(line.endswith("after index 3") for line in log_lines if "cutting 7" in line)


def test_the_cut_warning_names_the_last_record_kept_by_its_index_after_a_snapshot(
    tmp_path: Path, log_lines: list[str]
) -> None:
    """A log compacted to base 100: the warning names record 102, not its position."""
    lines = checksummed(range(100, 104))
    write_file(tmp_path, [*lines[:3], lines[3][:5]])
    assert indices(DiskEventLog(tmp_path).open(base=100)) == [100, 101, 102]
    cut = [line for line in log_lines if "cutting 5 bytes" in line]
    assert len(cut) == 1 and cut[0].endswith("after index 102"), cut


def test_a_torn_only_record_is_cut_and_the_warning_says_no_record_was_kept(
    tmp_path: Path, log_lines: list[str]
) -> None:
    write_file(tmp_path, [checksummed(range(1))[0][:6]])
    assert indices(DiskEventLog(tmp_path).open()) == []
    cut = [line for line in log_lines if "cutting 6 bytes" in line]
    assert len(cut) == 1 and cut[0].endswith("(no record kept)"), cut


def test_a_last_line_running_into_the_next_record_from_its_second_byte_is_damage(
    tmp_path: Path,
) -> None:
    """A one-byte bad record whose line end was lost: the next record starts at the line's
    second byte."""
    lines = [*checksummed(range(2)), b"x" + encode_record(probe(3))]
    error = damage_on_open(tmp_path, lines)
    assert (error.record_idx, error.line) == (2, 3)
    assert error.reason == "no checksum, and it runs into the next record"


def test_a_last_line_that_ends_with_a_record_of_another_index_is_cut(tmp_path: Path) -> None:
    """What follows the bad record is no good next record: a torn write, cut."""
    lines = [*checksummed(range(2)), b"x" + encode_record(probe(5))]
    write_file(tmp_path, lines)
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1]
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(lines[:2])


def test_a_merged_last_line_without_its_line_end_is_cut(tmp_path: Path) -> None:
    lines = checksummed(range(4))
    merged = lines[2][:-1] + b"X" + lines[3][:-1]  # line end damaged, last line end torn
    write_file(tmp_path, [*lines[:2], merged])
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1]
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(lines[:2])


# --- the first record's index lowers the base (a crash between snapshot and compaction) --


@pytest.mark.parametrize("old_format", [False, True])
def test_a_file_starting_before_the_base_is_read_from_its_first_record(
    tmp_path: Path, old_format: bool
) -> None:
    lines = legacy(range(2, 6)) if old_format else checksummed(range(2, 6))
    write_file(tmp_path, lines)
    log = DiskEventLog(tmp_path)
    assert indices(log.open(base=4)) == [2, 3, 4, 5]
    assert log.base == 2
    log.append(probe(6))
    log.close()
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(checksummed(range(2, 7)))


def test_a_file_starting_after_the_base_is_not_read_from_its_first_record(
    tmp_path: Path,
) -> None:
    error = damage_on_open(tmp_path, checksummed(range(6, 9)), base=4)
    assert (error.record_idx, error.line, error.reason) == (4, 1, "it holds index 6")


def test_an_unreadable_first_line_leaves_the_base(tmp_path: Path) -> None:
    lines = checksummed(range(3, 6))
    lines[0] = b"garbage\n"
    error = damage_on_open(tmp_path, lines, base=3)
    assert (error.record_idx, error.line, error.reason) == (3, 1, "no checksum")


# --- files of the old format ------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"{not json\n", "not an event"),
        (b'{"idx": 1}\n', "not an event"),
        (encode_record(probe(1)), "a checksummed record among records of the old format"),
        (legacy(range(7, 8))[0], "it holds index 7"),
    ],
    # The records hold random event ids: named by position, every xdist worker collects the same tests.
    ids=["not-json", "no-event", "checksummed-among-old", "wrong-index"],
)
def test_a_bad_line_of_an_old_format_file_is_damage_with_its_reason(
    tmp_path: Path, bad_line: bytes, reason: str
) -> None:
    lines = legacy(range(3))
    lines[1] = bad_line
    error = damage_on_open(tmp_path, lines)
    assert (error.record_idx, error.line, error.reason) == (1, 2, reason)


def test_an_old_format_last_line_running_into_a_checksummed_record_is_cut(
    tmp_path: Path,
) -> None:
    """Only the checksummed format has records to run into: in an old file a checksummed
    record on the last line is the other format, cut like any bad last line."""
    lines = [*legacy(range(2)), b"x" + encode_record(probe(3))]
    write_file(tmp_path, lines)
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1]
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(checksummed(range(2)))


def test_a_rewritten_old_format_file_can_be_cut_and_compacted(tmp_path: Path) -> None:
    """The rewrite gives every record its offset in the new file."""
    write_file(tmp_path, legacy(range(6)))
    log = DiskEventLog(tmp_path)
    assert indices(log.open()) == list(range(6))
    path = tmp_path / LOG_FILE_NAME
    log.truncate_after(3)
    assert path.read_bytes() == b"".join(checksummed(range(4)))
    log.compact(2)
    assert path.read_bytes() == b"".join(checksummed(range(2, 4)))
    log.truncate_after(2)
    assert path.read_bytes() == b"".join(checksummed(range(2, 3)))
    log.append(probe(3))
    log.close()
    assert indices(DiskEventLog(tmp_path).open(base=2)) == [2, 3]


def test_a_rewritten_old_format_file_can_be_cut_at_each_record(tmp_path: Path) -> None:
    for last_kept in range(-1, 4):
        write_file(tmp_path, legacy(range(5)))
        log = DiskEventLog(tmp_path)
        log.open()
        log.truncate_after(last_kept)
        log.close()
        expected = b"".join(checksummed(range(last_kept + 1)))
        assert (tmp_path / LOG_FILE_NAME).read_bytes() == expected


# --- salvage -----------------------------------------------------------------------------


def asides(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob(f"{LOG_FILE_NAME}.damaged-*"))


def test_salvage_of_a_damaged_old_format_file_keeps_its_prefix_checksummed(
    tmp_path: Path, log_lines: list[str]
) -> None:
    lines = legacy(range(6))
    lines[3] = b"{not json\n"
    damaged = write_file(tmp_path, lines)
    log = DiskEventLog(tmp_path)
    assert indices(log.salvage()) == [0, 1, 2]
    path = tmp_path / LOG_FILE_NAME
    assert path.read_bytes() == b"".join(checksummed(range(3)))
    (aside,) = asides(tmp_path)
    assert (tmp_path / aside).read_bytes() == damaged
    warnings = [line for line in log_lines if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "record 3 (line 4) is damaged (not an event)" in warnings[0]
    assert f"moved the damaged file to {tmp_path / aside}" in warnings[0]
    assert f"kept the 3 intact records in a fresh {path}" in warnings[0]
    log.truncate_after(1)  # the salvaged records have their offsets in the fresh file
    assert path.read_bytes() == b"".join(checksummed(range(2)))
    log.append(probe(2))
    log.close()
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1, 2]


def test_salvage_of_a_checksummed_file_keeps_the_offsets_of_its_prefix(tmp_path: Path) -> None:
    lines = checksummed(range(6))
    lines[4] = b"damaged\n"
    write_file(tmp_path, lines)
    log = DiskEventLog(tmp_path)
    assert indices(log.salvage()) == [0, 1, 2, 3]
    log.truncate_after(2)
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(lines[:3])
    log.close()


def test_salvage_does_not_overwrite_an_earlier_damaged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two salvages within the same second: the second file set aside gets its own name."""
    now = 1_700_000_000
    monkeypatch.setattr(time, "time", lambda: now + 0.75)
    stamp = f"{LOG_FILE_NAME}.damaged-{now}"
    expected_names: list[str] = []
    contents: dict[str, bytes] = {}
    for round_number in range(3):
        lines = checksummed(range(4))
        lines[1] = b"damaged %d\n" % round_number
        data = write_file(tmp_path, lines)
        log = DiskEventLog(tmp_path)
        assert indices(log.salvage()) == [0]
        log.close()
        name = stamp if round_number == 0 else f"{stamp}-{round_number + 1}"
        expected_names.append(name)
        contents[name] = data
        assert asides(tmp_path) == sorted(expected_names)
    for name, data in contents.items():
        assert (tmp_path / name).read_bytes() == data
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == checksummed(range(1))[0]


def test_salvage_without_a_file_starts_at_index_zero(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path / "events")
    assert log.salvage() == []
    assert log.base == 0
    log.append(probe(0))
    log.close()
    assert indices(DiskEventLog(tmp_path / "events").open()) == [0]


@pytest.mark.parametrize("old_format", [False, True])
def test_a_last_record_whose_line_end_is_damaged_is_cut(tmp_path: Path, old_format: bool) -> None:
    """The whole record is there but its line end is another byte: it is not kept (a
    record appended after it would run into it)."""
    lines = legacy(range(3)) if old_format else checksummed(range(3))
    lines[2] = lines[2][:-1] + bytes([ord("\n") ^ 1])
    write_file(tmp_path, lines)
    log = DiskEventLog(tmp_path)
    assert indices(log.open()) == [0, 1]
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == b"".join(checksummed(range(2)))
    log.append(probe(2))
    log.close()
    assert indices(DiskEventLog(tmp_path).open()) == [0, 1, 2]
