"""With --workers every worker writes its access log to the same stdout pipe: a write larger
than PIPE_BUF can be split by another worker's when the reader lags, so lines would tear."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import time

from gateway.accesslog import PIPE_BUF, AccessLog

WRITERS = 4
TURNS = 25
LINES_PER_TURN = 60  # ~15 KiB a turn: several PIPE_BUFs in one flush


def _writer(fd: int, index: int) -> None:
    # As stdout under PYTHONUNBUFFERED (the image's): every write() goes to the fd at once.
    stream = io.TextIOWrapper(io.FileIO(fd, "w"), encoding="ascii", write_through=True)

    async def turns() -> None:
        log = AccessLog(stream)
        for turn in range(TURNS):
            for n in range(LINES_PER_TURN):
                log.write(
                    f"{index:016x}{turn * LINES_PER_TURN + n:08x}",
                    "GET",
                    "/api/" + "x" * 100,
                    200,
                    "allowed",
                    "ok",
                    f"jti-{index}-{turn}-{n}",
                    "alice",
                    1.0,
                    2.0,
                )
            await asyncio.sleep(0)  # the turn ends: its lines are flushed

    asyncio.run(turns())
    stream.close()


def test_lines_from_several_writers_never_tear_in_a_slow_pipe():
    read, write = os.pipe()
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(write, i)) for i in range(WRITERS)]
    for process in writers:
        process.start()
    os.close(write)
    received = bytearray()
    while chunk := os.read(read, 1024):  # a log shipper falling behind: the pipe stays full
        received += chunk
        time.sleep(0.0002)
    os.close(read)
    for process in writers:
        process.join(5)
        assert process.exitcode == 0
    lines = received.decode("ascii").splitlines()
    assert len(lines) == WRITERS * TURNS * LINES_PER_TURN
    torn = [line for line in lines if not _is_json(line)]
    assert torn == [], f"{len(torn)} torn lines, e.g. {torn[:2]}"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class Writes:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_turn_is_written_in_line_aligned_pieces_of_at_most_pipe_buf():
    stream = Writes()
    log = AccessLog(stream)  # type: ignore[arg-type]
    log._pending = [f'{{"n":{n},"pad":"{"p" * (n % 300)}"}}' for n in range(200)]
    log.flush()
    assert len(stream.writes) > 1
    assert all(len(w) <= PIPE_BUF and w.endswith("\n") for w in stream.writes)
    assert "".join(stream.writes).splitlines() == [
        f'{{"n":{n},"pad":"{"p" * (n % 300)}"}}' for n in range(200)
    ]


def test_a_line_longer_than_pipe_buf_is_written_alone():
    stream = Writes()
    log = AccessLog(stream)  # type: ignore[arg-type]
    long = '{"x":"' + "y" * (2 * PIPE_BUF) + '"}'
    log._pending = ['{"a":1}', long, '{"b":2}']
    log.flush()
    assert stream.writes == ['{"a":1}\n', long + "\n", '{"b":2}\n']
