"""edgeproxy.routes.labels.parse_labels: container labels -> Routing, NotRouted or every problem at once."""

from __future__ import annotations

import pytest

from edgeproxy.policies.ratelimit import KEY_EXPECTED, RATE_EXPECTED, RateLimitSpec
from edgeproxy.routes.labels import (
    LabelError,
    LabelsInvalid,
    NotRouted,
    Routing,
    known_keys_text,
    parse_labels,
    suggest_key,
)
from edgeproxy.routes.model import AuthSpec, HealthSpec, RouteSpec

KNOWN = "known keys are " + known_keys_text()


def _errors(labels: dict[str, str], **kwargs: object) -> list[LabelError]:
    with pytest.raises(LabelsInvalid) as info:
        parse_labels(labels, **kwargs)  # type: ignore[arg-type]
    return info.value.errors


def _routing(labels: dict[str, str], **kwargs: object) -> Routing:
    result = parse_labels(labels, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Routing), result
    return result


# --- path --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "paths"),
    [
        ("/orders", ("/orders",)),
        ("/", ("/",)),
        ("/orders/", ("/orders",)),  # a trailing slash is the same prefix
        ("/orders,/v1/orders", ("/orders", "/v1/orders")),
        (" /orders , /v1/orders ", ("/orders", "/v1/orders")),
        ("/orders,,/v1/orders,", ("/orders", "/v1/orders")),
        ("/orders,/orders/", ("/orders",)),  # duplicates collapse, order kept
        ("/b,/a", ("/b", "/a")),
        ("/~user", ("/~user",)),
        ("/a%3Ab", ("/a%3Ab",)),
        ("/v1.2/x", ("/v1.2/x",)),
    ],
)
def test_path_list(value: str, paths: tuple[str, ...]) -> None:
    routing = _routing({"gateway.path": value})
    assert routing.spec.paths == paths
    assert routing.spec.hosts == ()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("/a/../b", "path '/a/../b' is not canonical; write '/b'"),
        ("/a/./b", "path '/a/./b' is not canonical; write '/a/b'"),
        ("/a//b", "path '/a//b' is not canonical; write '/a/b'"),
        ("/%7euser", "path '/%7euser' is not canonical; write '/~user'"),
        ("/%41pi", "path '/%41pi' is not canonical; write '/Api'"),
        ("/a%3ab", "path '/a%3ab' is not canonical; write '/a%3Ab'"),
        ("/api/%2e%2e/admin", "path '/api/%2e%2e/admin' is not canonical; write '/admin'"),
        ("/orders?page=1", "path '/orders?page=1' must not hold a query or fragment"),
        ("/orders#top", "path '/orders#top' must not hold a query or fragment"),
        ("orders", "path 'orders' must start with '/'"),
        ("/orders,v1", "path 'v1' must start with '/'"),
        ("/a%2Fb", "path '/a%2Fb': the path holds an encoded slash (%2F)"),
        ("/..", "path '/..': the path climbs above the root with '..'"),
        ("/a b", "path '/a b': the path holds a character that is not allowed: ' '"),
        ("", "one or more path prefixes such as /orders, comma-separated"),
        (" , ", "one or more path prefixes such as /orders, comma-separated"),
    ],
)
def test_bad_path(value: str, reason: str) -> None:
    assert _errors({"gateway.path": value}) == [LabelError("gateway.path", value, reason)]


# --- host --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        ("api.example.com", ("api.example.com",)),
        ("API.Example.COM", ("api.example.com",)),
        ("api.example.com.", ("api.example.com",)),
        ("localhost", ("localhost",)),
        ("*.example.com", ("*.example.com",)),
        ("*.Example.com", ("*.example.com",)),
        ("a-b.example.com", ("a-b.example.com",)),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example",)),
        ("10.0.0.1", ("10.0.0.1",)),
        ("api.example.com,*.example.com", ("api.example.com", "*.example.com")),
        (" a.example.com , b.example.com ", ("a.example.com", "b.example.com")),
        ("a.example.com,A.EXAMPLE.COM", ("a.example.com",)),
    ],
)
def test_host_list(value: str, hosts: tuple[str, ...]) -> None:
    routing = _routing({"gateway.host": value})
    assert routing.spec.hosts == hosts
    assert routing.spec.paths == ("/",)  # a host alone routes every path


def _not_a_host(part: str) -> str:
    return (f"host {part!r} is not a host name (letters, digits, '-', dots; "
            "'*.' allowed as the first label; no port)")


@pytest.mark.parametrize(
    ("value", "part"),
    [
        ("api.example.com:8080", "api.example.com:8080"),
        ("localhost:80", "localhost:80"),
        ("my_service.example.com", "my_service.example.com"),
        ("-api.example.com", "-api.example.com"),
        ("api-.example.com", "api-.example.com"),
        ("api..example.com", "api..example.com"),
        ("*", "*"),
        ("*.", "*."),
        ("a.*.example.com", "a.*.example.com"),
        ("**.example.com", "**.example.com"),
        ("http://api.example.com", "http://api.example.com"),
        ("api.example.com/orders", "api.example.com/orders"),
        ("b\u00fccher.example", "b\u00fccher.example"),
        ("[::1]", "[::1]"),
        ("a" * 64 + ".example.com", "a" * 64 + ".example.com"),
        ("good.example.com,bad host", "bad host"),
    ],
)
def test_bad_host(value: str, part: str) -> None:
    assert _errors({"gateway.host": value}) == [
        LabelError("gateway.host", value, _not_a_host(part))
    ]


def test_host_longer_than_253_is_refused() -> None:
    host = ".".join(["a" * 63] * 4)  # 255 characters, every label within 63
    assert _errors({"gateway.host": host}) == [LabelError("gateway.host", host, _not_a_host(host))]


