"""Lab logs stay bounded and are read from their ends: rotation keeps one previous file under
the size cap, a follower loses and repeats nothing across rotations, and the last N records or
those since a time are found reading a bounded number of bytes of a large file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane import logfiles
from dataplane.flowrecord import L4, L7, Endpoint, Flow, FlowType, Verdict
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS, RecordTail
from l7.http import HttpFlow
from dataplane.logfiles import FollowedFile, RotatingLog, json_lines, read_all, rotate_bytes
from proxy.events import EventLog

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every byte the log readers read."""
    counter = [0]
    real = logfiles._pread

    def counting(fd: int, size: int, offset: int) -> bytes:
        data = real(fd, size, offset)
        counter[0] += len(data)
        return data

    monkeypatch.setattr(logfiles, "_pread", counting)
    return counter


def record_line(seq: int, when: float, pad: int = 0) -> str:
    """A flow record as small as the format allows (`RecordTail` reads it as one, its `bytes`
    the sequence number), with `seq` and padding for the tests that read raw lines."""
    return json.dumps({"time": when, "type": "L7", "verdict": "forwarded", "bytes": seq, "seq": seq, "pad": "x" * pad})


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L7LAB_LOG_ROTATE_BYTES", "4096")
    assert rotate_bytes() == 4096
    for bad in ("", "-1", "0", "lots"):
        monkeypatch.setenv("L7LAB_LOG_ROTATE_BYTES", bad)
        assert rotate_bytes() == 64 * 1024 * 1024
    monkeypatch.delenv("L7LAB_LOG_ROTATE_BYTES")
    assert rotate_bytes() == 64 * 1024 * 1024


def test_rotation_keeps_one_previous_file_under_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = RotatingLog(path, max_bytes=10_000)
    for seq in range(2000):
        log.write_line(record_line(seq, 1000.0 + seq, pad=random.randrange(0, 200)))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "requests.jsonl.1"]
    assert path.stat().st_size <= 10_000 and (tmp_path / "requests.jsonl.1").stat().st_size <= 10_000
    # What is kept is the newest records, whole and in order, ending with the last one written.
    kept = [r["seq"] for r in read_all(path)]
    assert kept == list(range(kept[0], 2000)) and len(kept) > 20


def test_rotation_in_an_open_directory(tmp_path: Path) -> None:
    """A pod server writes through a directory it was handed open, not a path."""
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = RotatingLog("requests.jsonl", max_bytes=300, dir_fd=dir_fd)
        for seq in range(10):
            log.write_line(record_line(seq, float(seq), pad=50))
        log.close()
    finally:
        os.close(dir_fd)
    assert [r["seq"] for r in read_all(tmp_path / "requests.jsonl")][-1] == 9
    assert (tmp_path / "requests.jsonl.1").exists()


def test_the_proxy_event_log_rotates(tmp_path: Path) -> None:
    path = tmp_path / "l7-events.jsonl"
    events = EventLog(str(path), max_bytes=5000)
    for i in range(200):
        events.emit(Flow(float(i), FlowType.L7, Verdict.FORWARDED, Endpoint("10.0.0.2", 1), Endpoint("10.0.0.3", 80),
                         L4("TCP"), l7=L7(1.0, http=HttpFlow("GET", f"/p/{i}", f"/p/{i}", "HTTP/1.1", 200))))
    events.close()
    assert path.stat().st_size <= 5000 and (tmp_path / "l7-events.jsonl.1").stat().st_size <= 5000
    assert Flow.from_json(read_all(path)[-1]).l7 == L7(1.0, http=HttpFlow("GET", "/p/199", "/p/199", "HTTP/1.1", 200))


