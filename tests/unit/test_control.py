"""edgeproxy.control.plane and edgeproxy.telemetry.dataview: what crosses the control socket, and how the
workers' reports add up for the admin API."""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path

import pytest

from edgeproxy.control.acme import AcmeManager, ChallengeBook
from edgeproxy.control.plane import ControlChannelError, encode, read_message
from edgeproxy.control.providers.files import parse_routes
from edgeproxy.core.tls import CertStore
from edgeproxy.routes.model import Upstream
from edgeproxy.routes.table import RouteTable, build_table
from edgeproxy.telemetry.dataview import WorkerReports, WorkerStatus
from edgeproxy.telemetry.metrics import Metrics

ROUTES = {"routes": {
    "api": {"path": "/api", "upstreams": ["http://10.0.0.1:80", "http://10.0.0.2:80"],
            "rewrite": "^/api/(.*) => /v2/\\1", "cors.origins": "*", "ratelimit": "10/m",
            "health.path": "/hc", "request.headers.X-A": "1", "lb": "least_conn"},
    "wild": {"host": "*.example.com", "upstreams": ["https://10.0.0.3:443"],
             "tls.verify": False},
    "basic": {"path": "/basic", "upstreams": ["http://10.0.0.4:80"], "auth": "basic",
              "auth.users": "u:$2b$05$HRkLdMTE0o/hC70ORjzBIuBMHgJBBr5zhihDQhYgXtKGRPyYrJlH6",
              "ip.allow": "10.0.0.0/8", "ip.deny": "10.9.0.0/16"},
    "fwd": {"path": "/fwd", "upstreams": ["http://10.0.0.5:80"], "auth": "forward",
            "auth.url": "http://10.0.0.6/auth", "auth.response_headers": "Remote-User"},
    "jwt": {"path": "/jwt", "upstreams": ["http://10.0.0.7:80"], "auth": "jwt",
            "auth.scopes": "read", "ratelimit": "5/s", "ratelimit.key": "sub"},
}}


def table() -> RouteTable:
    return build_table([], parse_routes(ROUTES), failing={"http://10.0.0.2:80@10.0.0.2:80": "x"})


async def roundtrip(data: bytes) -> tuple[object, ...]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_message(reader)


def test_a_table_survives_the_socket_whole() -> None:
    sent = table()
    _, _, got, _ = asyncio.run(roundtrip(encode(("table", 1, sent, 0.0))))
    assert isinstance(got, RouteTable)
    assert got == sent
    route, prefix = got.match("", "/api/x")  # type: ignore[misc]
    assert (route.name, prefix) == ("api", "/api")
    # The compiled maps point at the routes of the same snapshot, not at copies.
    assert route is next(r for r in got.routes if r.name == "api")
    assert got.match("a.example.com", "/")[0].name == "wild"  # type: ignore[index]
    # Derived fields are rebuilt: the unhealthy replica is out of the pool, a fresh counter.
    assert [u.host for u in route.pool] == ["10.0.0.1"]
    assert next(route.counter) == 0


def test_messages_are_framed_and_checked() -> None:
    assert asyncio.run(roundtrip(encode(("challenge", "tok", "auth")))) == (
        "challenge", "tok", "auth")
    body = pickle.dumps(["not", "a", "tuple"])
    with pytest.raises(ControlChannelError, match="expected a tuple"):
        asyncio.run(roundtrip(len(body).to_bytes(4, "big") + body))
    with pytest.raises(ControlChannelError, match="expected at most"):
        asyncio.run(roundtrip((2**31).to_bytes(4, "big")))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(roundtrip(encode(("table",))[:-1]))


def test_worker_reports_add_up() -> None:
    reports = WorkerReports(Metrics(RouteTable), jwt_problem=None)
    u = Upstream("http", "10.0.0.1", 80, "http://10.0.0.1:80")
    now = time.time()
    reports.report(WorkerStatus(0, 100, in_flight=2, inflight={u.key: 2},
                                ratelimit_healthy=True))
    reports.report(WorkerStatus(1, 101, in_flight=3, inflight={u.key: 1},
                                ejected={u.key: now + 9.5}, ratelimit_healthy=False,
                                ratelimit_error="redis down", jwks_error="timeout"))
    assert reports.in_flight == 5
    assert reports.balancer.inflight == {u.key: 3}
    # Ejection is per worker: shown while any worker sits the replica out.
    left = reports.balancer.ejected_for(u)
    assert left is not None and 9 <= left <= 9.5
    assert reports.balancer.is_ejected(u)
    assert (reports.limiter.healthy, reports.limiter.last_error) == (False, "redis down")
    assert reports.verifier.jwks_error == "timeout"
    assert [w["worker"] for w in reports.workers_json()] == [0, 1]
    reports.gone(1, 999)  # a stale connection of an older worker 1: ignored
    assert reports.in_flight == 5
    reports.gone(1, 101)
    assert reports.in_flight == 2 and not reports.balancer.is_ejected(u)


def test_a_worker_answers_published_challenges_then_the_shared_files(tmp_path: Path) -> None:
    book = ChallengeBook(tmp_path)
    token = "A" * 43
    assert book.challenge_response(token) is None  # -> 404
    book.put(token, token + ".published")
    assert book.challenge_response(token) == token + ".published"
    book.put(token, None)
    # An answer whose message is still on its way is found in the state directory, where the
    # control plane's manager wrote it before asking the CA to validate.
    (tmp_path / "acme" / "challenges").mkdir(parents=True)
    (tmp_path / "acme" / "challenges" / token).write_text(token + ".file\n")
    assert book.challenge_response(token) == token + ".file"
    assert book.challenge_response("../etc/passwd") is None


def test_the_manager_hands_certificates_and_tokens_to_the_control_plane(tmp_path: Path) -> None:
    acme = AcmeManager("https://ca.invalid/dir", None, tmp_path, CertStore())
    seen: list[tuple[str, str | None]] = []
    acme.on_challenge = lambda token, answer: seen.append((token, answer))
    acme._put_challenge("tok", "tok.key")
    acme._drop_challenge("tok")
    assert seen == [("tok", "tok.key"), ("tok", None)]