def test_empty_host_list() -> None:
    assert _errors({"gateway.host": " , "}) == [
        LabelError("gateway.host", " , ",
                   "one or more host names such as api.example.com, comma-separated")
    ]


def test_host_and_path_together() -> None:
    routing = _routing({"gateway.host": "api.example.com", "gateway.path": "/v1,/v2"})
    assert routing.spec == RouteSpec(hosts=("api.example.com",), paths=("/v1", "/v2"))


# --- port, network, strip_prefix -------------------------------------------------------------

@pytest.mark.parametrize(("value", "port"), [("1", 1), ("80", 80), ("8080", 8080), ("65535", 65535),
                                             (" 8080 ", 8080)])
def test_port(value: str, port: int) -> None:
    routing = _routing({"gateway.path": "/", "gateway.port": value})
    assert routing.port == port


@pytest.mark.parametrize("value", ["0", "65536", "99999", "-1", "+80", "http", "80a", "8080/tcp",
                                   "80.0", "", " ", "\u00b2"])
def test_bad_port(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.port": value}) == [
        LabelError("gateway.port", value, "a port number between 1 and 65535")
    ]


@pytest.mark.parametrize(("value", "network"), [("backend", "backend"), ("app_default", "app_default"),
                                                ("my-net.1", "my-net.1"), (" web ", "web")])
def test_network(value: str, network: str) -> None:
    routing = _routing({"gateway.path": "/", "gateway.network": value})
    assert routing.network == network


@pytest.mark.parametrize("value", ["", "-net", "_net", "my net", "net/1", "n\u00e9t"])
def test_bad_network(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.network": value}) == [
        LabelError("gateway.network", value, "a Docker network name")
    ]


def test_port_and_network_default_to_none() -> None:
    routing = _routing({"gateway.path": "/orders"})
    assert routing.port is None
    assert routing.network is None
    assert routing.spec.strip_prefix is False


@pytest.mark.parametrize(
    ("value", "strip"),
    [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True),
     ("false", False), ("False", False), ("no", False), ("off", False), ("0", False)],
)
def test_strip_prefix(value: str, strip: bool) -> None:
    routing = _routing({"gateway.path": "/orders", "gateway.strip_prefix": value})
    assert routing.spec.strip_prefix is strip


@pytest.mark.parametrize("value", ["", "maybe", "2", "enabled"])
def test_bad_strip_prefix(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.strip_prefix": value}) == [
        LabelError("gateway.strip_prefix", value, "true or false")
    ]


# --- enable, exposed_by_default, prefix ---------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "FALSE", "no", "off", "0"])
def test_enable_false_is_not_routed(value: str) -> None:
    result = parse_labels({"gateway.enable": value, "gateway.path": "/orders"})
    assert result == NotRouted("gateway.enable=false")


def test_enable_false_wins_over_bad_labels() -> None:
    # A container switched off explicitly is not an error, whatever else it carries.
    result = parse_labels({"gateway.enable": "false", "gateway.port": "nope", "gateway.pth": "/x"})
    assert result == NotRouted("gateway.enable=false")


@pytest.mark.parametrize(
    "labels",
    [
        {},
        {"com.docker.compose.service": "orders", "maintainer": "ops"},
        {"traefik.http.routers.x.rule": "Host(`x`)"},
        {"gatewayx.path": "/orders"},
        {"gateway": "/orders"},
        {"my.gateway.path": "/orders"},
    ],
)
def test_no_gateway_labels_is_not_routed(labels: dict[str, str]) -> None:
    assert parse_labels(labels) == NotRouted("no gateway.* labels")


def test_enable_true_routes() -> None:
    routing = _routing({"gateway.enable": "true", "gateway.path": "/orders"})
    assert routing.spec.paths == ("/orders",)


def test_bad_enable_value() -> None:
    assert _errors({"gateway.enable": "maybe", "gateway.path": "/"}) == [
        LabelError("gateway.enable", "maybe", "true or false")
    ]


def test_exposed_by_default_false_requires_enable_true() -> None:
    labels = {"gateway.path": "/orders"}
    assert parse_labels(labels, exposed_by_default=False) == NotRouted(
        "gateway.enable=true is required (EDGEPROXY_EXPOSED_BY_DEFAULT=false)"
    )
    routing = _routing({**labels, "gateway.enable": "true"}, exposed_by_default=False)
    assert routing.spec.paths == ("/orders",)
    assert parse_labels({**labels, "gateway.enable": "false"}, exposed_by_default=False) == NotRouted(
        "gateway.enable=false"
    )


def test_custom_prefix() -> None:
    labels = {
        "edge.path": "/orders",
        "edge.port": "9000",
        "gateway.path": "/ignored",
        "gateway.bogus": "ignored too",
        "traefik.enable": "true",
    }
    routing = _routing(labels, prefix="edge")
    assert routing.spec.paths == ("/orders",)
    assert routing.port == 9000


def test_custom_prefix_names_itself_in_messages() -> None:
    assert parse_labels({"gateway.path": "/orders"}, prefix="edge") == NotRouted("no edge.* labels")
    assert parse_labels({"edge.enable": "no", "edge.path": "/"}, prefix="edge") == NotRouted(
        "edge.enable=false"
    )
    assert _errors({"edge.port": "x", "edge.path": "/"}, prefix="edge") == [
        LabelError("edge.port", "x", "a port number between 1 and 65535")
    ]


def test_dotted_custom_prefix() -> None:
    routing = _routing({"com.example.gw.path": "/a", "com.example.gw.host": "a.example.com"},
                       prefix="com.example.gw")
    assert routing.spec == RouteSpec(hosts=("a.example.com",), paths=("/a",))


