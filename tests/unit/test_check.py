"""edgeproxy.ops.check.run_check: compose files -> one line per label problem, a fix, a summary,
an exit code."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeproxy.ops.check import _interpolate, run_check
from edgeproxy.routes.labels import KEYS

GOOD = Path(__file__).parent / "compose" / "good.yml"
# check({name: yaml, ...}, *names, prefix="gateway") -> (exit code, output lines)
Check = Callable[..., tuple[int, list[str]]]
PORT_FIX = "  fix: gateway.port expects a port number between 1 and 65535, e.g. gateway.port=8080"


@pytest.fixture
def check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Check:
    """Write {name: yaml} into a temporary folder, run the check there, return (rc, lines)."""
    monkeypatch.chdir(tmp_path)

    monkeypatch.delenv("COMPOSE_PROJECT_NAME", raising=False)
    monkeypatch.delenv("EDGEPROXY_NETWORK", raising=False)

    def run(files: dict[str, str], *names: str, prefix: str = "gateway",
            project: str | None = None) -> tuple[int, list[str]]:
        for name, text in files.items():
            (tmp_path / name).write_text(textwrap.dedent(text))
        out = io.StringIO()
        rc = run_check(list(names or files), label_prefix=prefix, project=project, out=out)
        return rc, out.getvalue().splitlines()

    return run


# --- clean files ---------------------------------------------------------------------------------

def test_good_file() -> None:
    out = io.StringIO()
    assert run_check([str(GOOD)], out=out) == 0
    assert out.getvalue().splitlines() == [
        f"checking {GOOD}",
        "ok: 2 service(s) routed, 3 not routed",
    ]


def test_services_without_gateway_labels_and_disabled_ones_are_fine(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          db: {image: postgres}
          cache:
            labels: [com.example.team=storage]
          off:
            labels: {gateway.enable: "false", gateway.pth: /x}
          nothing:
    """})
    assert (rc, lines) == (0, ["checking compose.yml", "ok: 0 service(s) routed, 4 not routed"])


def test_empty_file_and_file_without_services(check: Check) -> None:
    # `ok: 0 routed` would pass a file that routes nothing.
    rc, lines = check({"empty.yml": "", "volumes.yml": "volumes: {data: {}}\n"})
    assert (rc, lines) == (2, ["empty.yml, volumes.yml: not a compose file: no services "
                               "(no services: key)"])
    assert check({"compose.yml": "services: {}\n"}) == (
        2, ["compose.yml: not a compose file: no services (an empty services: mapping)"])


def test_yaml_bools_and_ints_become_the_strings_compose_passes(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              gateway.path: /api
              gateway.port: 8080
              gateway.strip_prefix: true
              gateway.weight: 2
              gateway.enable: True
              gateway.retries: 0
    """})
    assert (rc, lines) == (0, ["checking compose.yml", "ok: 1 service(s) routed, 0 not routed"])


def test_yaml_values_are_shown_as_compose_reads_them(check: Check) -> None:
    # Compose reads YAML 1.2: 1:30 is a string (YAML 1.1 would make it 90), false is 'false'.
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              gateway.path: /api
              gateway.weight: 1:30
              gateway.port: false
              gateway.network:
    """})
    assert rc == 1
    assert lines == [
        "checking compose.yml",
        "compose.yml: service api: label gateway.network='': a Docker network name",
        "  fix: gateway.network expects a Docker network name, e.g. gateway.network=backend",
        "compose.yml: service api: label gateway.port='false': a port number between 1 and 65535",
        PORT_FIX,
        "compose.yml: service api: label gateway.weight='1:30': replica weight: a whole number "
        "from 1 to 100",
        "  fix: gateway.weight expects replica weight: a whole number from 1 to 100, "
        "e.g. gateway.weight=10",
        "3 problem(s) in 1 service(s)",
    ]


# --- bad values -------------------------------------------------------------------------------------

def test_bad_port(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              gateway.path: /api
              gateway.port: eighty
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.port='eighty': a port number between 1 and 65535",
        PORT_FIX,
        "1 problem(s) in 1 service(s)",
    ])


