"""edgeproxy.proxy.decide: the pure first step of the pipeline, which /explain shares."""

from __future__ import annotations

import itertools

import pytest
from multidict import CIMultiDict

from edgeproxy.core.tls import Edge
from edgeproxy.proxy.decide import Plan, decide
from edgeproxy.proxy.exchange import LocalAnswer, Refusal
from edgeproxy.routes.model import Container
from edgeproxy.routes.table import RouteTable, build_table

_ids = itertools.count(1)


def table_of(*label_sets: dict[str, str]) -> RouteTable:
    return build_table([
        Container(id=f"{next(_ids):064x}", name=f"c{i}", labels=labels, state="running",
                  health=None, networks=(("app", f"172.18.0.{i + 2}"),), exposed_ports=(80,),
                  created=float(i), stopping=False)
        for i, labels in enumerate(label_sets)])


def ask(table: RouteTable, target: str, host: str = "example.test", method: str = "GET",
        secure: bool = False, edge: Edge | None = None,
        **headers: str) -> Plan | Refusal | LocalAnswer:
    hdrs: CIMultiDict[str] = CIMultiDict({"Host": host})
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return decide(table, method, target, hdrs, secure, edge or Edge())


def plan(result: Plan | Refusal | LocalAnswer) -> Plan:
    assert isinstance(result, Plan), result
    return result


@pytest.mark.parametrize(("labels", "target", "forwarded"), [
    ({"gateway.path": "/orders"}, "/orders/7?x=1", "/orders/7?x=1"),
    ({"gateway.path": "/orders", "gateway.strip_prefix": "true"}, "/orders/7", "/7"),
    ({"gateway.path": "/orders", "gateway.strip_prefix": "true"}, "/orders", "/"),
    # The rewrite applies after strip_prefix, then add_prefix: /explain once reported /v1/...
    ({"gateway.path": "/api", "gateway.strip_prefix": "true",
      "gateway.rewrite": r"^/v1/(.*) => /v2/\1", "gateway.add_prefix": "/base"},
     "/api/v1/orders?q=1", "/base/v2/orders?q=1"),
    ({"gateway.path": "/", "gateway.add_prefix": "/internal"}, "/a/%7e", "/internal/a/~"),
    ({"gateway.path": "/orders"}, "http://example.test/orders/1#frag", "/orders/1"),
])
def test_forwarded_target(labels: dict[str, str], target: str, forwarded: str) -> None:
    assert plan(ask(table_of(labels), target)).target == forwarded


def test_absolute_form_authority_replaces_host() -> None:
    table = table_of({"gateway.path": "/", "gateway.host": "a.test"},
                     {"gateway.path": "/", "gateway.host": "b.test"})
    p = plan(ask(table, "http://b.test:8080/x", host="a.test"))
    assert (p.host, p.authority, p.route.spec.hosts) == ("b.test", "b.test:8080", ("b.test",))


@pytest.mark.parametrize(("target", "status", "code"), [
    ("/nothing-here", 404, "no_route"),
    ("/orders/../../etc", 400, "bad_path"),
    ("/orders/%2e%2e/admin", 404, "no_route"),  # normalised once, to /admin, then matched
    ("http://user@example.test/orders", 400, "bad_target"),
    ("/orders/%2Fadmin", 400, "bad_path"),
])
def test_refusals(target: str, status: int, code: str) -> None:
    result = ask(table_of({"gateway.path": "/orders"}), target)
    assert isinstance(result, Refusal), result
    assert (result.status, result.code) == (status, code)


def test_semicolon_into_a_protected_route_is_refused() -> None:
    table = table_of({"gateway.path": "/api"},
                     {"gateway.path": "/api/admin", "gateway.auth": "jwt"})
    result = ask(table, "/api;x/admin")
    assert isinstance(result, Refusal) and result.code == "bad_path"


def test_bad_rewrite_names_the_route() -> None:
    table = table_of({"gateway.path": "/", "gateway.rewrite": r"^/(.*) => /../\1"})
    result = ask(table, "/x")
    assert isinstance(result, Refusal)
    assert (result.status, result.code, result.route) == (400, "bad_rewrite", "c0")


def test_cors_preflight_is_answered_and_simple_requests_get_headers() -> None:
    table = table_of({"gateway.path": "/", "gateway.cors.origins": "https://app.test"})
    pre = ask(table, "/x", method="OPTIONS", Origin="https://app.test",
              Access_Control_Request_Method="POST")
    assert isinstance(pre, LocalAnswer) and pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.test"
    p = plan(ask(table, "/x", Origin="https://app.test"))
    assert p.extra_headers == {"Access-Control-Allow-Origin": "https://app.test",
                               "Vary": "Origin"}
    assert plan(ask(table, "/x")).extra_headers is None


def test_https_redirect_only_when_a_certificate_covers_the_host() -> None:
    table = table_of({"gateway.path": "/", "gateway.host": "a.test", "gateway.tls": "true",
                      "gateway.tls.hsts": "1d"})
    covered = Edge(covers=lambda host: host == "a.test", redirect_port=8443)
    redirect = ask(table, "/x?y=1", host="a.test", edge=covered)
    assert isinstance(redirect, LocalAnswer)
    assert (redirect.status, redirect.headers["Location"]) == (308, "https://a.test:8443/x?y=1")
    # No certificate for the host: served in clear rather than redirected into an error.
    assert isinstance(ask(table, "/x", host="a.test", edge=Edge(covers=lambda _: False)), Plan)
    secure = plan(ask(table, "/x", host="a.test", secure=True, edge=covered))
    assert secure.extra_headers == {"Strict-Transport-Security": "max-age=86400"}


def test_acme_challenge_is_answered_before_routing_and_never_redirected() -> None:
    table = table_of({"gateway.path": "/", "gateway.tls": "true"})
    edge = Edge(covers=lambda _: True, challenge={"tok": "tok.key"}.get)
    answer = ask(table, "/.well-known/acme-challenge/tok", edge=edge)
    assert isinstance(answer, LocalAnswer)
    assert (answer.status, answer.body, answer.route) == (200, b"tok.key", "acme-challenge")
    unknown = ask(table, "/.well-known/acme-challenge/other", edge=edge)
    assert isinstance(unknown, Plan)  # not ours: the route gets it, without a redirect
    climbing = ask(table, "/.well-known/acme-challenge/../../admin", edge=edge)
    assert isinstance(climbing, LocalAnswer) and climbing.status == 308