# --- unknown keys, several errors, missing route --------------------------------------------------

@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("pth", "path"),
        ("paht", "path"),
        ("paths", "path"),
        ("hots", "host"),
        ("hst", "host"),
        ("hosts", "host"),
        ("prot", "port"),
        ("prt", "port"),
        ("enabel", "enable"),
        ("enabled", "enable"),
        ("netwrok", "network"),
        ("netwrk", "network"),
        ("strip-prefix", "strip_prefix"),
        ("stripprefix", "strip_prefix"),
        ("strip_prefx", "strip_prefix"),
        ("Path", "path"),
        # the keys that came with load balancing, retries, timeouts and health checks
        ("weigth", "weight"),
        ("weights", "weight"),
        ("retry", "retries"),
        ("retires", "retries"),
        ("timeout_read", "timeout.read"),
        ("timeout.reed", "timeout.read"),
        ("timeout_connect", "timeout.connect"),
        ("timeout.conect", "timeout.connect"),
        ("health.pth", "health.path"),
        ("health.endpoint", "health.path"),
        ("health.intervall", "health.interval"),
        ("health.timout", "health.timeout"),
        ("health.statuses", "health.status"),
        ("health.status_code", "health.status"),
        ("health.fail", "health.fails"),
        ("health.pass", "health.passes"),
        # the same words in another order
        ("read_timeout", "timeout.read"),
        ("connect_timeout", "timeout.connect"),
        ("scopes.auth", "auth.scopes"),
        ("key.ratelimit", "ratelimit.key"),
        ("ratelimit_key", "ratelimit.key"),
        ("rate-limit", "ratelimit"),
        # the policy keys
        ("auht", "auth"),
        ("auth.scope", "auth.scopes"),
        ("auth.scops", "auth.scopes"),
        ("auth.audiance", "auth.audience"),
        ("auth.audiences", "auth.audience"),
        ("ratelimt", "ratelimit"),
        ("ratelimits", "ratelimit"),
        ("ratelimit.keys", "ratelimit.key"),
        # words other proxies use for our keys
        ("url", "path"),
        ("uri", "path"),
        ("prefix", "path"),
        ("rule", "path"),
        ("domain", "host"),
        ("hostname", "host"),
        ("strip", "strip_prefix"),
        ("loadbalancer", "lb"),
        ("rate", "ratelimit"),
        ("rate_limit", "ratelimit"),
        ("server.port", "port"),
        ("health.url", "health.path"),
        ("health.uri", "health.path"),
    ],
)
def test_unknown_key_suggests_the_known_one(key: str, suggestion: str) -> None:
    label = f"gateway.{key}"
    errors = _errors({"gateway.path": "/", label: "x"})
    # Only the suggestion: the list of every known key would bury it.
    assert errors == [LabelError(label, "x", f"unknown key; did you mean {suggestion!r}?")]
    assert suggest_key(key) == suggestion


@pytest.mark.parametrize("key", ["middlewares", "loadbalancer.server.port", "", "maintainer", "zone",
                                 "sticky", "version", "lb.algorithm", "LB", "jwt"])
def test_unknown_key_without_close_match(key: str) -> None:
    label = f"gateway.{key}"
    assert _errors({"gateway.path": "/", label: "jwt"}) == [
        LabelError(label, "jwt", f"unknown key; {KNOWN}")
    ]
    assert suggest_key(key) is None


@pytest.mark.parametrize(("key", "family"), [("healthcheck", "health.*"), ("tokens", "auth.*")])
def test_unknown_key_without_suggestion_lists_the_families(key: str, family: str) -> None:
    # No single key is convincingly close, so the folded list points at the family instead.
    [error] = _errors({"gateway.path": "/", f"gateway.{key}": "x"})
    assert error.reason == f"unknown key; {KNOWN}"
    assert family in KNOWN.split(", ")


def test_known_keys_text_folds_families() -> None:
    shown = known_keys_text().split(", ")
    assert shown == sorted(shown)
    assert {"health.*", "timeout.*", "auth.*"} <= set(shown)
    assert not any(k.startswith(("health.", "timeout.", "auth.")) and k[-2:] != ".*" for k in shown)
    # a bare key stays beside its family; a family of one is not folded
    assert {"auth", "ratelimit", "ratelimit.key", "path", "host", "port", "lb"} <= set(shown)


@pytest.mark.parametrize(
    ("key", "acceptable"),
    [
        # KNOWN BUG: an undotted key is only compared with undotted keys, so gateway.health=/healthz
        # gets 'path', and following that hint routes /healthz to the service instead of probing it.
        ("health", {"health.path", None}),
        # KNOWN BUG: when no sibling is close, a dotted key falls back to difflib over whole keys,
        # where the shared family name outweighs the word that differs.
        ("health.host", {None}),  # -> 'health.status'
        ("health.method", {None}),  # -> 'health.path'
        ("scopes", {"auth.scopes", None}),  # -> 'compress' once that key exists
        ("auth.type", {"auth", None}),  # -> 'auth.scopes'; auth=jwt is the scheme
        ("auth.issuer", {None}),  # -> 'auth.scopes'
        ("ratelimit.period", {"ratelimit", None}),  # -> 'ratelimit.key'; the period is in ratelimit
        ("priority", {None}),  # -> 'port'; a Traefik router priority is no port
    ],
)
def test_unknown_key_suggestion_is_not_misleading(key: str, acceptable: set[str | None]) -> None:
    label = f"gateway.{key}"
    [error] = _errors({"gateway.path": "/", label: "x"})
    assert suggest_key(key) in acceptable
    expected = {f"unknown key; did you mean {k!r}?" if k else f"unknown key; {KNOWN}" for k in acceptable}
    assert error.reason in expected