def test_unknown_key_with_a_hint(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              gateway.pth: /api
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.pth='/api': unknown key",
        "  fix: rename it to gateway.path",
        "1 problem(s) in 1 service(s)",
    ])


def test_unknown_key_without_a_hint_lists_the_known_keys(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: /api, gateway.zzzzzz: "1"}
    """})
    known = ", ".join("gateway." + k for k in sorted(KEYS))
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.zzzzzz='1': unknown key",
        "  fix: remove it, or use a known key: " + known,
        "1 problem(s) in 1 service(s)",
    ])


def test_bad_path(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: orders}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.path='orders': path 'orders' must start with '/'",
        "  fix: gateway.path expects one or more path prefixes such as /orders, comma-separated, "
        "e.g. gateway.path=/orders",
        "1 problem(s) in 1 service(s)",
    ])


def test_non_canonical_path_gets_the_canonical_value_as_fix(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: "/v1,/a/../api//x"}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.path='/v1,/a/../api//x': path '/a/../api//x' is "
        "not canonical; write '/api/x'",
        "  fix: write gateway.path=/v1,/api/x",
        "1 problem(s) in 1 service(s)",
    ])


def test_missing_path_and_host(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.port: 8080}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.path: missing: a routed container needs "
        "gateway.path or gateway.host (or set gateway.enable=false)",
        "  fix: add gateway.path=/orders or gateway.host=api.example.com, or gateway.enable=false "
        "to leave the service unrouted",
        "1 problem(s) in 1 service(s)",
    ])


def test_combinations_of_labels(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          a:
            labels: {gateway.path: /a, gateway.health.interval: 5s}
          b:
            labels: {gateway.path: /b, gateway.health.path: /h, gateway.health.interval: 1s,
                     gateway.health.timeout: 2s}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service a: label gateway.health.interval='5s': needs gateway.health.path "
        "to say what to probe",
        "  fix: add gateway.health.path=/healthz, or remove gateway.health.interval",
        "compose.yml: service b: label gateway.health.timeout='2s': must not be longer than the "
        "health check interval (1s)",
        "  fix: change gateway.health.timeout: it must not be longer than the health check "
        "interval (1s)",
        "2 problem(s) in 2 service(s)",
    ])


def test_fix_for_a_combination_reads_as_a_sentence(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          a:
            labels: {gateway.path: /a, gateway.cors.origins: "*", gateway.cors.credentials: true}
    """})
    assert rc == 1
    assert lines[2] == ("  fix: change gateway.cors.credentials: browsers refuse credentials "
                        "with gateway.cors.origins=*: list the allowed origins instead"), lines


def test_list_form(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              - gateway.path=/api
              - "gateway.port=eighty"
              - gateway.strip_prefix
              - com.example.note=a=b
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.port='eighty': a port number between 1 and 65535",
        PORT_FIX,
        "compose.yml: service api: label gateway.strip_prefix='': true or false",
        "  fix: gateway.strip_prefix expects true or false, e.g. gateway.strip_prefix=true",
        "2 problem(s) in 1 service(s)",
    ])


def test_deploy_labels_are_checked_and_named(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: /api, gateway.port: 99999}
            deploy:
              replicas: 2
              labels: [gateway.path=/api, gateway.lb=fastest]
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.port='99999': a port number between 1 and 65535",
        PORT_FIX,
        "compose.yml: service api: deploy.labels gateway.lb='fastest': round_robin or least_conn",
        "  fix: gateway.lb expects round_robin or least_conn, e.g. gateway.lb=least_conn",
        DEPLOY_WARNING.format("gateway.lb"),
        DEPLOY_FIX,
        "2 problem(s) in 1 service(s)",
    ])


DEPLOY_WARNING = ("compose.yml: service api: warning: deploy.labels {} are not put on containers "
                  "by `docker compose up` (only `docker stack deploy` reads deploy.labels, for "
                  "Swarm services)")
DEPLOY_FIX = "  fix: give them under labels: as well"


