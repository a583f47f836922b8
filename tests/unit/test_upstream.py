"""edgeproxy.clients.upstream: the replica connection pool against in-process replicas that write
exact bytes. An answer ends where its framing says; what follows is never parsed into it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from edgeproxy.clients.upstream import (
    Endpoint,
    ResponseLimits,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

GET = b"GET /x HTTP/1.1\r\nHost: r\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: r\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
INJECTED = b"HTTP/1.1 200 OK\r\nSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n"

# One replica "script": given the connection's writer, its number and the request number on
# it, the bytes to write (None: close the connection).
Script = Callable[[asyncio.StreamWriter, int, int], Awaitable[bytes | None]]


@dataclass
class Replica:
    """Counts connections; each request head read is answered by `script`."""

    script: Script
    connections: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append((number, head.split(b"\r\n", 1)[0]))
                n += 1
                answer = await self.script(writer, number, n)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            self.closed.append(number)
            writer.close()


@asynccontextmanager
async def replica(script: Script) -> AsyncIterator[tuple[Replica, Endpoint]]:
    r = Replica(script)
    server = await asyncio.start_server(r.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield r, Endpoint("127.0.0.1", port)
    finally:
        server.close()
        for w in r.writers:
            w.close()


def answers(*chunks: bytes) -> Script:
    """Every request gets the same bytes."""
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes | None:
        return b"".join(chunks)
    return script


async def fetch(pool: UpstreamPool, ep: Endpoint, head: bytes = GET,
                method: str = "GET") -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(ep, head, method, None, False, idempotent=True)
    try:
        body = b"".join([c async for c in resp.iter_body()])
    finally:
        resp.release()
    return resp, body


async def until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


def pool(head: int = 64 * 1024, headers: int = 100) -> UpstreamPool:
    return UpstreamPool(2.0, 2.0, limits=ResponseLimits(head, headers))


# --- reuse and its end ------------------------------------------------------------------------

def test_a_clean_answer_leaves_the_connection_for_the_next_request() -> None:
    async def main() -> None:
        async with replica(answers(OK)) as (r, ep):
            p = pool()
            for _ in range(3):
                resp, body = await fetch(p, ep)
                assert (resp.status, body) == (200, b"ok")
            assert r.connections == 1
            p.close()
    asyncio.run(main())


def test_a_second_message_in_the_same_write_is_not_parsed_and_the_connection_is_dropped() -> None:
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + INJECTED) if conn == 1 \
            else OK

    async def main() -> None:
        async with replica(script) as (r, ep):
            p = pool()
            resp, body = await fetch(p, ep)
            assert (resp.status, body, resp.content_length) == (200, b"hello", 5)
            assert [n for n, _ in resp.raw_headers] == [b"Content-Length"]
            resp2, body2 = await fetch(p, ep)
            assert (resp2.status, body2) == (200, b"ok")
            assert r.connections == 2
            p.close()
    asyncio.run(main())


def test_bytes_on_an_idle_pooled_connection_discard_it() -> None:
    async def main() -> None:
        async with replica(answers(OK)) as (r, ep):
            p = pool()
            await fetch(p, ep)
            assert r.connections == 1
            r.writers[0].write(INJECTED)  # the replica speaks while nothing was asked
            await until(lambda: 1 in r.closed, "the proxy closing the idle connection")
            resp, body = await fetch(p, ep)
            assert (resp.status, body) == (200, b"ok")
            assert "set-cookie" not in {n.lower() for n, _ in resp.raw_headers}
            assert r.connections == 2
            p.close()
    asyncio.run(main())


def test_even_an_empty_line_on_an_idle_connection_discards_it() -> None:
    async def main() -> None:
        async with replica(answers(OK)) as (r, ep):
            p = pool()
            await fetch(p, ep)
            r.writers[0].write(b"\r\n")  # llhttp would skip it between messages
            await until(lambda: 1 in r.closed, "the proxy closing the idle connection")
            await fetch(p, ep)
            assert r.connections == 2
            p.close()
    asyncio.run(main())


@pytest.mark.parametrize("extra", [b"", INJECTED], ids=["body", "body and a message"])
def test_head_answer_followed_by_body_bytes_is_delivered_and_the_connection_dropped(
        extra: bytes) -> None:
    async def main() -> None:
        async with replica(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                                   + extra)) as (r, ep):
            p = pool()
            resp, body = await fetch(p, ep, HEAD, "HEAD")
            assert (resp.status, body, resp.content_length) == (200, b"", 5)
            await fetch(p, ep, HEAD, "HEAD")
            assert r.connections == 2
            p.close()
    asyncio.run(main())


def test_a_clean_head_answer_keeps_the_connection() -> None:
    async def main() -> None:
        async with replica(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")) as (r, ep):
            p = pool()
            for _ in range(2):
                resp, body = await fetch(p, ep, HEAD, "HEAD")
                assert (resp.status, body) == (200, b"")
            assert r.connections == 1
            p.close()
    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\n\r\nhello",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n" + INJECTED,
])
def test_bodyless_status_followed_by_bytes_drops_the_connection(answer: bytes) -> None:
    async def main() -> None:
        async with replica(answers(answer)) as (r, ep):
            p = pool()
            resp, body = await fetch(p, ep)
            assert body == b"" and resp.status in (204, 304)
            assert "set-cookie" not in {n.lower() for n, _ in resp.raw_headers}
            await fetch(p, ep)
            assert r.connections == 2
            p.close()
    asyncio.run(main())


def test_early_answer_before_the_body_was_sent_is_not_reused() -> None:
    async def main() -> None:
        body_sent = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 10
            await body_sent.wait()  # the client is slow: the replica answers first
            yield b"y" * 10

        async with replica(answers(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")) \
                as (r, ep):
            p = pool()
            resp = await p.request(ep, b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 20\r\n"
                                   b"\r\n", "POST", body(), False)
            assert resp.status == 413
            resp.release()
            await fetch(p, ep)
            assert r.connections == 2
            p.close()
    asyncio.run(main())


def test_trailers_never_become_headers_of_the_answer() -> None:
    async def main() -> None:
        async with replica(answers(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\nok\r\n0\r\nSet-Cookie: injected=1\r\n\r\n")) as (_, ep):
            p = pool()
            resp, body = await fetch(p, ep)
            assert body == b"ok"
            assert [n for n, _ in resp.raw_headers] == [b"Transfer-Encoding"]
            p.close()
    asyncio.run(main())


def test_interim_answers_are_skipped_and_a_reason_split_over_reads_is_whole() -> None:
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes:
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 Very")
        await w.drain()
        await asyncio.sleep(0.05)  # a separate read for the rest of the reason
        return b" Long Reason\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with replica(script) as (_r, ep):
            p = pool()
            resp, body = await fetch(p, ep)
            assert (resp.status, resp.reason, body) == (200, "Very Long Reason", b"ok")
            assert [n for n, _ in resp.raw_headers] == [b"Content-Length"]
            p.close()
    asyncio.run(main())


# --- refusals: 502 upstream_error in the proxy ------------------------------------------------

MALFORMED = {
    "duplicate content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n"
                                b"\r\nok",
    "content-length list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "content-length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "chunked and content-length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                  b"Content-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "gzip coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\n",
    "two transfer-encodings": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n",
    "chunk without its CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nokX0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "CR in a value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: x\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "status 000": b"HTTP/1.1 000 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2.0 after an interim head": b"HTTP/1.1 103 Early Hints\r\n\r\n"
                                      b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not HTTP": b"hello there\r\n\r\n",
    "NUL in the reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: upgrade\r\n\r\n\x81\x00",
    "bare 101": b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    "101 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
                   + b"Content-Length: 0\r\n\r\n",
    "head over the limit": b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000
                           + b"\r\nContent-Length: 0\r\n\r\n",
    "many small headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000)
                                                              for i in range(70))
                          + b"Content-Length: 0\r\n\r\n",
    "1xx flood": b"HTTP/1.1 100 Continue\r\n\r\n" * 3000 + b"HTTP/1.1 200 OK\r\n"
                 b"Content-Length: 0\r\n\r\n",
    "huge trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                     + b"X-T: " + b"a" * 200_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_answers_are_upstream_errors(answer: bytes) -> None:
    async def main() -> None:
        async with replica(answers(answer)) as (r, ep):
            p = pool()
            with pytest.raises(UpstreamError) as info:
                await fetch(p, ep)
            assert info.value.code == "upstream_error"
            assert "malformed response from the replica" in info.value.detail
            await until(lambda: 1 in r.closed, "the connection closed")
            p.close()
    asyncio.run(main())


def test_the_status_lines_version_is_checked_when_the_head_spans_reads() -> None:
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes:
        w.write(b"HTTP/2.0 200 OK\r\nX-A: ")
        await w.drain()
        await asyncio.sleep(0.05)  # the last read of the head starts like a status line
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with replica(script) as (_, ep):
            with pytest.raises(UpstreamError, match=r"HTTP/2\.0 in the status line"):
                await fetch(pool(), ep)
    asyncio.run(main())


def test_header_limits_come_from_the_pool() -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 300 + b"\r\nContent-Length: 0\r\n\r\n"
        async with replica(answers(head)) as (_, ep):
            resp, _ = await fetch(pool(), ep)
            assert resp.status == 200
            with pytest.raises(UpstreamError, match="response head over 256 bytes"):
                await fetch(pool(head=256), ep)
            with pytest.raises(UpstreamError, match="more than 1 header lines"):
                await fetch(pool(headers=1), ep)
    asyncio.run(main())


def test_a_head_still_arriving_is_refused_once_it_has_too_many_lines() -> None:
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes | None:
        w.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 150)  # and no end of the head
        await w.drain()
        await asyncio.sleep(5)
        return None

    async def main() -> None:
        async with replica(script) as (_, ep):
            with pytest.raises(UpstreamError, match="more than 100 header lines"):
                await fetch(pool(), ep)  # not the read timeout (2 s) of a head never ending
    asyncio.run(main())


def test_trailers_count_with_the_head_they_follow() -> None:
    # 150 bytes of head, 80 of trailers: each alone under a 200-byte limit, not together.
    head = b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 96 + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    trailers = b"X-T: " + b"t" * 30 + b"\r\nX-U: " + b"u" * 34 + b"\r\n"
    assert (len(head), len(trailers)) == (150, 78)

    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes:
        w.write(head + b"2\r\nok\r\n0\r\n")
        await w.drain()
        await asyncio.sleep(0.05)  # the trailers in a read of their own
        return trailers + b"\r\n"

    async def main() -> None:
        async with replica(script) as (_, ep):
            with pytest.raises(UpstreamError, match="response head over 200 bytes"):
                await fetch(pool(head=200), ep)
            _, body = await fetch(pool(head=240), ep)
            assert body == b"ok"
    asyncio.run(main())


def test_an_endless_head_is_cut_off_after_the_limit() -> None:
    sent = 0

    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes | None:
        nonlocal sent
        w.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        try:
            while sent < 64 * 1024 * 1024:
                w.write(b"a" * 65536)
                await w.drain()
                sent += 65536
        except ConnectionError:
            pass
        return None

    async def main() -> None:
        async with replica(script) as (r, ep):
            with pytest.raises(UpstreamError, match="response head over 65536 bytes"):
                await fetch(pool(), ep)
            await until(lambda: 1 in r.closed, "the replica's writes failing")
    asyncio.run(main())
    assert sent < 8 * 1024 * 1024  # socket buffers, not the 64 MB


def test_truncated_body_fails_the_stream() -> None:
    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes | None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        return None  # and close

    async def main() -> None:
        async with replica(script) as (_r, ep):
            p = pool()
            resp = await p.request(ep, GET, "GET", None, False)
            got = b""
            with pytest.raises(UpstreamError, match="closed the connection"):
                async for chunk in resp.iter_body():
                    got += chunk
            assert got in (b"", b"short")
            assert resp.failure() is not None
            resp.release()
    asyncio.run(main())


def test_endless_trailers_are_cut_off_after_the_limit() -> None:
    sent = 0

    async def script(w: asyncio.StreamWriter, conn: int, n: int) -> bytes | None:
        nonlocal sent
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        try:
            while sent < 64 * 1024 * 1024:
                w.write(b"a" * 65536)
                await w.drain()
                sent += 65536
        except ConnectionError:
            pass
        return None

    async def main() -> None:
        async with replica(script) as (r, ep):
            p = pool()
            resp = await p.request(ep, GET, "GET", None, False)
            with pytest.raises(UpstreamError, match="trailers over 65536 bytes"):
                async for _ in resp.iter_body():
                    pass
            resp.release()
            await until(lambda: 1 in r.closed, "the replica's writes failing")
    asyncio.run(main())
    assert sent < 8 * 1024 * 1024