def test_auth_typo_suggests_auth() -> None:
    # gateway.auth is the label this check exists for: a policy typo must not be silent.
    assert _errors({"gateway.path": "/admin", "gateway.auht": "jwt"}) == [
        LabelError("gateway.auht", "jwt", "unknown key; did you mean 'auth'?")
    ]


def test_unknown_key_is_an_error_even_with_a_valid_route() -> None:
    # gateway.auht=jwt must not silently expose a service without its policy.
    with pytest.raises(LabelsInvalid, match=r"^gateway\.auht='jwt': unknown key; "):
        parse_labels({"gateway.path": "/admin", "gateway.auht": "jwt"})


def test_several_errors_are_reported_together() -> None:
    labels = {
        "gateway.path": "/a/../b",
        "gateway.host": "api.example.com:443",
        "gateway.port": "http",
        "gateway.network": "-bad",
        "gateway.strip_prefix": "perhaps",
        "gateway.pth": "/x",
    }
    with pytest.raises(LabelsInvalid) as info:
        parse_labels(labels)
    errors = info.value.errors
    assert [e.label for e in errors] == [
        "gateway.host", "gateway.network", "gateway.path", "gateway.port", "gateway.pth",
        "gateway.strip_prefix",
    ]
    assert errors[0] == LabelError("gateway.host", "api.example.com:443",
                                   _not_a_host("api.example.com:443"))
    assert errors[2] == LabelError("gateway.path", "/a/../b",
                                   "path '/a/../b' is not canonical; write '/b'")
    assert errors[3] == LabelError("gateway.port", "http", "a port number between 1 and 65535")
    # The exception text carries every problem, ready for one log line.
    assert str(info.value) == "; ".join(str(e) for e in errors)
    assert str(info.value).startswith(
        "gateway.host='api.example.com:443': host 'api.example.com:443' is not a host name"
    )


def test_label_error_str() -> None:
    assert str(LabelError("gateway.port", "http", "a port number between 1 and 65535")) == (
        "gateway.port='http': a port number between 1 and 65535"
    )


@pytest.mark.parametrize(
    "labels",
    [
        {"gateway.port": "8080"},
        {"gateway.enable": "true"},
        {"gateway.network": "backend", "gateway.strip_prefix": "true"},
    ],
)
def test_missing_path_and_host(labels: dict[str, str]) -> None:
    assert _errors(labels) == [
        LabelError("gateway.path", "",
                   "missing: a routed container needs gateway.path or gateway.host "
                   "(or set gateway.enable=false)")
    ]


def test_missing_path_and_host_with_custom_prefix() -> None:
    assert _errors({"edge.port": "80"}, prefix="edge") == [
        LabelError("edge.path", "", "missing: a routed container needs edge.path or edge.host "
                                    "(or set edge.enable=false)")
    ]


def test_full_routing() -> None:
    routing = _routing({
        "gateway.enable": "true",
        "gateway.host": "Shop.Example.com,*.shop.example.com",
        "gateway.path": "/orders,/v1/orders/",
        "gateway.port": "8080",
        "gateway.network": "backend",
        "gateway.strip_prefix": "true",
        "com.docker.compose.service": "orders",
    })
    assert routing == Routing(
        spec=RouteSpec(hosts=("shop.example.com", "*.shop.example.com"),
                       paths=("/orders", "/v1/orders"), strip_prefix=True),
        port=8080,
        network="backend",
    )


# --- load balancing, retries, timeouts ---------------------------------------------------------

def test_new_keys_default() -> None:
    routing = _routing({"gateway.path": "/orders"})
    assert routing.weight == 1
    spec = routing.spec
    assert (spec.lb, spec.retries, spec.connect_timeout, spec.read_timeout, spec.health) == (
        "round_robin", None, None, None, None)  # None: the EDGEPROXY_* setting applies


@pytest.mark.parametrize(
    ("value", "lb"),
    [("round_robin", "round_robin"), ("least_conn", "least_conn"), (" Least_Conn ", "least_conn"),
     ("ROUND_ROBIN", "round_robin")],
)
def test_lb(value: str, lb: str) -> None:
    assert _routing({"gateway.path": "/", "gateway.lb": value}).spec.lb == lb


@pytest.mark.parametrize("value", ["", "random", "roundrobin", "least-conn", "leastconn", "rr"])
def test_bad_lb(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.lb": value}) == [
        LabelError("gateway.lb", value, "round_robin or least_conn")
    ]


@pytest.mark.parametrize(("value", "weight"), [("1", 1), ("5", 5), ("100", 100), (" 7 ", 7), ("007", 7)])
def test_weight(value: str, weight: int) -> None:
    routing = _routing({"gateway.path": "/", "gateway.weight": value})
    assert routing.weight == weight
    # a replica setting: replicas of one service may differ in weight and still share the route
    assert routing.spec == RouteSpec()


@pytest.mark.parametrize("value", ["0", "101", "-1", "+2", "1.5", "", "heavy", "1e2", "\u0663"])
def test_bad_weight(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.weight": value}) == [
        LabelError("gateway.weight", value, "replica weight: a whole number from 1 to 100")
    ]


@pytest.mark.parametrize(("value", "retries"), [("0", 0), ("1", 1), ("10", 10), (" 3 ", 3)])
def test_retries(value: str, retries: int) -> None:
    assert _routing({"gateway.path": "/", "gateway.retries": value}).spec.retries == retries