def test_gateway_labels_only_under_deploy_are_a_warning(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            deploy:
              labels: [gateway.path=/api, gateway.port=8080]
    """})
    assert (rc, lines) == (0, [
        "checking compose.yml",
        DEPLOY_WARNING.format("gateway.path, gateway.port"),
        DEPLOY_FIX,
        "ok: 0 service(s) routed, 1 not routed",  # not by plain Compose
    ])


# --- networks, as Compose names them on the containers ---------------------------------------------

TWO_NETWORKS = """
    services:
      api:
        labels: {gateway.path: /api, gateway.network: NET}
        networks: [frontend, backend]
    networks:
      frontend:
      backend:
"""


@pytest.mark.parametrize("net", ["frontend", "shop_frontend"])
def test_network_label_as_written_in_the_file_or_prefixed(check: Check, net: str) -> None:
    # Compose names the network shop_frontend; the proxy accepts both spellings.
    rc, lines = check({"compose.yml": TWO_NETWORKS.replace("NET", net)}, project="shop")
    assert (rc, lines) == (0, ["checking compose.yml", "ok: 1 service(s) routed, 0 not routed"])


def test_network_label_naming_no_network_of_the_service(check: Check) -> None:
    rc, lines = check({"compose.yml": TWO_NETWORKS.replace("NET", "other_frontend")},
                      project="shop")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label gateway.network='other_frontend': the service is not on "
        "network 'other_frontend' (its networks: frontend, backend)",
        "  fix: add other_frontend to the service's networks, or write gateway.network= one of "
        "frontend, backend",
        "1 problem(s) in 1 service(s)",
    ])


def test_several_networks_and_no_label_is_skipped(check: Check) -> None:
    # The case: `ok: 3 routed`, then all three skipped at runtime.
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: /api}
            networks: [frontend, backend]
          web:
            labels: {gateway.path: /web}
            networks: {frontend: {}}
    """}, project="shop")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: on several networks (frontend, backend) and no gateway.network "
        "label: the proxy skips it",
        "  fix: add gateway.network= the one the proxy shares with it, e.g. "
        "gateway.network=frontend",
        "1 problem(s) in 1 service(s)",
    ])


def test_several_networks_and_edgeproxy_network(check: Check,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPROXY_NETWORK", "shop_backend")
    rc, _ = check({"compose.yml": TWO_NETWORKS.replace("    gateway.network: NET", "")
                   .replace(", gateway.network: NET", "")}, project="shop")
    assert rc == 0


@pytest.mark.parametrize(
    ("networks", "label", "real"),
    [
        ("frontend: {name: edge}", "frontend", "edge"),
        ("frontend: {external: true, name: edge}", "frontend", "edge"),
        ("frontend: {external: {name: edge}}", "frontend", "edge"),
    ],
)
def test_named_and_external_networks_keep_their_name(check: Check, networks: str, label: str,
                                                     real: str) -> None:
    text = f"""
        services:
          api:
            labels: {{gateway.path: /api, gateway.network: {label}}}
            networks: [frontend, backend]
        networks:
          {networks}
          backend:
    """
    rc, lines = check({"compose.yml": text}, project="shop")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        f"compose.yml: service api: label gateway.network='{label}': network '{label}' is named "
        f"'{real}' on the containers (by its name: or external: in the file)",
        f"  fix: write gateway.network={real}",
        "1 problem(s) in 1 service(s)",
    ])
    rc, lines = check({"compose.yml": text.replace(f"gateway.network: {label}",
                                                   f"gateway.network: {real}")}, project="shop")
    assert rc == 0, lines


