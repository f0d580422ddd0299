"""`MaskedFrames`, in front of both of aiohttp's frame readers (compiled and pure Python): masked
frames pass as sent however the reads split them, and the stream ends at the first unmasked
frame with nothing of it or after it delivered (RFC 6455 §5.1)."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket import reader_py
from aiohttp.streams import EofStream

from gateway.forward.websocket import MaskedFrames, UnmaskedFrame

try:
    from aiohttp._websocket import reader_c  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - aiohttp installed without its extensions
    reader_c = None

READERS = [
    pytest.param(reader_py, id="python"),
    pytest.param(
        reader_c,
        id="compiled",
        marks=pytest.mark.skipif(reader_c is None, reason="aiohttp without its C reader"),
    ),
]


class _Transport:
    """The RequestHandler as far as the queue sees it: paused or not."""

    _reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


def frame(opcode: int, payload: bytes, *, masked: bool = True, fin: bool = True) -> bytes:
    size = len(payload)
    bit = 0x80 if masked else 0
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def guarded(module: Any) -> tuple[MaskedFrames, Any]:
    queue = module.WebSocketDataQueue(_Transport(), 1 << 20, loop=asyncio.get_running_loop())
    reader = module.WebSocketReader(queue, 1 << 20, compress=False, decode_text=False)
    return MaskedFrames(reader, queue), queue


def feed(frames: MaskedFrames, stream: bytes, chunk: int) -> list[tuple[bool, bytes]]:
    return [frames.feed_data(stream[i : i + chunk]) for i in range(0, len(stream), chunk)]


async def drain(queue: Any) -> tuple[list[tuple[WSMsgType, bytes]], BaseException | None]:
    """Every message queued, then how the queue ended (None: a plain end of stream)."""
    got = []
    while True:
        try:
            msg = await queue.read()
        except EofStream:
            return got, None
        except Exception as exc:
            return got, exc
        got.append((msg.type, msg.data))


PAYLOADS = [b"", b"hi", b"a" * 125, b"b" * 126, b"c" * 300, b"d" * 65535, b"e" * 70_000]
CHUNKS = [1, 2, 3, 5, 13, 4096, 1 << 20]


@pytest.mark.parametrize("module", READERS)
@pytest.mark.parametrize("chunk", CHUNKS)
async def test_masked_frames_of_every_length_class_pass_whatever_the_reads(
    module: Any, chunk: int
) -> None:
    frames, queue = guarded(module)
    sent = [frame(1 if i % 2 else 2, p) for i, p in enumerate(PAYLOADS)]
    sent.insert(3, frame(9, b"ping"))  # control frames are frames too
    results = feed(frames, b"".join(sent), chunk)
    assert all(result == (False, b"") for result in results)
    frames.feed_eof()
    got, ended = await drain(queue)
    assert ended is None and not frames.refused
    assert [data for _kind, data in got] == [*PAYLOADS[:3], b"ping", *PAYLOADS[3:]]
    assert got[3][0] is WSMsgType.PING


@pytest.mark.parametrize("module", READERS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("payload", [b"", b"x" * 5, b"y" * 300, b"z" * 70_000])
async def test_the_stream_ends_at_the_first_unmasked_frame(
    module: Any, chunk: int, payload: bytes
) -> None:
    frames, queue = guarded(module)
    before = frame(1, b"before") + frame(2, b"f" * 300)
    stream = before + frame(1, payload, masked=False) + frame(1, b"after")
    results = feed(frames, stream, chunk)
    refused_at = next(i for i, result in enumerate(results) if result == (True, b""))
    # Refused in the read holding the unmasked frame's second byte (its mask bit), and every
    # read after it is refused without being looked at.
    assert refused_at == (len(before) + 1) // chunk
    assert all(result == (True, b"") for result in results[refused_at:])
    frames.feed_eof()  # the client drops the connection: the refusal stays the stream's end
    got, ended = await drain(queue)
    assert got == [(WSMsgType.TEXT, b"before"), (WSMsgType.BINARY, b"f" * 300)]
    assert isinstance(ended, UnmaskedFrame) and ended.code == 1002


@pytest.mark.parametrize("module", READERS)
async def test_an_unmasked_frame_right_at_the_start_delivers_nothing(module: Any) -> None:
    frames, queue = guarded(module)
    assert frames.feed_data(frame(1, b"", masked=False) + frame(1, b"after")) == (True, b"")
    got, ended = await drain(queue)
    assert got == [] and isinstance(ended, UnmaskedFrame)


@pytest.mark.parametrize("module", READERS)
async def test_the_readers_own_complaint_comes_first(module: Any) -> None:
    # A frame with RSV2 set (aiohttp refuses it), then an unmasked one in the same read: the
    # client is told about the first problem.
    frames, queue = guarded(module)
    bad = bytearray(frame(1, b"rsv"))
    bad[0] |= 0x20
    assert frames.feed_data(bytes(bad) + frame(1, b"u", masked=False)) == (True, b"")
    got, ended = await drain(queue)
    assert got == [] and ended is not None and not isinstance(ended, UnmaskedFrame)
    assert getattr(ended, "code", None) == 1002
