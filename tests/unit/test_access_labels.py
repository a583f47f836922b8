"""The access labels (gateway.auth=basic|forward, gateway.ip.*) through parse_labels, the
routes file, check and /routes: values, combinations and their errors."""

from __future__ import annotations

import io
import ipaddress
from pathlib import Path

import pytest

from edgeproxy.control.providers.files import parse_routes
from edgeproxy.ops.check import run_check
from edgeproxy.ops.views import access_checks, policies_json
from edgeproxy.policies.basic import BasicAuthSpec
from edgeproxy.policies.forwardauth import ForwardAuthSpec
from edgeproxy.policies.iplist import IpRules
from edgeproxy.routes.labels import LabelError, LabelsInvalid, Routing, parse_labels, suggest_key
from edgeproxy.routes.model import Route

ALICE = "alice:$2y$05$60chqj1SQq0tnFQyHYLlD.oL1feUdPNrSuOsvtyejP5WIuczv8Q6."
URL = "http://authelia:9091/api/authz/forward-auth"


def routing(labels: dict[str, str]) -> Routing:
    result = parse_labels({"gateway.path": "/admin", **labels})
    assert isinstance(result, Routing)
    return result


def errors(labels: dict[str, str]) -> list[LabelError]:
    with pytest.raises(LabelsInvalid) as exc:
        parse_labels({"gateway.path": "/admin", **labels})
    return exc.value.errors


def test_basic() -> None:
    auth = routing({"gateway.auth": "basic", "gateway.auth.users": ALICE,
                    "gateway.auth.users_file": "/run/secrets/htpasswd",
                    "gateway.auth.realm": "Admin", "gateway.auth.keep_authorization": "true",
                    }).spec.auth
    assert auth is not None and auth.kind == "basic"
    assert auth.basic == BasicAuthSpec((tuple(ALICE.split(":", 1)),),  # type: ignore[arg-type]
                                       "/run/secrets/htpasswd", "Admin", True)
    assert auth.basic.by_user == {"alice": ALICE.split(":", 1)[1].encode()}


def test_forward() -> None:
    auth = routing({"gateway.auth": "forward", "gateway.auth.url": URL,
                    "gateway.auth.response_headers": "Remote-User,Remote-Groups",
                    "gateway.auth.request_headers": "Cookie", "gateway.auth.timeout": "3s",
                    }).spec.auth
    assert auth is not None and auth.kind == "forward"
    assert auth.forward == ForwardAuthSpec(URL, ("Remote-User", "Remote-Groups"), ("Cookie",), 3.0)