@pytest.mark.parametrize("value", ["11", "-1", "", "two", "1.0", "100"])
def test_bad_retries(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.retries": value}) == [
        LabelError("gateway.retries", value, "extra tries: a whole number from 0 to 10")
    ]


DURATIONS = [("2s", 2.0), ("250ms", 0.25), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("3", 3.0),
             (" 10s ", 10.0), ("2 s", 2.0)]


@pytest.mark.parametrize(("key", "attr"), [("timeout.connect", "connect_timeout"),
                                           ("timeout.read", "read_timeout")])
@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_timeouts(key: str, attr: str, value: str, seconds: float) -> None:
    spec = _routing({"gateway.path": "/", f"gateway.{key}": value}).spec
    assert getattr(spec, attr) == pytest.approx(seconds)


NOT_A_DURATION = "a duration such as 250ms, 2s or 1m"
NOT_POSITIVE = "a duration greater than zero, such as 2s"
BAD_DURATIONS = [("", NOT_A_DURATION), ("fast", NOT_A_DURATION), ("-1s", NOT_A_DURATION),
                 ("2sec", NOT_A_DURATION), ("1e3", NOT_A_DURATION), ("2w", NOT_A_DURATION),
                 ("0", NOT_POSITIVE), ("0s", NOT_POSITIVE), ("0ms", NOT_POSITIVE),
                 ("0.0m", NOT_POSITIVE)]


@pytest.mark.parametrize("key", ["timeout.connect", "timeout.read", "health.interval", "health.timeout"])
@pytest.mark.parametrize(("value", "reason"), BAD_DURATIONS)
def test_bad_durations(key: str, value: str, reason: str) -> None:
    labels = {"gateway.path": "/", "gateway.health.path": "/healthz", f"gateway.{key}": value}
    assert _errors(labels) == [LabelError(f"gateway.{key}", value, reason)]


# --- active health checks ----------------------------------------------------------------------

def test_health_spec_defaults() -> None:
    spec = HealthSpec("/healthz")
    assert (spec.path, spec.interval, spec.timeout, spec.status_min, spec.status_max, spec.fails,
            spec.passes) == ("/healthz", 5.0, 2.0, 200, 399, 3, 2)
    assert spec.timeout <= spec.interval  # the defaults pass their own validation


def test_health_path_alone_gives_the_defaults() -> None:
    routing = _routing({"gateway.path": "/orders", "gateway.health.path": "/healthz"})
    assert routing.spec.health == HealthSpec("/healthz")


def test_every_health_key() -> None:
    routing = _routing({
        "gateway.path": "/orders",
        "gateway.health.path": "/ready",
        "gateway.health.interval": "10s",
        "gateway.health.timeout": "500ms",
        "gateway.health.status": "200-299",
        "gateway.health.fails": "5",
        "gateway.health.passes": "1",
    })
    assert routing.spec.health == HealthSpec(path="/ready", interval=10.0, timeout=0.5, status_min=200,
                                             status_max=299, fails=5, passes=1)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("/healthz", "/healthz"),
        (" /healthz ", "/healthz"),
        ("/", "/"),
        ("/health?full=1", "/health?full=1"),  # a query is allowed here, unlike in gateway.path
        ("/healthz?", "/healthz"),
        ("/api/v1/health", "/api/v1/health"),
        ("/%7ehealth", "/~health"),  # normalised like any request path
    ],
)
def test_health_path(value: str, path: str) -> None:
    health = _routing({"gateway.path": "/", "gateway.health.path": value}).spec.health
    assert health is not None
    assert health.path == path


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "a path starting with '/', such as /healthz"),
        ("healthz", "a path starting with '/', such as /healthz"),
        ("http://x/healthz", "a path starting with '/', such as /healthz"),
        ("?x=1", "a path starting with '/', such as /healthz"),
        ("/a%2Fb", "path '/a%2Fb': the path holds an encoded slash (%2F)"),
        ("/..", "path '/..': the path climbs above the root with '..'"),
        ("/a b", "path '/a b': the path holds a character that is not allowed: ' '"),
    ],
)
def test_bad_health_path(value: str, reason: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.health.path": value}) == [
        LabelError("gateway.health.path", value, reason)
    ]


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [("200", 200, 200), ("200-299", 200, 299), (" 200 - 204 ", 200, 204), ("100-599", 100, 599),
     ("204-204", 204, 204), ("500-599", 500, 599)],
)
def test_health_status(value: str, low: int, high: int) -> None:
    health = _routing({"gateway.path": "/", "gateway.health.path": "/h",
                       "gateway.health.status": value}).spec.health
    assert health is not None
    assert (health.status_min, health.status_max) == (low, high)


NOT_A_STATUS = "a status or status range such as 200 or 200-399"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", NOT_A_STATUS),
        ("2xx", NOT_A_STATUS),
        ("099", NOT_A_STATUS),
        ("600", NOT_A_STATUS),
        ("200-", NOT_A_STATUS),
        ("200,204", NOT_A_STATUS),
        ("200-600", NOT_A_STATUS),
        ("ok", NOT_A_STATUS),
        ("299-200", "a status range low-high with low <= high, such as 200-399"),
    ],
)
def test_bad_health_status(value: str, reason: str) -> None:
    labels = {"gateway.path": "/", "gateway.health.path": "/h", "gateway.health.status": value}
    assert _errors(labels) == [LabelError("gateway.health.status", value, reason)]


@pytest.mark.parametrize(("key", "attr"), [("fails", "fails"), ("passes", "passes")])
@pytest.mark.parametrize(("value", "count"), [("1", 1), ("3", 3), ("100", 100), (" 2 ", 2)])
def test_health_counts(key: str, attr: str, value: str, count: int) -> None:
    health = _routing({"gateway.path": "/", "gateway.health.path": "/h",
                       f"gateway.health.{key}": value}).spec.health
    assert getattr(health, attr) == count