def test_a_follower_sees_every_record_once_while_the_writer_rotates(tmp_path: Path) -> None:
    """A writer thread rotates every few hundred records while a follower reads concurrently:
    the follower gets each record exactly once, whole and in order. (A follower that misses two
    rotations loses the file between them, as with any rotated log; so the writer waits, before
    each rotation, for one read that began after the previous rotation.)"""
    path = tmp_path / "l7-events.jsonl"
    total = 20_000
    rotated = threading.Condition()
    state = {"rotations": 0, "read_since": 0}

    class PacedLog(RotatingLog):
        def rotate(self) -> None:
            with rotated:
                assert rotated.wait_for(lambda: state["read_since"] >= state["rotations"], timeout=60)
                super().rotate()
                state["rotations"] += 1

    def write() -> None:
        log = PacedLog(path, max_bytes=50_000)
        for seq in range(total):
            log.write_line(record_line(seq, float(seq), pad=seq % 97))
        log.close()

    follower = FollowedFile(path)
    seen: list[int] = []
    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 120
    try:
        while len(seen) < total and time.monotonic() < deadline:
            with rotated:
                began_after = state["rotations"]
            seen += [r["seq"] for r in json_lines(follower.read())]
            with rotated:
                state["read_since"] = max(state["read_since"], began_after)
                rotated.notify_all()
    finally:
        writer.join()
    assert seen == list(range(total))
    assert state["rotations"] > 20 and (tmp_path / "l7-events.jsonl.1").exists()


def test_record_tail_follows_a_rotated_proxy_log_and_skips_torn_lines(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / PROXY_RECORDS, max_bytes=400)
    tail = RecordTail(tmp_path)
    log.write_line(record_line(0, 1.0, pad=40))
    assert [r.bytes for r in tail.read()] == [0]
    for seq in range(1, 4):  # 0..2 fill the file, 3 rotates it
        log.write_line(record_line(seq, 1.0 + seq, pad=40))
    assert (tmp_path / (PROXY_RECORDS + ".1")).exists()
    with open(tmp_path / PROXY_RECORDS, "a") as f:
        f.write('{"seq": 99, "type": "L7", "verdict": "forwarded", "bytes": 99, "ti')  # still being written
    assert [r.bytes for r in tail.read()] == [1, 2, 3]
    with open(tmp_path / PROXY_RECORDS, "a") as f:
        f.write('me": 9.0}\nnot json\n')
    assert [(r.type, r.bytes) for r in tail.read()] == [("L7", 99)]


# --------------------------------------------------------------------------- from the end


def big_log(path: Path, lines: int, start: float = 1_000_000.0, step: float = 0.01) -> None:
    """A log of `lines` records of ~200 bytes, time increasing by `step`."""
    with open(path, "w") as f:
        for seq in range(lines):
            f.write(record_line(seq, round(start + seq * step, 6), pad=100) + "\n")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300,000 kernel flow records (~60 MB) plus a rotated file of 100,000 before them."""
    lab = tmp_path_factory.mktemp("lab")
    big_log(lab / (KERNEL_FLOWS + ".1"), 100_000, start=1_000_000.0)
    big_log(lab / KERNEL_FLOWS, 300_000, start=1_001_000.0)
    return lab


def test_last_records_read_only_the_end_of_a_big_file(big: Path, bytes_read: list[int]) -> None:
    size = (big / KERNEL_FLOWS).stat().st_size
    assert size > 50_000_000
    tail = RecordTail(big, names=(KERNEL_FLOWS,))
    tail.start_at_last(25)
    records = tail.read()
    assert [r.bytes for r in records] == list(range(299_975, 300_000))
    assert bytes_read[0] < 4 * logfiles.BLOCK  # a few blocks, not 60 MB
    # Following on from there reads only what is new.
    try:
        with open(big / KERNEL_FLOWS, "a") as f:
            f.write(record_line(300_000, 1_004_000.0) + "\n")
        assert [r.bytes for r in tail.read()] == [300_000]
        assert bytes_read[0] < 5 * logfiles.BLOCK
    finally:
        os.truncate(big / KERNEL_FLOWS, size)


def test_last_records_reach_into_the_rotated_file(tmp_path: Path, bytes_read: list[int]) -> None:
    big_log(tmp_path / (PROXY_RECORDS + ".1"), 50_000, start=1.0)
    big_log(tmp_path / PROXY_RECORDS, 3, start=10_000.0)
    tail = RecordTail(tmp_path, names=(PROXY_RECORDS,))
    tail.start_at_last(5)
    assert [(r.type, r.bytes) for r in tail.read()] == [("L7", 49_998), ("L7", 49_999), ("L7", 0), ("L7", 1), ("L7", 2)]
    assert bytes_read[0] < 4 * logfiles.BLOCK


def test_since_bisects_a_big_file(big: Path, bytes_read: list[int]) -> None:
    tail = RecordTail(big, names=(KERNEL_FLOWS,))
    since = 1_001_000.0 + 299_990 * 0.01  # the last ten records
    tail.start_at_time(since)
    assert [r.bytes for r in tail.read()] == list(range(299_990, 300_000))
    assert bytes_read[0] < 200 * logfiles.BLOCK  # a few blocks per bisection step, not the whole file


def test_since_starts_in_the_rotated_file_when_the_time_is_there(big: Path, bytes_read: list[int]) -> None:
    follower = FollowedFile(big / KERNEL_FLOWS)
    follower.start_at_time(1_000_000.0 + 99_995 * 0.01)  # the last 5 records of flows.jsonl.1
    lines = json_lines(follower.read())
    assert [next(lines)["seq"] for _ in range(6)] == [99_995, 99_996, 99_997, 99_998, 99_999, 0]
    assert bytes_read[0] < 200 * logfiles.BLOCK


def test_since_after_every_record_and_before_every_record(tmp_path: Path) -> None:
    big_log(tmp_path / KERNEL_FLOWS, 10_000, start=100.0, step=1.0)
    later = RecordTail(tmp_path, names=(KERNEL_FLOWS,))
    later.start_at_time(1e12)
    assert later.read() == []
    earlier = RecordTail(tmp_path, names=(KERNEL_FLOWS,))
    earlier.start_at_time(0.0)
    assert len(earlier.read()) == 10_000
    missing = RecordTail(tmp_path / "none")
    missing.start_at_last(3)
    missing.start_at_time(0.0)
    assert missing.read() == []


@pytest.mark.parametrize("count", [1, 2, 3, 7, 100])
def test_last_lines_of_small_files(tmp_path: Path, count: int) -> None:
    path = tmp_path / KERNEL_FLOWS
    path.write_text("".join(record_line(i, float(i)) + "\n" for i in range(5)) + '{"partial')
    follower = FollowedFile(path)
    follower.start_at_last(count)
    assert [r["seq"] for r in json_lines(follower.read())] == list(range(5))[-count:]


STDERR_WRITER = """
import logging, sys
from dataplane.logfiles import bound_stderr
bound_stderr(2000)
for i in range(100):
    if i % 2:
        print(f"error {i:03d} " + "x" * 80, file=sys.stderr)
    else:
        logging.getLogger("aiohttp.server").error("error %03d %s", i, "y" * 80)