def test_external_network_without_name_is_used_as_written(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: /api, gateway.network: proxy}
            networks: [proxy, backend]
        networks:
          proxy: {external: true}
          backend:
    """}, project="shop")
    assert rc == 0, lines


def test_project_name_from_the_file_then_the_flag(check: Check) -> None:
    text = TWO_NETWORKS.replace("NET", "shop_frontend") + "    name: shop\n"
    assert check({"compose.yml": text})[0] == 0  # name: shop
    rc, lines = check({"compose.yml": text}, project="other")  # -p other
    assert rc == 1 and "not on network 'shop_frontend'" in lines[1], lines


def test_project_name_from_the_folder_as_compose_normalises_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPOSE_PROJECT_NAME", raising=False)
    folder = tmp_path / "My Shop.v2"
    folder.mkdir()
    (folder / "compose.yml").write_text(textwrap.dedent(
        TWO_NETWORKS.replace("NET", "myshopv2_frontend")))
    assert run_check([str(folder / "compose.yml")], out=io.StringIO()) == 0
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "elsewhere")
    assert run_check([str(folder / "compose.yml")], out=io.StringIO()) == 1


def test_network_mode_host_is_skipped(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: /api}
            network_mode: host
    """})
    assert rc == 1 and "network_mode: host leaves its containers no address" in lines[1], lines


def test_cli_project_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeproxy.cli import main

    (tmp_path / "compose.yml").write_text(textwrap.dedent(
        TWO_NETWORKS.replace("NET", "shop_frontend")))
    assert main(["check", "-p", "shop", str(tmp_path / "compose.yml")]) == 0
    assert main(["check", "--project-name", "other", str(tmp_path / "compose.yml")]) == 1
    assert "ok: 1 service(s) routed" in capsys.readouterr().out


def test_malformed_labels_section(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: gateway.path=/api
          web:
            labels: {gateway.path: [/a, /b]}
    """})
    fix = ("  fix: write labels as a mapping (gateway.path: /orders) or a list "
           "(- gateway.path=/orders)")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: labels: must be a mapping (key: value) or a list of key=value "
        "strings",
        fix,
        "compose.yml: service web: labels: the value of gateway.path must be a string, a number "
        "or true/false",
        fix,
        "2 problem(s) in 2 service(s)",
    ])


def test_custom_prefix(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {edge.path: /api, edge.prot: "80", gateway.pth: ignored}
    """}, prefix="edge")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: label edge.prot='80': unknown key",
        "  fix: rename it to edge.port",
        "1 problem(s) in 1 service(s)",
    ])


# --- conflicts between services --------------------------------------------------------------------

def test_conflict_between_two_services(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: "/api,/v1"}
          api2:
            labels: {gateway.path: "/v1,/api", gateway.strip_prefix: "true"}
          www:
            labels: {gateway.host: www.example.com}
          www2:
            labels: {gateway.host: www.example.com, gateway.lb: least_conn}
    """})
    why = ("with different settings; which one gets it depends on which container is created "
           "first")
    assert (rc, lines) == (1, [
        "checking compose.yml",
        f"compose.yml: services api, api2: claim path /api, path /v1 {why}",
        "  fix: give one of them another path or host",
        f"compose.yml: services www, www2: claim host www.example.com path / {why}",
        "  fix: give one of them another path or host",
        "2 problem(s) in 4 service(s)",
    ])


def test_no_conflict_for_identical_settings_or_other_hosts(check: Check) -> None:
    # Identical settings make one route with both services as replicas (blue/green by weight);
    # the same path on another host, or on any host, is a different place.
    rc, lines = check({"compose.yml": """
        services:
          blue:
            labels: {gateway.path: /api, gateway.weight: 9}
          green:
            labels: {gateway.path: /api, gateway.weight: 1, gateway.port: 8080}
          other:
            labels: {gateway.path: /api, gateway.host: api.example.com, gateway.lb: least_conn}
          swarm:
            labels: {gateway.path: /s, gateway.port: 80}
            deploy:
              labels: {gateway.path: /s, gateway.port: 80}
    """})
    assert (rc, lines) == (0, ["checking compose.yml", "ok: 4 service(s) routed, 0 not routed"])


# --- several files ---------------------------------------------------------------------------------

BASE = """
    services:
      api:
        labels:
          gateway.path: /api
          gateway.port: eighty
      web:
        labels: [gateway.path=/web]
