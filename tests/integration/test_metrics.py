"""/metrics of the real proxy: exact status codes, byte counters, replica up, certificate
expiry, build info, trace drops; and the Grafana dashboard asks only for what it exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from cryptography import x509
from helpers import ROOT, ProxyProcess, free_port, run_backend, run_proxy, write_routes
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy import __version__

DASHBOARD = ROOT / "examples" / "grafana" / "edgeproxy-dashboard.json"
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Served:
    proxy: ProxyProcess
    backend: str
    cert: x509.Certificate
    response_bytes: int  # body bytes the client got from route "api"
    request_bytes: int  # body bytes the client sent to route "api"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A proxy with TLS (one certificate) that served 200s, a 404, a 502, a 401 and a 429."""
    tmp = tmp_path_factory.mktemp("metrics")
    certs = tmp / "certs"
    certs.mkdir()
    issued = trustme.CA().issue_cert("metrics.test")
    issued.cert_chain_pems[0].write_to_path(str(certs / "metrics.test.crt"))
    issued.private_key_pem.write_to_path(str(certs / "metrics.test.key"))
    cert = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    dead = free_port()
    with ExitStack() as stack:
        backend = stack.enter_context(run_backend("metrics"))
        routes = write_routes(tmp / "routes.toml", {
            "api": {"path": "/api", "strip_prefix": True, "upstreams": [backend]},
            "down": {"path": "/down", "upstreams": [f"http://127.0.0.1:{dead}"]},
            "private": {"path": "/private", "upstreams": [backend], "auth": "jwt"},
            "limited": {"path": "/limited", "upstreams": [backend], "ratelimit": "1/m"},
        })
        proxy = stack.enter_context(run_proxy(
            tmp, docker="false", routes_file=str(routes), tls_listen=f"127.0.0.1:{free_port()}",
            tls_certs_dir=str(certs), jwt_secret="s" * 32))
        sent = received = 0
        for path in ("/api/a", "/api/b?q=1", "/api/status/404"):
            r = requests.get(proxy.url(path), timeout=5)
            received += len(r.content)
        r = requests.post(proxy.url("/api/upload"), data=b"x" * 1000, timeout=5)
        assert r.status_code == 200
        sent += 1000
        received += len(r.content)
        assert requests.get(proxy.url("/down/x"), timeout=5).status_code == 502
        assert requests.get(proxy.url("/private/x"), timeout=5).status_code == 401
        assert [requests.get(proxy.url("/limited/x"), timeout=5).status_code
                for _ in range(2)] == [200, 429]
        yield Served(proxy, backend, cert, received, sent)


def scrape(proxy: ProxyProcess) -> tuple[Samples, dict[str, str]]:
    """Samples by name, and each family's type by family name."""
    text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if labels.items() <= lbl.items())


def test_requests_carry_the_exact_status_code_besides_the_class(served: Served) -> None:
    samples, _ = scrape(served.proxy)
    name = "edgeproxy_requests_total"
    assert value(samples, name, route="api", code="200", status_class="2xx") == 3
    assert value(samples, name, route="api", code="404", status_class="4xx") == 1
    assert value(samples, name, route="down", code="502", status_class="5xx") == 1
    assert value(samples, name, route="private", code="401") == 1
    assert value(samples, name, route="limited", code="429") == 1


def test_body_bytes_are_counted_per_route(served: Served) -> None:
    samples, _ = scrape(served.proxy)
    assert value(samples, "edgeproxy_request_bytes_total", route="api") == served.request_bytes
    assert value(samples, "edgeproxy_response_bytes_total", route="api") == \
        served.response_bytes


def test_replica_up_certificate_expiry_build_info_and_trace_drops(served: Served) -> None:
    samples, _ = scrape(served.proxy)
    replicas = {r["name"]: r for r in served.proxy.admin("/routes")["routes"]}
    api_replica = replicas["api"]["replicas"][0]["name"]
    assert value(samples, "edgeproxy_replica_up", route="api", replica=api_replica) == 1
    assert {lbl["route"] for lbl, _ in samples["edgeproxy_replica_up"]} == set(replicas)
    [(labels, not_after)] = samples["edgeproxy_tls_certificate_not_after_timestamp_seconds"]
    assert labels == {"name": "metrics.test", "serial": f"{served.cert.serial_number:x}"}
    assert not_after == served.cert.not_valid_after_utc.timestamp()
    [(labels, one)] = samples["edgeproxy_build_info"]
    assert labels["version"] == __version__ and one == 1
    # Tracing is off here: both reasons are there, at zero.
    assert {lbl["reason"]: v for lbl, v in samples["edgeproxy_trace_spans_dropped_total"]} == \
        {"queue_full": 0, "export_failed": 0}


def test_no_label_holds_a_path_or_a_client_address(served: Served) -> None:
    samples, _ = scrape(served.proxy)
    values = {v for series in samples.values() for lbl, _ in series for v in lbl.values()}
    assert not {v for v in values if v.startswith("/") or "?" in v}
    assert not any(name.endswith("_total") and "client" in lbl
                   for name, series in samples.items() for lbl, _ in series)