"""


def test_a_process_keeps_its_stderr_log_under_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    with open(log, "ab") as err:
        done = subprocess.run([sys.executable, "-c", STDERR_WRITER], stderr=err, cwd=REPO)
    assert done.returncode == 0
    rotated = tmp_path / "proxy.log.1"
    assert log.stat().st_size <= 2000 and rotated.exists() and rotated.stat().st_size <= 2000
    assert log.read_text().splitlines()[-1].startswith("error 099 ")
    assert all(line.startswith("error ") for line in (rotated.read_text() + log.read_text()).splitlines())


def test_a_stderr_log_that_cannot_be_renamed_is_emptied_instead(tmp_path: Path) -> None:
    """A confined server cannot see its log's directory: it starts the file over at the cap."""
    log = tmp_path / "pod.log"
    with open(log, "ab+") as err:
        log.unlink()  # nothing to rename any more
        done = subprocess.run([sys.executable, "-c", STDERR_WRITER], stderr=err, cwd=REPO)
        assert done.returncode == 0
        assert 0 < os.fstat(err.fileno()).st_size <= 2000
        err.seek(0)
        assert err.read().decode().splitlines()[-1].startswith("error 099 ")
    assert list(tmp_path.iterdir()) == []


def test_a_rotation_between_the_followers_two_opens_repeats_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower opens NAME, then NAME.1; if the writer rotates in between, both are the same
    file, which must be read once."""
    path = tmp_path / PROXY_RECORDS
    log = RotatingLog(path, max_bytes=10_000)
    for seq in range(3):
        log.write_line(record_line(seq, float(seq)))
    real_open = logfiles._open_read

    def open_then_rotate(target: Path) -> int | None:
        fd = real_open(target)
        if target == path:
            log.rotate()  # NAME is now NAME.1
        return fd

    monkeypatch.setattr(logfiles, "_open_read", open_then_rotate)
    follower = FollowedFile(path)
    assert [r["seq"] for r in json_lines(follower.read())] == [0, 1, 2]
    monkeypatch.setattr(logfiles, "_open_read", real_open)
    log.write_line(record_line(3, 3.0))
    assert [r["seq"] for r in json_lines(follower.read())] == [3]