@pytest.mark.parametrize(("key", "what"), [("fails", "failures in a row"),
                                           ("passes", "successes in a row")])
@pytest.mark.parametrize("value", ["0", "101", "-1", "", "three", "2.0"])
def test_bad_health_counts(key: str, what: str, value: str) -> None:
    labels = {"gateway.path": "/", "gateway.health.path": "/h", f"gateway.health.{key}": value}
    assert _errors(labels) == [
        LabelError(f"gateway.health.{key}", value, f"{what}: a whole number from 1 to 100")
    ]


@pytest.mark.parametrize(("timeout", "interval"), [("5s", "5s"), ("1s", "5s"), ("999ms", "1s")])
def test_health_timeout_up_to_the_interval(timeout: str, interval: str) -> None:
    _routing({"gateway.path": "/", "gateway.health.path": "/h", "gateway.health.timeout": timeout,
              "gateway.health.interval": interval})


@pytest.mark.parametrize(
    ("labels", "value", "interval"),
    [
        ({"gateway.health.timeout": "6s"}, "6s", "5s"),  # against the default interval
        ({"gateway.health.interval": "1s"}, "2s", "1s"),  # the default timeout is too long
        ({"gateway.health.timeout": "90s", "gateway.health.interval": "1m"}, "90s", "60s"),
    ],
)
def test_health_timeout_longer_than_interval(labels: dict[str, str], value: str, interval: str) -> None:
    errors = _errors({"gateway.path": "/", "gateway.health.path": "/h", **labels})
    assert errors == [LabelError("gateway.health.timeout", value,
                                 f"must not be longer than the health check interval ({interval})")]


@pytest.mark.parametrize(
    ("labels", "interval"),
    [
        ({"gateway.health.timeout": "2500ms", "gateway.health.interval": "2s"}, "2s"),
        ({"gateway.health.timeout": "1m", "gateway.health.interval": "30s"}, "30s"),
        ({"gateway.health.timeout": " 6s "}, "5s"),
    ],
)
def test_health_timeout_longer_than_interval_quotes_the_label(labels: dict[str, str],
                                                              interval: str) -> None:
    # KNOWN BUG: build_routing errors quote the value as written, except this one, which shows
    # the parsed timeout re-formatted (gateway.health.timeout='2.5s' for a label saying 2500ms).
    errors = _errors({"gateway.path": "/", "gateway.health.path": "/h", **labels})
    assert errors == [LabelError("gateway.health.timeout", labels["gateway.health.timeout"],
                                 f"must not be longer than the health check interval ({interval})")]


@pytest.mark.parametrize(
    ("key", "value"),
    [("interval", "10s"), ("timeout", "1s"), ("status", "200-299"), ("fails", "2"), ("passes", "5"),
     ("interval", "1m"), ("timeout", "1500ms"), ("status", " 200 - 204 "), ("status", "204"),
     ("fails", "007")],
)
def test_health_key_without_health_path(key: str, value: str) -> None:
    # The error quotes the label as written, not the parsed value ('10.0', '(200, 299)').
    assert _errors({"gateway.path": "/", f"gateway.health.{key}": value}) == [
        LabelError(f"gateway.health.{key}", value,
                   "needs gateway.health.path to say what to probe")
    ]


def test_health_keys_without_health_path_name_the_first_one() -> None:
    errors = _errors({"gateway.path": "/", "gateway.health.passes": "2", "gateway.health.fails": "4"})
    assert errors == [LabelError("gateway.health.fails", "4",
                                 "needs gateway.health.path to say what to probe")]


def test_health_messages_use_a_custom_prefix() -> None:
    assert _errors({"edge.path": "/", "edge.health.fails": "4"}, prefix="edge") == [
        LabelError("edge.health.fails", "4", "needs edge.health.path to say what to probe")
    ]
    assert _errors({"edge.path": "/", "edge.health.path": "/h", "edge.health.timeout": "9s"},
                   prefix="edge") == [
        LabelError("edge.health.timeout", "9s", "must not be longer than the health check interval (5s)")
    ]


def test_bad_values_are_reported_before_combinations() -> None:
    # A bad health.fails is reported as such, not as 'needs health.path'.
    assert _errors({"gateway.path": "/", "gateway.health.fails": "0"}) == [
        LabelError("gateway.health.fails", "0", "failures in a row: a whole number from 1 to 100")
    ]


def test_full_routing_with_every_key() -> None:
    routing = _routing({
        "gateway.host": "api.example.com",
        "gateway.path": "/v1",
        "gateway.port": "8080",
        "gateway.lb": "least_conn",
        "gateway.weight": "3",
        "gateway.retries": "1",
        "gateway.timeout.connect": "500ms",
        "gateway.timeout.read": "2m",
        "gateway.health.path": "/healthz",
        "gateway.health.status": "200",
    })
    assert routing == Routing(
        spec=RouteSpec(hosts=("api.example.com",), paths=("/v1",), lb="least_conn", retries=1,
                       connect_timeout=0.5, read_timeout=120.0,
                       health=HealthSpec("/healthz", status_min=200, status_max=200)),
        port=8080, network=None, weight=3,
    )


# --- policies: authentication and rate limits ------------------------------------------------------

def test_policies_default_to_none() -> None:
    spec = _routing({"gateway.path": "/orders"}).spec
    assert (spec.auth, spec.ratelimit) == (None, None)


@pytest.mark.parametrize("value", ["jwt", "JWT", " jwt ", "Jwt"])
def test_auth_jwt(value: str) -> None:
    assert _routing({"gateway.path": "/", "gateway.auth": value}).spec.auth == AuthSpec()


