"""A raw HTTP/2 client for attack tests: frames built with hyperframe/hpack (h2's own
libraries), sent over a plain socket, and the server's frames read back one by one."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, SETTINGS, RST_STREAM, HEADERS, DATA = 7, 4, 3, 1, 0
ENHANCE_YOUR_CALM, PROTOCOL_ERROR, REFUSED_STREAM = 11, 1, 7


@dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """GOAWAY's or RST_STREAM's error code."""
        if self.type == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        return int(struct.unpack(">I", self.payload[:4])[0])

    def settings(self) -> dict[int, int]:
        return {struct.unpack(">H", self.payload[i:i + 2])[0]:
                struct.unpack(">I", self.payload[i + 2:i + 6])[0]
                for i in range(0, len(self.payload), 6)}


class RawH2:
    """One connection speaking HTTP/2 frame by frame."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder = Encoder()
        self._buf = b""
        self._batch: list[bytes] | None = None
        settings = SettingsFrame(0)
        if window is not None:
            settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = window
        self.send(PREFACE + settings.serialize())

    def send(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        else:
            self.sock.sendall(data)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Send every frame of the block in one write: a server that reads them all before it
        closes ends with FIN, not with a reset that could discard its GOAWAY on our side."""
        self._batch = []
        try:
            yield
            self.sock.sendall(b"".join(self._batch))
        finally:
            self._batch = None

    def headers(self, stream_id: int, path: str = "/", end_stream: bool = True,
                extra: list[tuple[str, str]] | None = None, authority: str = "test") -> None:
        block = self.encoder.encode([(":method", "GET" if end_stream else "POST"),
                                     (":scheme", "http"), (":authority", authority),
                                     (":path", path), *(extra or [])])
        f = HeadersFrame(stream_id, block)
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    def data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        f = DataFrame(stream_id, data)
        if end_stream:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    def rst(self, stream_id: int, code: int = 8) -> None:
        self.send(RstStreamFrame(stream_id, error_code=code).serialize())

    def ping(self, payload: bytes = b"12345678") -> None:
        self.send(PingFrame(0, payload).serialize())

    def empty_settings(self) -> None:
        self.send(SettingsFrame(0).serialize())

    def window_update(self, stream_id: int, increment: int) -> None:
        self.send(WindowUpdateFrame(stream_id, increment).serialize())

    def raw_headers_block(self, stream_id: int, first: bytes, continuations: list[bytes],
                          end: bool = False) -> None:
        frames = [HeadersFrame(stream_id, first)]
        for i, part in enumerate(continuations):
            c = ContinuationFrame(stream_id, part)
            if end and i == len(continuations) - 1:
                c.flags.add("END_HEADERS")
            frames.append(c)
        self.send(b"".join(f.serialize() for f in frames))

    def read_frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame from the server; None when it closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    head, self._buf = self._buf[:9 + length], self._buf[9 + length:]
                    return Frame(head[3], head[4],
                                 int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, head[9:])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    def until(self, frame_type: int, timeout: float = 10.0) -> Frame | None:
        """Read until a frame of this type (returned) or the end of the connection (None)."""
        while True:
            f = self.read_frame(timeout)
            if f is None or f.type == frame_type:
                return f

    def closed(self, timeout: float = 10.0) -> bool:
        """True once the server closed the connection (frames before that are skipped)."""
        while True:
            if self.read_frame(timeout) is None:
                return True

    def close(self) -> None:
        self.sock.close()