def test_ip_lists_combine_with_auth() -> None:
    spec = routing({"gateway.ip.allow": "10.0.0.0/8,::1", "gateway.ip.deny": "10.6.6.6",
                    "gateway.auth": "basic", "gateway.auth.users": ALICE}).spec
    assert spec.ip == IpRules((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")),
                              (ipaddress.ip_network("10.6.6.6/32"),))
    assert spec.auth is not None and spec.auth.kind == "basic"


@pytest.mark.parametrize(("labels", "expected"), [
    ({"gateway.auth": "basic"},
     [LabelError("gateway.auth", "basic", "needs gateway.auth.users (htpasswd lines) or "
                 "gateway.auth.users_file")]),
    ({"gateway.auth": "forward"},
     [LabelError("gateway.auth", "forward", "needs gateway.auth.url (the auth service, e.g. "
                 "http://authelia:9091/api/authz/forward-auth)")]),
    ({"gateway.auth.users": ALICE},
     [LabelError("gateway.auth.users", ALICE, "needs gateway.auth=basic")]),
    ({"gateway.auth.url": URL}, [LabelError("gateway.auth.url", URL, "needs gateway.auth=forward")]),
    ({"gateway.auth": "jwt", "gateway.auth.users": ALICE},
     [LabelError("gateway.auth.users", ALICE, "belongs to gateway.auth=basic, but this route has "
                 "gateway.auth=jwt (one auth kind per route)")]),
    ({"gateway.auth": "basic", "gateway.auth.users": ALICE, "gateway.auth.url": URL},
     [LabelError("gateway.auth.url", URL, "belongs to gateway.auth=forward, but this route has "
                 "gateway.auth=basic (one auth kind per route)")]),
    ({"gateway.auth": "forward", "gateway.auth.url": URL, "gateway.auth.scopes": "a"},
     [LabelError("gateway.auth.scopes", "a", "belongs to gateway.auth=jwt, but this route has "
                 "gateway.auth=forward (one auth kind per route)")]),
    ({"gateway.auth": "forward", "gateway.auth.url": URL, "gateway.ratelimit": "5/s",
      "gateway.ratelimit.key": "sub"},
     [LabelError("gateway.ratelimit.key", "sub", "keys by the verified subject, which "
                 "gateway.auth=forward does not have: use jwt or basic, or key by ip or "
                 "header:<Name>")]),
])
def test_combination_errors(labels: dict[str, str], expected: list[LabelError]) -> None:
    assert errors(labels) == expected


def test_value_errors_name_label_value_and_why() -> None:
    weak = "bob:$apr1$lY3otKbC$9N//qdbIrmu4Iwwo2O8pC."
    [err] = errors({"gateway.auth": "basic", "gateway.auth.users": weak})
    assert (err.label, err.value) == ("gateway.auth.users", weak)
    assert "MD5 ($apr1$) is not accepted" in err.reason and "htpasswd -nbB bob" in err.reason
    [err] = errors({"gateway.ip.allow": "10.0.0.1/8"})
    assert err.label == "gateway.ip.allow" and "write '10.0.0.0/8'" in err.reason
    [err] = errors({"gateway.auth": "forward", "gateway.auth.url": URL,
                    "gateway.auth.response_headers": "Remote-User,Host"})
    assert err.label == "gateway.auth.response_headers" and "Host cannot be copied" in err.reason


@pytest.mark.parametrize(("key", "meant"), [
    ("ip.whitelist", "ip.allow"), ("ip.allowlist", "ip.allow"), ("ip.sourcerange", "ip.allow"),
    ("ip.block", None), ("auth.address", "auth.url"), ("auth.user", "auth.users"),
    ("auth.authresponseheaders", "auth.response_headers"), ("auth.users-file", "auth.users_file"),
    ("auth.response_header", "auth.response_headers"), ("ip", "ip.allow"),
    ("auth.keep-authorization", "auth.keep_authorization")])
def test_did_you_mean(key: str, meant: str | None) -> None:
    assert suggest_key(key) == meant


def test_routes_file_keys() -> None:
    [route] = parse_routes({"routes": {"admin": {
        "path": "/admin", "upstreams": ["http://127.0.0.1:9000"], "auth": "basic",
        "auth.users": [ALICE], "auth.realm": "Admin", "ip": {"allow": ["127.0.0.0/8", "::1"]}}}})
    assert route.spec.auth is not None and route.spec.auth.basic is not None
    assert route.spec.ip is not None and len(route.spec.ip.allow) == 2
    admin = Route(route.name, "file", route.spec, route.upstreams)
    assert policies_json(admin) == {
        "ip": {"allow": ["127.0.0.0/8", "::1/128"], "deny": []},
        "auth": {"type": "basic", "users": ["alice"], "users_file": None, "realm": "Admin",
                 "keep_authorization": False}}


def test_policies_json_forward_never_shows_hashes() -> None:
    spec = routing({"gateway.auth": "forward", "gateway.auth.url": URL,
                    "gateway.auth.response_headers": "Remote-User"}).spec
    assert policies_json(Route("r", "docker", spec, ()))["auth"] == {
        "type": "forward", "url": URL, "response_headers": ["Remote-User"],
        "request_headers": None, "timeout_s": None}
    basic = routing({"gateway.auth": "basic", "gateway.auth.users": ALICE}).spec
    shown = policies_json(Route("r", "docker", basic, ()))
    assert "$2y$" not in str(shown) and shown["auth"]["realm"] == "r"


def test_check_reports_weak_hashes_and_mixed_kinds(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yml"
    compose.write_text(
        "services:\n"
        "  admin:\n"
        "    labels:\n"
        "      gateway.path: /admin\n"
        "      gateway.auth: basic\n"
        "      gateway.auth.users: 'bob:$$apr1$$lY3otKbC$$9N//qdbIrmu4Iwwo2O8pC.'\n"
        "  app:\n"
        "    labels:\n"
        "      gateway.path: /app\n"
        "      gateway.auth: forward\n"
        "      gateway.auth.url: http://authelia:9091/api/authz/forward-auth\n"
        "      gateway.auth.users_file: /etc/htpasswd\n"
        "  lan:\n"
        "    labels:\n"
        "      gateway.path: /lan\n"
        "      gateway.ip.allow: 10.0.0.0/8\n")
    out = io.StringIO()
    assert run_check([str(compose)], out=out) == 1
    text = out.getvalue()
    assert "MD5 ($apr1$) is not accepted" in text and "htpasswd -nbB bob" in text
    assert "gateway.auth.users_file" in text and "one auth kind per route" in text
    assert "service lan" not in text


def test_explain_lists_the_checks_in_order() -> None:
    spec = routing({"gateway.ip.deny": "10.6.6.6", "gateway.auth": "basic",
                    "gateway.auth.users": ALICE, "gateway.ratelimit": "5/s"}).spec
    assert access_checks(Route("r", "docker", spec, ())) == ["ip", "auth:basic", "ratelimit"]
    assert access_checks(Route("r", "docker", routing({}).spec, ())) == []