@pytest.mark.parametrize("value", ["", " ", "oauth2", "jwt ;", "bearer", "true", "none", "digest"])
def test_bad_auth(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.auth": value}) == [
        LabelError("gateway.auth", value, "jwt, basic or forward")
    ]


@pytest.mark.parametrize("value", ["jwt,basic", "basic forward", "forward, jwt"])
def test_one_auth_kind_per_route(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.auth": value}) == [
        LabelError("gateway.auth", value, "one of jwt, basic or forward: a route has one auth "
                   "kind (put routes that need another kind on another path or host)")
    ]


@pytest.mark.parametrize(
    ("value", "scopes"),
    [
        ("orders:read", ("orders:read",)),
        ("orders:read orders:write", ("orders:read", "orders:write")),
        ("orders:read,orders:write", ("orders:read", "orders:write")),
        (" orders:read ,  orders:write\t", ("orders:read", "orders:write")),
        ("b a", ("b", "a")),  # order kept
        ("a a b a", ("a", "b")),  # duplicates collapse
        ("https://api.example.com/read", ("https://api.example.com/read",)),
        ("!#[]~", ("!#[]~",)),  # every printable ASCII character but space, '"' and '\\'
    ],
)
def test_auth_scopes(value: str, scopes: tuple[str, ...]) -> None:
    spec = _routing({"gateway.path": "/", "gateway.auth": "jwt", "gateway.auth.scopes": value}).spec
    assert spec.auth == AuthSpec(scopes=scopes)


def _bad_scope(scope: str) -> str:
    return f"scope {scope!r} holds characters a scope may not have (RFC 6749 3.3)"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "one or more scopes separated by spaces, e.g. orders:read orders:write"),
        (" , ", "one or more scopes separated by spaces, e.g. orders:read orders:write"),
        ('say"hi"', _bad_scope('say"hi"')),
        ("a\\b", _bad_scope("a\\b")),
        ("read \u00e9crire", _bad_scope("\u00e9crire")),
        ("a\x00b", _bad_scope("a\x00b")),
        ("a\x7f", _bad_scope("a\x7f")),
    ],
)
def test_bad_auth_scopes(value: str, reason: str) -> None:
    labels = {"gateway.path": "/", "gateway.auth": "jwt", "gateway.auth.scopes": value}
    assert _errors(labels) == [LabelError("gateway.auth.scopes", value, reason)]


@pytest.mark.parametrize(("value", "audience"), [("https://api.example.com", "https://api.example.com"),
                                                 (" orders-api ", "orders-api"),
                                                 ("urn:example:orders", "urn:example:orders")])
def test_auth_audience(value: str, audience: str) -> None:
    spec = _routing({"gateway.path": "/", "gateway.auth": "jwt", "gateway.auth.audience": value}).spec
    assert spec.auth == AuthSpec(audience=audience)


@pytest.mark.parametrize("value", ["", "  ", "\t", "api\nexample", "a\x00b"])
def test_bad_auth_audience(value: str) -> None:
    labels = {"gateway.path": "/", "gateway.auth": "jwt", "gateway.auth.audience": value}
    assert _errors(labels) == [
        LabelError("gateway.auth.audience", value, "a non-empty audience such as https://api.example.com")
    ]


@pytest.mark.parametrize(
    ("labels", "errors"),
    [
        ({"gateway.auth.scopes": "orders:read"},
         [LabelError("gateway.auth.scopes", "orders:read", "needs gateway.auth=jwt")]),
        # the value as written, not the parsed scopes
        ({"gateway.auth.scopes": "b, a,b"},
         [LabelError("gateway.auth.scopes", "b, a,b", "needs gateway.auth=jwt")]),
        ({"gateway.auth.audience": " api "},
         [LabelError("gateway.auth.audience", " api ", "needs gateway.auth=jwt")]),
        ({"gateway.auth.scopes": "x", "gateway.auth.audience": "api"},
         [LabelError("gateway.auth.scopes", "x", "needs gateway.auth=jwt"),
          LabelError("gateway.auth.audience", "api", "needs gateway.auth=jwt")]),
    ],
)
def test_auth_keys_without_auth(labels: dict[str, str], errors: list[LabelError]) -> None:
    # Scopes without authentication would look protected and be open.
    assert _errors({"gateway.path": "/admin", **labels}) == errors


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ("100/m", RateLimitSpec(100, 60.0, 100)),  # without burst the bucket holds the limit
        ("10/s;burst=20", RateLimitSpec(10, 1.0, 20)),
        (" 100 / minute ; burst = 5 ", RateLimitSpec(100, 60.0, 5)),
        ("5000/h", RateLimitSpec(5000, 3600.0, 5000)),
        ("1/HOUR", RateLimitSpec(1, 3600.0, 1)),
        ("3/second", RateLimitSpec(3, 1.0, 3)),
    ],
)
def test_ratelimit(value: str, spec: RateLimitSpec) -> None:
    routing = _routing({"gateway.path": "/", "gateway.ratelimit": value})
    assert routing.spec.ratelimit == spec
    assert routing.spec.ratelimit.key == "ip"  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["", "100", "100/d", "100/day", "/m", "0/m", "-1/s", "1.5/s",
                                   "100/m;burst=0", "100/m;burst=", "100/m;burst=x", "100/m;rate=5",
                                   "100 per minute", "1000000001/s", "jwt"])
def test_bad_ratelimit(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.ratelimit": value}) == [
        LabelError("gateway.ratelimit", value, RATE_EXPECTED)
    ]


