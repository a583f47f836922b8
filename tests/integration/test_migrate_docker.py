"""A compose file written for Traefik (and one for nginx-proxy), migrated by `edgeproxy migrate`,
run through the real proxy: the same host and path reach the replica, the prefix is stripped
and the headers are set as Traefik / nginx would."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import engine
import pytest
import requests
import yaml
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for

from edgeproxy.ops.migrate import run_migrate

PREFIX = "/" + unique("api")
# Labels as the Traefik documentation writes them (routers/rule, stripprefix and headers
# middlewares), with a unique path so other tests on the shared engine don't collide.
TRAEFIK_COMPOSE = f"""\
services:
  whoami:
    image: traefik/whoami
    labels:
      - "traefik.enable=true"
      - "traefik.http.routers.whoami.rule=Host(`whoami.localhost`) && PathPrefix(`{PREFIX}`)"
      - "traefik.http.routers.whoami.entrypoints=web"
      - "traefik.http.routers.whoami.middlewares=strip,testHeader"
      - "traefik.http.middlewares.strip.stripprefix.prefixes={PREFIX}"
      - "traefik.http.middlewares.testHeader.headers.customrequestheaders.X-Script-Name=test"
      - "traefik.http.middlewares.testHeader.headers.customresponseheaders.X-Custom-Response-Header=migrated"
      - "traefik.http.services.whoami.loadbalancer.server.port=80"
"""
NGINX_PATH = "/" + unique("app")
# nginx-proxy's README "VIRTUAL_DEST" example: /app1/foo reaches the container as /foo.
NGINX_COMPOSE = f"""\
services:
  app1:
    image: app
    environment:
      - VIRTUAL_HOST=example.tld
      - VIRTUAL_PATH={NGINX_PATH}/
      - VIRTUAL_DEST=/
"""


def migrated_labels(text: str, service: str) -> dict[str, str]:
    out, err = io.StringIO(), io.StringIO()
    assert run_migrate(["compose.yml"], replace=True, out=out, err=err, read=lambda _: text) == 0
    labels = yaml.safe_load(out.getvalue())["services"][service]["labels"]
    if isinstance(labels, list):
        labels = dict(item.split("=", 1) for item in labels)
    assert all(k.startswith("gateway.") for k in labels), labels  # --replace left no Traefik
    return labels  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def proxy(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    names = {"whoami": unique("mig-traefik-"), "app1": unique("mig-nginx-")}
    run_container(names["whoami"], migrated_labels(TRAEFIK_COMPOSE, "whoami"))
    run_container(names["app1"], migrated_labels(NGINX_COMPOSE, "app1"))
    try:
        with run_proxy(tmp_path_factory.mktemp("migrate")) as p:
            wait_for(lambda: set(names.values()) <= set(p.routes()), 15, what="routes")
            url = p.url(PREFIX + "/cgi-bin/echo")
            wait_for(lambda: requests.get(url, headers={"Host": "whoami.localhost"},
                                          timeout=5).status_code == 200, 10, what="answering")
            yield p
    finally:
        engine.docker("rm", "-f", *names.values())


def test_traefik_route_host_path_strip_and_headers(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url(PREFIX + "/cgi-bin/echo/x?q=1"),
                     headers={"Host": "whoami.localhost"}, timeout=5)
    assert r.status_code == 200
    echo = engine.parse_echo(r.text)
    assert echo["REQUEST_URI"] == "/cgi-bin/echo/x?q=1"  # stripprefix
    assert echo["HTTP_X_SCRIPT_NAME"] == "test"  # customrequestheaders
    assert r.headers["X-Custom-Response-Header"] == "migrated"  # customresponseheaders
    # Host(`whoami.localhost`) && PathPrefix(...): another host or path is not this route.
    assert requests.get(proxy.url(PREFIX + "/cgi-bin/echo"), headers={"Host": "other.localhost"},
                        timeout=5).status_code == 404
    assert requests.get(proxy.url("/cgi-bin/echo"), headers={"Host": "whoami.localhost"},
                        timeout=5).status_code == 404


def test_nginx_proxy_virtual_path_and_dest(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url(NGINX_PATH + "/cgi-bin/echo/foo"),
                     headers={"Host": "example.tld"}, timeout=5)
    assert r.status_code == 200
    assert engine.parse_echo(r.text)["REQUEST_URI"] == "/cgi-bin/echo/foo"
    assert requests.get(proxy.url(NGINX_PATH + "/cgi-bin/echo/foo"),
                        headers={"Host": "other.tld"}, timeout=5).status_code == 404


def test_migrated_file_is_what_the_test_ran(tmp_path: Path) -> None:
    """The labels above come from the printed file, not from a side door."""
    (tmp_path / "compose.yml").write_text(TRAEFIK_COMPOSE)
    out = io.StringIO()
    assert run_migrate([str(tmp_path / "compose.yml")], out=out, err=io.StringIO()) == 0
    assert f'"gateway.path={PREFIX}"' in out.getvalue()