"""


def test_second_file_fixes_the_first(check: Check) -> None:
    rc, lines = check({"compose.yml": BASE, "compose.prod.yml": """
        services:
          api:
            labels: ["gateway.port=8080"]
    """})
    assert (rc, lines) == (0, [
        "checking compose.yml, compose.prod.yml (merged in this order)",
        "ok: 2 service(s) routed, 0 not routed",
    ])


def test_problems_name_the_file_the_value_came_from(check: Check) -> None:
    rc, lines = check({"compose.yml": BASE, "override.yml": """
        services:
          web:
            labels: {gateway.strip_prefix: maybe}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml, override.yml (merged in this order)",
        "compose.yml: service api: label gateway.port='eighty': a port number between 1 and 65535",
        PORT_FIX,
        "override.yml: service web: label gateway.strip_prefix='maybe': true or false",
        "  fix: gateway.strip_prefix expects true or false, e.g. gateway.strip_prefix=true",
        "2 problem(s) in 2 service(s)",
    ])


def test_a_later_file_can_create_a_conflict(check: Check) -> None:
    rc, lines = check({"compose.yml": BASE, "more.yml": """
        services:
          web:
            labels: {gateway.path: /api, gateway.strip_prefix: true}
          api:
            labels: {gateway.port: "80"}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml, more.yml (merged in this order)",
        "more.yml: services api, web: claim path /api with different settings; which one gets it "
        "depends on which container is created first",
        "  fix: give one of them another path or host",
        "1 problem(s) in 2 service(s)",
    ])


def test_reset_and_override_tags(check: Check) -> None:
    rc, lines = check({"compose.yml": BASE + """
      old:
        labels: {gateway.pth: /old}
      swarm:
        deploy:
          labels: {gateway.pth: /s}
    """, "fix.yml": """
        services:
          api:
            labels: !override {gateway.path: /api}
          web:
            labels: !reset []
          old: !reset
          swarm:
            deploy: !reset {}
    """})
    assert (rc, lines) == (0, [
        "checking compose.yml, fix.yml (merged in this order)",
        "ok: 1 service(s) routed, 2 not routed",
    ])


# --- environment variables -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "result", "missing"),
    [
        ("/api", "/api", []),
        ("${P:-/api}", "/api", []),
        ("${P-/api}", "/api", []),
        ("/v1${P:-/api}/x", "/v1/api/x", []),
        ("${A:-${B:-/nested}}", "/nested", []),
        ("${A:-${B}}", "${B}", ["${B}"]),
        ("$${P}", "${P}", []),
        ("a$$b", "a$b", []),
        ("${P}", "${P}", ["${P}"]),
        ("$P/x", "$P/x", ["$P"]),
        ("${P:?set P}", "${P:?set P}", ["${P:?set P}"]),
        ("${P:+/x}", "${P:+/x}", ["${P:+/x}"]),
        ("cost: 5$", "cost: 5$", []),
        ("${unterminated", "${unterminated", []),
    ],
)
def test_interpolate(value: str, result: str, missing: list[str]) -> None:
    assert _interpolate(value) == (result, missing)


def test_defaults_are_checked_and_unset_variables_are_noted(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels:
              gateway.path: ${API_PATH:-/api}
              gateway.port: ${API_PORT:-eighty}
              gateway.network: ${NET}
          web:
            labels: ["gateway.host=${HOST:?set HOST}", "gateway.lb=${LB:-least_conn}"]
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: note: label gateway.network='${NET}' not checked: it needs "
        "${NET} from the environment",
        "compose.yml: service api: label gateway.port='eighty' (from '${API_PORT:-eighty}'): "
        "a port number between 1 and 65535",
        PORT_FIX,
        "compose.yml: service web: note: label gateway.host='${HOST:?set HOST}' not checked: it "
        "needs ${HOST:?set HOST} from the environment",
        "1 problem(s) in 1 service(s)",
    ])


def test_every_known_key_may_come_from_the_environment(check: Check) -> None:
    labels = "\n".join(f"      gateway.{key}: ${{V{i}}}" for i, key in enumerate(sorted(KEYS)))
    rc, lines = check({"compose.yml": "services:\n  api:\n    labels:\n" + labels + "\n"})
    assert rc == 0
    assert len(lines) == len(KEYS) + 2
    assert lines[-1] == "ok: 1 service(s) routed, 0 not routed"


def test_stand_in_values_do_not_make_combination_problems(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          a:
            labels: {gateway.path: /a, gateway.health.path: /h, gateway.health.interval: 1s,
                     gateway.health.timeout: $T}
          b:
            labels: {gateway.path: /b, gateway.health.path: /h, gateway.health.interval: $I,
                     gateway.health.timeout: 10s}
    """})
    assert rc == 0
    assert lines[-1] == "ok: 2 service(s) routed, 0 not routed"