@pytest.mark.parametrize(
    ("value", "key"),
    [("ip", "ip"), (" IP ", "ip"), ("header:X-Api-Key", "header:X-Api-Key"),
     ("Header: X-Api-Key ", "header:X-Api-Key"), ("header:x_tenant.id", "header:x_tenant.id")],
)
def test_ratelimit_key(value: str, key: str) -> None:
    labels = {"gateway.path": "/", "gateway.ratelimit": "100/m", "gateway.ratelimit.key": value}
    assert _routing(labels).spec.ratelimit == RateLimitSpec(100, 60.0, 100, key)


@pytest.mark.parametrize("value", ["", "user", "cookie:session", "header:", "header", "header:X Api",
                                   "header:X-Api:Key", "headers:X-Api-Key", "ip,sub"])
def test_bad_ratelimit_key(value: str) -> None:
    labels = {"gateway.path": "/", "gateway.ratelimit": "100/m", "gateway.ratelimit.key": value}
    assert _errors(labels) == [LabelError("gateway.ratelimit.key", value, KEY_EXPECTED)]


@pytest.mark.parametrize("value", ["ip", " Header:X-Api-Key ", "sub"])
def test_ratelimit_key_without_ratelimit(value: str) -> None:
    assert _errors({"gateway.path": "/", "gateway.ratelimit.key": value}) == [
        LabelError("gateway.ratelimit.key", value, "needs gateway.ratelimit, e.g. 100/m")
    ]


SUB_NEEDS_AUTH = "keys by the verified JWT subject, so it needs gateway.auth=jwt on the same container"


def test_ratelimit_by_subject_needs_auth() -> None:
    labels = {"gateway.path": "/", "gateway.ratelimit": "100/m", "gateway.ratelimit.key": "sub"}
    assert _errors(labels) == [LabelError("gateway.ratelimit.key", "sub", SUB_NEEDS_AUTH)]
    routing = _routing({**labels, "gateway.auth": "jwt"})
    assert routing.spec.ratelimit == RateLimitSpec(100, 60.0, 100, "sub")
    assert routing.spec.auth == AuthSpec()


@pytest.mark.parametrize("value", ["SUB", " sub ", "Sub"])
def test_ratelimit_by_subject_needs_auth_quotes_the_label(value: str) -> None:
    # KNOWN BUG: the other build_routing errors quote the value as written; this one always
    # says gateway.ratelimit.key='sub'.
    labels = {"gateway.path": "/", "gateway.ratelimit": "100/m", "gateway.ratelimit.key": value}
    assert _errors(labels) == [LabelError("gateway.ratelimit.key", value, SUB_NEEDS_AUTH)]


def test_policy_combinations_are_reported_together() -> None:
    errors = _errors({"gateway.path": "/", "gateway.auth.scopes": "a", "gateway.ratelimit": "1/s",
                      "gateway.ratelimit.key": "sub", "gateway.health.fails": "2"})
    assert errors == [
        LabelError("gateway.health.fails", "2", "needs gateway.health.path to say what to probe"),
        LabelError("gateway.auth.scopes", "a", "needs gateway.auth=jwt"),
        LabelError("gateway.ratelimit.key", "sub", SUB_NEEDS_AUTH),
    ]


def test_bad_policy_values_are_reported_before_combinations() -> None:
    # A bad gateway.auth is reported as such, not also as 'auth.scopes needs gateway.auth=jwt'.
    assert _errors({"gateway.path": "/", "gateway.auth": "oauth2", "gateway.auth.scopes": "a"}) == [
        LabelError("gateway.auth", "oauth2", "jwt, basic or forward")
    ]


def test_policy_messages_use_a_custom_prefix() -> None:
    assert _errors({"edge.path": "/", "edge.auth.audience": "api"}, prefix="edge") == [
        LabelError("edge.auth.audience", "api", "needs edge.auth=jwt")
    ]
    assert _errors({"edge.path": "/", "edge.ratelimit.key": "ip"}, prefix="edge") == [
        LabelError("edge.ratelimit.key", "ip", "needs edge.ratelimit, e.g. 100/m")
    ]
    assert _errors({"edge.path": "/", "edge.ratelimit": "1/s", "edge.ratelimit.key": "sub"},
                   prefix="edge") == [
        LabelError("edge.ratelimit.key", "sub",
                   "keys by the verified JWT subject, so it needs edge.auth=jwt on the same container")
    ]
    routing = _routing({"edge.path": "/", "edge.auth": "jwt", "edge.ratelimit": "1/s"}, prefix="edge")
    assert (routing.spec.auth, routing.spec.ratelimit) == (AuthSpec(), RateLimitSpec(1, 1.0, 1))


def test_enable_false_wins_over_bad_policies() -> None:
    result = parse_labels({"gateway.enable": "false", "gateway.path": "/", "gateway.auth": "basic",
                           "gateway.ratelimit.key": "sub"})
    assert result == NotRouted("gateway.enable=false")


def test_full_routing_with_policies() -> None:
    routing = _routing({
        "gateway.host": "api.example.com",
        "gateway.path": "/orders",
        "gateway.port": "8080",
        "gateway.auth": "jwt",
        "gateway.auth.scopes": "orders:read orders:write",
        "gateway.auth.audience": "https://api.example.com",
        "gateway.ratelimit": "100/m;burst=20",
        "gateway.ratelimit.key": "sub",
    })
    assert routing == Routing(
        spec=RouteSpec(hosts=("api.example.com",), paths=("/orders",),
                       auth=AuthSpec(scopes=("orders:read", "orders:write"),
                                     audience="https://api.example.com"),
                       ratelimit=RateLimitSpec(100, 60.0, 20, "sub")),
        port=8080, network=None,
    )
