"""The proxy's own life: graceful drain on SIGTERM, and routes-file reloads while running."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        yield stack.enter_context(run_backend("one")), stack.enter_context(run_backend("two"))


class Call(threading.Thread):
    """A GET through the proxy in the background; keeps the response or the exception."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.result: requests.Response | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = requests.get(self.url, timeout=30)
        except Exception as exc:
            self.error = exc


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def start_in_flight(proxy: ProxyProcess, path: str) -> Call:
    call = Call(proxy.url(path))
    call.start()
    wait_for(lambda: proxy.admin("/healthz")["in_flight"] == 1, timeout=5,
             what="the request to be in flight")
    return call


# --- SIGTERM drain ---------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, backends: tuple[str, str]) -> None:
    routes = write_routes(tmp_path / "routes.toml", {"all": {"path": "/", "upstreams": [backends[0]]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes), drain_timeout="6s") as proxy:
        call = start_in_flight(proxy, "/slow?s=2")
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(proxy.port), timeout=1.5,
                 what="the listener to close")
        assert call.is_alive(), "the in-flight request ended before the listener closed"
        code = proxy.proc.wait(timeout=8)
        call.join(5)
        elapsed = time.monotonic() - signalled
    assert call.error is None, call.error
    assert call.result is not None
    assert call.result.status_code == 200
    assert call.result.text == "slept one"
    assert code == 0
    assert elapsed < 6, f"exit took {elapsed:.1f}s"


def test_drain_timeout_cuts_long_requests_and_exits(
    tmp_path: Path, backends: tuple[str, str]
) -> None:
    routes = write_routes(tmp_path / "routes.toml", {"all": {"path": "/", "upstreams": [backends[0]]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes), drain_timeout="1s") as proxy:
        call = start_in_flight(proxy, "/slow?s=5")
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = proxy.proc.wait(timeout=6)
        elapsed = time.monotonic() - signalled
        call.join(5)
    assert code == 0
    assert elapsed < 4, f"exit took {elapsed:.1f}s with a 1 s drain timeout"
    assert not call.is_alive()
    ok = call.result is not None and call.result.status_code == 200 and "slept" in call.result.text
    assert not ok, "a request longer than the drain timeout must not complete"


# --- routes file reload ----------------------------------------------------------------------


@pytest.fixture
def reloading(tmp_path: Path, backends: tuple[str, str]) -> Iterator[tuple[ProxyProcess, Path]]:
    routes = write_routes(tmp_path / "routes.toml", {"one": {"path": "/one", "upstreams": [backends[0]]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes), routes_file_poll="100ms") as p:
        yield p, routes


def name_at(proxy: ProxyProcess, path: str) -> Any:
    r = requests.get(proxy.url(path), timeout=5)
    return r.json()["name"] if r.status_code == 200 else r.status_code


def replace_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_edited_routes_file_is_served_within_two_seconds(
    reloading: tuple[ProxyProcess, Path], backends: tuple[str, str]
) -> None:
    proxy, routes = reloading
    assert name_at(proxy, "/two/x") == 404
    write_routes(routes, {"one": {"path": "/one", "upstreams": [backends[0]]},
                          "two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/two/x") == "two", timeout=2, what="the new route")
    assert name_at(proxy, "/one") == "one"
    assert set(proxy.routes()) == {"one", "two"}
    # Removing a route takes effect the same way.
    write_routes(routes, {"two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/one") == 404, timeout=2, what="the route to go")


@pytest.mark.parametrize("text", [
    "this is [not toml",
    'route = "not a table"\n[routes.bad]\npath = "/bad"\nupstreams = ["http://127.0.0.1:1"]\n',
])
def test_invalid_routes_file_keeps_the_previous_routes(
    reloading: tuple[ProxyProcess, Path], backends: tuple[str, str], text: str
) -> None:
    proxy, routes = reloading
    replace_text(routes, text)
    events = wait_for(lambda: proxy.events("routes_file_invalid"), timeout=3,
                      what="a routes_file_invalid event")
    assert events[-1]["path"] == str(routes)
    assert events[-1]["error"]
    assert name_at(proxy, "/one") == "one"
    assert set(proxy.routes()) == {"one"}
    # A good file afterwards is picked up again.
    write_routes(routes, {"one": {"path": "/one", "upstreams": [backends[0]]},
                          "two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/two") == "two", timeout=2, what="recovery")


def containers(proxy: ProxyProcess) -> dict[str, Any]:
    return {c["container"]: c for c in proxy.admin("/containers")["containers"]}


@pytest.mark.parametrize(("bad", "label"), [
    ({"path": "/bad", "upstreams": ["ftp://127.0.0.1:1"]}, "routes.bad.upstreams"),
    ({"path": "no-slash", "upstreams": ["http://127.0.0.1:1"]}, "routes.bad.path"),
    ({"path": "/bad", "upstream": ["http://127.0.0.1:1"]}, "routes.bad.upstream"),
])
def test_an_invalid_route_is_skipped_and_the_others_are_served(
    reloading: tuple[ProxyProcess, Path], backends: tuple[str, str], bad: dict[str, Any],
    label: str,
) -> None:
    proxy, routes = reloading
    write_routes(routes, {"one": {"path": "/one", "upstreams": [backends[0]]},
                          "bad": bad,
                          "two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/two") == "two", timeout=3, what="the valid new route")
    assert name_at(proxy, "/one") == "one"
    assert set(proxy.routes()) == {"one", "two"}
    shown = containers(proxy)["routes file: bad"]
    assert shown["routed"] is False and shown["reason"].startswith("invalid, not routed: "), shown
    assert label in [e["label"] for e in shown["errors"]], shown
    [event] = [e for e in proxy.events("routes_file_route_invalid") if e["route"] == "bad"][-1:]
    assert event["level"] == "error" and event["kept_previous"] is False, event


def test_a_route_that_turns_invalid_keeps_its_last_good_version(
    reloading: tuple[ProxyProcess, Path], backends: tuple[str, str]
) -> None:
    proxy, routes = reloading
    write_routes(routes, {"one": {"path": "/one", "upstreams": [backends[0]],
                                  "strip_prefix": "maybe"},
                          "two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/two") == "two", timeout=3, what="the valid new route")
    assert name_at(proxy, "/one/x") == "one"  # the last good version, still served
    shown = containers(proxy)["routes file: one"]
    assert shown["routed"] is True and shown["route"] == "one", shown
    assert shown["reason"].startswith("invalid, serving its last good version: "
                                      "routes.one.strip_prefix='maybe'"), shown
    event = wait_for(lambda: [e for e in proxy.events("routes_file_route_invalid")
                              if e["route"] == "one"], 3, what="the event")[-1]
    assert event["kept_previous"] is True and "strip_prefix" in event["error"], event
    # Fixed: the new version, and nothing left in /containers.
    write_routes(routes, {"one": {"path": "/uno", "upstreams": [backends[0]]},
                          "two": {"path": "/two", "upstreams": [backends[1]]}})
    wait_for(lambda: name_at(proxy, "/uno") == "one", timeout=3, what="the fixed route")
    assert name_at(proxy, "/one") == 404
    assert "routes file: one" not in containers(proxy)