def test_code_label_and_byte_counters_with_workers(tmp_path: Path) -> None:
    # Several workers count through prometheus_client's multiprocess files: same series.
    with run_backend("w") as backend:
        routes = write_routes(tmp_path / "routes.toml", {
            "open": {"path": "/open", "strip_prefix": True, "upstreams": [backend]}})
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), workers="2") as p:
            got = 0
            for _ in range(6):
                got += len(requests.get(p.url("/open/status/418"), timeout=5).content)
            requests.post(p.url("/open/upload"), data=b"y" * 300, timeout=5)
            samples, _ = scrape(p)
    assert value(samples, "edgeproxy_requests_total", route="open", code="418",
                 status_class="4xx") == 6
    assert value(samples, "edgeproxy_request_bytes_total", route="open") == 300
    assert value(samples, "edgeproxy_response_bytes_total", route="open") >= got
    assert value(samples, "edgeproxy_requests_by_protocol_total", route="open",
                 protocol="HTTP/1.1") == 7


# --- the Grafana dashboard -------------------------------------------------------------------

PROMQL_FUNCTIONS = frozenset((
    "rate", "irate", "increase", "sum", "min", "max", "avg", "count", "histogram_quantile",
    "time", "label_values", "topk", "bottomk", "abs", "clamp_min", "delta", "vector"))
PROMQL_WORDS = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right",
                          "bool", "and", "or", "unless", "offset"))
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variables."""
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def parse_promql(expr: str) -> list[tuple[str, set[str]]]:
    """The metric names an expression selects, each with the label names its matchers use.

    A small parser for the dashboard's subset of PromQL: balanced brackets, known functions,
    grouping clauses; enough to catch a misspelt metric, function or label."""
    assert expr.count("(") == expr.count(")"), expr
    variable = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)", expr)
    if variable is not None:  # Grafana's template query: label_values(metric, label)
        return [(variable.group(1), {variable.group(2)})]
    assert expr.count("{") == expr.count("}") and expr.count("[") == expr.count("]"), expr
    text = _STRING.sub('""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations: [5m], [$__rate_interval]
    text = re.sub(r"\$\w+", "", text)  # Grafana variables outside strings
    found: list[tuple[str, set[str]]] = []
    pos = 0
    while (m := _IDENT.search(text, pos)) is not None:
        name, pos = m.group(), m.end()
        rest = text[pos:].lstrip()
        if name in PROMQL_WORDS:
            if name in ("by", "without", "on", "ignoring") and rest.startswith("("):
                pos = text.index(")", pos) + 1  # the grouping labels are not metrics
            continue
        if rest.startswith("(") or re.match(r"(by|without)\s*\(", rest):  # sum by (x) (...)
            assert name in PROMQL_FUNCTIONS, f"unknown function {name!r} in {expr}"
            continue
        labels: set[str] = set()
        if rest.startswith("{"):
            start = text.index("{", pos)
            end = text.index("}", start)
            labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", text[start + 1:end]))
            pos = end + 1
        found.append((name, labels))
    return found


def test_parse_promql_finds_metrics_functions_and_labels() -> None:
    assert parse_promql('histogram_quantile(0.99, sum by (route, le) (rate('
                        'edgeproxy_request_duration_seconds_bucket{route=~"$route"}'
                        '[$__rate_interval])))') == [
        ("edgeproxy_request_duration_seconds_bucket", {"route"})]
    assert parse_promql("(a_seconds - time()) / 86400") == [("a_seconds", set())]
    assert parse_promql("label_values(a_total, route)") == [("a_total", {"route"})]
    with pytest.raises(AssertionError, match="unknown function"):
        parse_promql("rated(x_total[5m])")


def exported_names(samples: Samples, types: dict[str, str]) -> set[str]:
    """Every series name /metrics can produce, including families that have no sample yet."""
    names = set(samples)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "")}
    for family, kind in types.items():
        names.update(family + s for s in suffixes.get(kind, ("",)))
    return names


def test_grafana_dashboard_queries_only_exported_metrics(served: Served) -> None:
    board = json.loads(DASHBOARD.read_text())
    samples, types = scrape(served.proxy)
    exported = exported_names(samples, types)
    queries = dashboard_queries(board)
    assert len(queries) >= 20
    used: set[str] = set()
    for expr in queries:
        for name, labels in parse_promql(expr):
            assert name in exported, f"{name!r} (in {expr!r}) is not exported by the proxy"
            used.add(name)
            series = samples.get(name)
            if series:  # labels we can see: every matcher names one of them
                known = {k for lbl, _ in series for k in lbl}
                assert labels <= known, f"{name}: labels {labels - known} do not exist"
    # The issue's panels: rate, errors, latency, replicas, refusals, Docker lag, certificates.
    for needed in ("edgeproxy_requests_total", "edgeproxy_request_duration_seconds_bucket",
                   "edgeproxy_replica_up", "edgeproxy_ratelimit_rejections_total",
                   "edgeproxy_auth_failures_total", "edgeproxy_docker_event_lag_seconds_bucket",
                   "edgeproxy_tls_certificate_not_after_timestamp_seconds"):
        assert needed in used, needed
    # Every per-route panel filters by the dashboard's route variable.
    assert all('route=~"$route"' in q for q in queries if "by (route" in q)


def test_grafana_provisioning_and_scrape_config_match_the_compose_profile() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.example.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), volume
    scrape_config = yaml.safe_load((ROOT / "examples/grafana/prometheus.yml").read_text())
    [job] = scrape_config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["proxy:8081"]  # the admin listener
    assert "8081" in services["proxy"]["environment"]["EDGEPROXY_ADMIN_LISTEN"]
