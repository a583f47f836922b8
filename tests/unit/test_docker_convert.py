"""edgeproxy.control.providers.docker: Docker Engine API documents (v1.4x shapes) -> Container."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from edgeproxy.control.providers.docker import container_from_inspect, container_from_list
from edgeproxy.routes.model import Container
from edgeproxy.routes.table import build_table

CID = "8dfafdbc3a40b9e1c0d4f5e2a7b6c3d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5"

# One entry of GET /containers/json?all=1 (Engine API v1.43), as docker-py returns it.
LIST_ITEM: dict[str, Any] = {
    "Id": CID,
    "Names": ["/shop-orders-1"],
    "Image": "registry.example.com/orders:1.4.2",
    "ImageID": "sha256:3e1a5f8e0c2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a6c8e0b2d4f",
    "Command": "/usr/local/bin/orders --port 8080",
    "Created": 1714566896,
    "Ports": [
        {"PrivatePort": 8080, "Type": "tcp"},
        {"IP": "0.0.0.0", "PrivatePort": 9090, "PublicPort": 19090, "Type": "tcp"},
        {"IP": "::", "PrivatePort": 9090, "PublicPort": 19090, "Type": "tcp"},
        {"PrivatePort": 5353, "Type": "udp"},
    ],
    "Labels": {
        "com.docker.compose.project": "shop",
        "com.docker.compose.service": "orders",
        "gateway.path": "/orders",
        "gateway.port": "8080",
    },
    "State": "running",
    "Status": "Up 12 minutes (healthy)",
    "HostConfig": {"NetworkMode": "shop_default"},
    "NetworkSettings": {
        "Networks": {
            "shop_default": {
                "IPAMConfig": None,
                "Links": None,
                "Aliases": None,
                "MacAddress": "02:42:ac:13:00:03",
                "NetworkID": "5c1f0e2d3b4a59687f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a29180",
                "EndpointID": "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
                "Gateway": "172.19.0.1",
                "IPAddress": "172.19.0.3",
                "IPPrefixLen": 16,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "DriverOpts": None,
                "DNSNames": None,
            },
            "backend": {
                "IPAMConfig": {},
                "Links": None,
                "Aliases": None,
                "MacAddress": "02:42:ac:14:00:02",
                "NetworkID": "7e6d5c4b3a29180f7e6d5c4b3a29180f5c1f0e2d3b4a59687f6e5d4c3b2a1908",
                "EndpointID": "0718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6",
                "Gateway": "172.20.0.1",
                "IPAddress": "172.20.0.2",
                "IPPrefixLen": 16,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "DriverOpts": None,
                "DNSNames": None,
            },
        }
    },
    "Mounts": [],
}

# GET /containers/{id}/json (Engine API v1.44) for the same container, trimmed of fields we ignore.
INSPECT: dict[str, Any] = {
    "Id": CID,
    "Created": "2024-05-01T12:34:56.123456789Z",
    "Path": "/usr/local/bin/orders",
    "Args": ["--port", "8080"],
    "State": {
        "Status": "running",
        "Running": True,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": 48213,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2024-05-01T12:34:57.020321567Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
        "Health": {
            "Status": "healthy",
            "FailingStreak": 0,
            "Log": [
                {"Start": "2024-05-01T12:35:27.1+00:00", "End": "2024-05-01T12:35:27.2+00:00",
                 "ExitCode": 0, "Output": "ok\n"},
            ],
        },
    },
    "Image": "sha256:3e1a5f8e0c2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a6c8e0b2d4f",
    "Name": "/shop-orders-1",
    "RestartCount": 0,
    "Driver": "overlay2",
    "Platform": "linux",
    "HostConfig": {"NetworkMode": "shop_default", "RestartPolicy": {"Name": "unless-stopped"}},
    "Config": {
        "Hostname": "8dfafdbc3a40",
        "User": "app",
        "ExposedPorts": {"8080/tcp": {}, "9090/tcp": {}, "5353/udp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        "Cmd": ["--port", "8080"],
        "Healthcheck": {"Test": ["CMD", "/usr/local/bin/orders", "health"], "Interval": 30000000000},
        "Image": "registry.example.com/orders:1.4.2",
        "Labels": {
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "orders",
            "gateway.path": "/orders",
            "gateway.port": "8080",
        },
    },
    "NetworkSettings": {
        "Bridge": "",
        "SandboxID": "f0e1d2c3b4a5",
        "Ports": {"8080/tcp": None, "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "19090"}]},
        "Gateway": "",
        "IPAddress": "",
        "Networks": copy.deepcopy(LIST_ITEM["NetworkSettings"]["Networks"]),
    },
}

EXPECTED = Container(
    id=CID,
    name="shop-orders-1",
    labels={
        "com.docker.compose.project": "shop",
        "com.docker.compose.service": "orders",
        "gateway.path": "/orders",
        "gateway.port": "8080",
    },
    state="running",
    health="healthy",
    networks=(("backend", "172.20.0.2"), ("shop_default", "172.19.0.3")),
    exposed_ports=(8080, 9090),
    created=1714566896.0,
)


def _list_item(**changes: Any) -> dict[str, Any]:
    item = copy.deepcopy(LIST_ITEM)
    item.update(changes)
    return item


def _inspect(**state: Any) -> dict[str, Any]:
    doc = copy.deepcopy(INSPECT)
    doc["State"].update(state)
    return doc


# --- containers/json ---------------------------------------------------------------------------

def test_list_item() -> None:
    c = container_from_list(LIST_ITEM)
    assert c == EXPECTED
    assert c.service == "orders"


@pytest.mark.parametrize(
    ("status", "health"),
    [
        ("Up 12 minutes (healthy)", "healthy"),
        ("Up 3 seconds (health: starting)", "starting"),
        ("Up 2 hours (unhealthy)", "unhealthy"),
        ("Up 5 minutes", None),
        ("Up About a minute (Paused)", None),
        ("Exited (0) 5 minutes ago", None),
        ("Exited (137) 2 seconds ago", None),
        ("Created", None),
        ("Restarting (1) 4 seconds ago", None),
        ("", None),
    ],
)
def test_list_health_from_status(status: str, health: str | None) -> None:
    assert container_from_list(_list_item(Status=status)).health == health


@pytest.mark.parametrize("state", ["running", "exited", "paused", "created", "restarting", "dead"])
def test_list_state(state: str) -> None:
    assert container_from_list(_list_item(State=state)).state == state


def test_list_exposed_tcp_ports_only_once_each() -> None:
    ports = [
        {"PrivatePort": 53, "Type": "udp"},
        {"PrivatePort": 443, "Type": "tcp"},
        {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
        {"IP": "::", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
        {"PrivatePort": 132, "Type": "sctp"},
    ]
    assert container_from_list(_list_item(Ports=ports)).exposed_ports == (80, 443)


@pytest.mark.parametrize("ports", [[], None])
def test_list_without_ports(ports: Any) -> None:
    # A stopped container lists no ports at all.
    assert container_from_list(_list_item(Ports=ports)).exposed_ports == ()


@pytest.mark.parametrize(
    ("networks", "expected"),
    [
        ({"bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""}}, (("bridge", "172.17.0.2"),)),
        ({"v6only": {"IPAddress": "", "GlobalIPv6Address": "fd00:dead:beef::2"}},
         (("v6only", "fd00:dead:beef::2"),)),
        ({"dual": {"IPAddress": "172.21.0.2", "GlobalIPv6Address": "fd00::2"}}, (("dual", "172.21.0.2"),)),
        ({"host": {"IPAddress": "", "GlobalIPv6Address": ""}}, (("host", ""),)),
        # an exited container keeps its networks but loses its addresses
        ({"shop_default": {"IPAddress": "", "GlobalIPv6Address": "", "NetworkID": ""}},
         (("shop_default", ""),)),
        ({"zeta": {"IPAddress": "10.0.0.9"}, "alpha": {"IPAddress": "10.1.0.9"}},
         (("alpha", "10.1.0.9"), ("zeta", "10.0.0.9"))),
        ({"none": None}, (("none", ""),)),
        ({}, ()),
    ],
)
def test_list_networks(networks: dict[str, Any], expected: tuple[tuple[str, str], ...]) -> None:
    item = _list_item(NetworkSettings={"Networks": networks})
    assert container_from_list(item).networks == expected


def test_list_without_network_settings() -> None:
    assert container_from_list(_list_item(NetworkSettings=None)).networks == ()


@pytest.mark.parametrize(
    ("names", "name"),
    [
        (["/shop-orders-1"], "shop-orders-1"),
        (["/shop-orders-1", "/web/orders"], "shop-orders-1"),
        ([], CID[:12]),
        (None, CID[:12]),
    ],
)
def test_list_name_without_slash(names: Any, name: str) -> None:
    assert container_from_list(_list_item(Names=names)).name == name


def test_list_created_and_missing_labels() -> None:
    c = container_from_list(_list_item(Created=1714566896, Labels=None))
    assert c.created == 1714566896.0
    assert c.labels == {}
    assert c.stopping is False


# --- containers/{id}/json ---------------------------------------------------------------------

def test_inspect() -> None:
    c = container_from_inspect(INSPECT)
    expected_created = datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC).timestamp()  # whole seconds
    assert c == Container(
        id=EXPECTED.id, name=EXPECTED.name, labels=EXPECTED.labels, state="running", health="healthy",
        networks=EXPECTED.networks, exposed_ports=(8080, 9090), created=expected_created,
    )


def test_list_and_inspect_agree() -> None:
    # The watcher mixes list entries (after a resync) and inspects (after an event), and the
    # table gives a contested path to the container with the smallest `created`. The list only
    # carries whole seconds, so both sources must yield the same value for the same container,
    # or a health event on one container can hand another container's route to it.
    assert container_from_inspect(INSPECT) == container_from_list(LIST_ITEM)


def test_conflict_winner_does_not_depend_on_the_source_of_an_observation() -> None:
    def pair(created: str, list_created: int, name: str, ip: str, strip: str) -> tuple[Container, Container]:
        labels = {"gateway.path": "/orders", "gateway.strip_prefix": strip}
        nets = {"app": {"IPAddress": ip, "GlobalIPv6Address": ""}}
        item = _list_item(Id=name * 64, Names=[f"/{name}"], Created=list_created, Labels=labels,
                          NetworkSettings={"Networks": nets})
        doc = _inspect()
        doc.update(Id=name * 64, Name=f"/{name}", Created=created,
                   NetworkSettings={"Networks": nets})
        doc["Config"]["Labels"] = labels
        return container_from_list(item), container_from_inspect(doc)

    # "b" was created first, 0.8 s before "a", within the same wall-clock second.
    a_list, a_inspect = pair("2024-05-01T12:34:56.9Z", 1714566896, "a", "10.0.0.1", "true")
    b_list, b_inspect = pair("2024-05-01T12:34:56.1Z", 1714566896, "b", "10.0.0.2", "false")
    winners = {
        only.routes[0].name
        for only in (
            build_table([a_list, b_list]),        # after a resync
            build_table([a_inspect, b_list]),     # after an event on "a"
            build_table([a_list, b_inspect]),     # after an event on "b"
            build_table([a_inspect, b_inspect]),  # after events on both
        )
    }
    assert len(winners) == 1, winners


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ({"Status": "healthy", "FailingStreak": 0, "Log": []}, "healthy"),
        ({"Status": "starting", "FailingStreak": 0, "Log": []}, "starting"),
        ({"Status": "unhealthy", "FailingStreak": 3, "Log": []}, "unhealthy"),
        ({"Status": "none"}, None),
        (None, None),
    ],
)
def test_inspect_health(health: dict[str, Any] | None, expected: str | None) -> None:
    doc = _inspect()
    if health is None:
        del doc["State"]["Health"]
    else:
        doc["State"]["Health"] = health
    assert container_from_inspect(doc).health == expected


@pytest.mark.parametrize("status", ["running", "exited", "paused", "restarting", "created", "dead"])
def test_inspect_state(status: str) -> None:
    assert container_from_inspect(_inspect(Status=status)).state == status


@pytest.mark.parametrize(
    ("exposed", "ports"),
    [
        ({"8080/tcp": {}, "9090/tcp": {}, "5353/udp": {}}, (8080, 9090)),
        ({"53/udp": {}}, ()),
        ({"80/tcp": {}, "80/udp": {}, "443/sctp": {}}, (80,)),
        ({}, ()),
        (None, ()),
    ],
)
def test_inspect_exposed_tcp_ports_only(exposed: dict[str, Any] | None, ports: tuple[int, ...]) -> None:
    doc = _inspect()
    doc["Config"]["ExposedPorts"] = exposed
    assert container_from_inspect(doc).exposed_ports == ports


@pytest.mark.parametrize(
    ("name", "expected"),
    [("/shop-orders-1", "shop-orders-1"), ("/web", "web"), ("", CID[:12]), (None, CID[:12])],
)
def test_inspect_name_without_slash(name: str | None, expected: str) -> None:
    doc = _inspect()
    doc["Name"] = name
    assert container_from_inspect(doc).name == expected


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        # Go's RFC3339Nano: nanoseconds, trailing zeros trimmed. Whole seconds are kept, as the
        # list gives them (see test_list_and_inspect_agree); the fraction is cut, never rounded up.
        ("2024-05-01T12:34:56.123456789Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-05-01T12:34:56.1234567Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-05-01T12:34:56.123Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-05-01T12:34:56.1Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-05-01T12:34:56Z", datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC)),
        ("2023-12-31T23:59:59.999999999Z", datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_inspect_created_from_nanosecond_timestamps(created: str, expected: datetime) -> None:
    doc = _inspect()
    doc["Created"] = created
    assert container_from_inspect(doc).created == expected.timestamp()


@pytest.mark.parametrize("created", ["", "yesterday", None])
def test_inspect_unparseable_created_is_zero(created: str | None) -> None:
    doc = _inspect()
    doc["Created"] = created
    assert container_from_inspect(doc).created == 0.0


def test_inspect_exited_container() -> None:
    doc = _inspect(Status="exited", Running=False, ExitCode=137,
                   FinishedAt="2024-05-01T13:00:00.5Z", Health={"Status": "unhealthy", "Log": []})
    for net in doc["NetworkSettings"]["Networks"].values():
        net["IPAddress"] = ""
    c = container_from_inspect(doc)
    assert (c.state, c.health) == ("exited", "unhealthy")
    assert c.networks == (("backend", ""), ("shop_default", ""))


def test_inspect_minimal_document() -> None:
    c = container_from_inspect({"Id": CID})
    assert c == Container(id=CID, name=CID[:12], labels={}, state="unknown", health=None,
                          networks=(), exposed_ports=(), created=0.0)