def test_unknown_key_next_to_an_unset_variable(check: Check) -> None:
    rc, lines = check({"compose.yml": """
        services:
          api:
            labels: {gateway.path: $P, gateway.pth: /api}
    """})
    assert (rc, lines) == (1, [
        "checking compose.yml",
        "compose.yml: service api: note: label gateway.path='$P' not checked: it needs $P from "
        "the environment",
        "compose.yml: service api: label gateway.pth='/api': unknown key",
        "  fix: rename it to gateway.path",
        "1 problem(s) in 1 service(s)",
    ])


# --- files that can't be checked -------------------------------------------------------------------

def test_yaml_syntax_error(check: Check) -> None:
    rc, lines = check({"good.yml": BASE, "compose.yml": """
        services:
          api:
            labels:
              gateway.path: /x
             bad: [
    """})
    assert (rc, lines) == (2, [
        "compose.yml:6:6: invalid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping that starts at line 4)",
    ])


def test_missing_file(check: Check) -> None:
    rc, lines = check({"compose.yml": BASE}, "compose.yml", "nope.yml")
    assert (rc, lines) == (2, ["nope.yml: cannot read: No such file or directory"])


def test_every_unreadable_file_is_named(check: Check) -> None:
    rc, lines = check({"tab.yml": "a:\n\tb: 1\n"}, "tab.yml", "nope.yml")
    assert rc == 2
    assert lines == [
        "tab.yml:2:1: invalid YAML: found character '\\t' that cannot start any token "
        "(while scanning for the next token)",
        "nope.yml: cannot read: No such file or directory",
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("- a\n- b\n", "compose.yml: not a compose file: the top level must be a mapping"),
        ("services: [api]\n", "compose.yml: not a compose file: services must be a mapping"),
        ("services:\n  api: !custom x\n",
         "compose.yml:2:8: invalid YAML: could not determine a constructor for the tag '!custom'"),
    ],
)
def test_not_a_compose_file(check: Check, text: str, line: str) -> None:
    assert check({"compose.yml": text}) == (2, [line])


def test_no_files(check: Check) -> None:
    assert check({}) == (2, ["edgeproxy check: no compose files given"])


# --- Swarm: deploy.labels are service labels ---------------------------------------------------------

def test_deploy_labels_without_a_port_are_skipped_in_swarm(check: Check) -> None:
    rc, lines = check({"stack.yml": """
        services:
          api:
            labels: {gateway.path: /api}
            deploy:
              labels: {gateway.path: /api}
    """})
    assert (rc, lines[1:3]) == (1, [
        "stack.yml: service api: deploy.labels gateway.port: missing: Swarm does no port "
        "detection, so the service is skipped without it",
        "  fix: add gateway.port under deploy.labels, e.g. gateway.port=8080 (the port the "
        "service listens on)"])


@pytest.mark.parametrize(("value", "rc"), [("vip", 0), ("tasks", 0), ("dns", 1)])
def test_the_swarm_endpoint_key_is_read_under_deploy_labels(check: Check, value: str,
                                                            rc: int) -> None:
    got, lines = check({"stack.yml": f"""
        services:
          api:
            labels: {{gateway.path: /api}}
            deploy:
              labels: {{gateway.path: /api, gateway.port: 80, gateway.swarm.endpoint: {value}}}
    """})
    assert got == rc, lines
    if rc:
        assert lines[1] == ("stack.yml: service api: deploy.labels "
                            "gateway.swarm.endpoint='dns': vip or tasks")
