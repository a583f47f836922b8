"""edgeproxy.control.providers.docker.docker_hint: the SDK's failure text -> what the operator can do."""

from __future__ import annotations

import pytest

from edgeproxy.control.providers.docker import docker_hint

# What docker.from_env() raises, as the provider logs it.
DENIED = ("DockerException: Error while fetching server API version: ('Connection aborted.', "
          "PermissionError(13, 'Permission denied'))")
MISSING = ("DockerException: Error while fetching server API version: ('Connection aborted.', "
           "FileNotFoundError(2, 'No such file or directory'))")
REFUSED = ("DockerException: Error while fetching server API version: ('Connection aborted.', "
           "ConnectionRefusedError(111, 'Connection refused'))")


@pytest.mark.parametrize(
    ("error", "host", "expected"),
    [
        (DENIED, None, ["may not open /var/run/docker.sock", "group_add", "DOCKER_GID",
                        "--group-add", "DOCKER_HOST to a socket proxy"]),
        (DENIED, "unix:///run/user/1000/docker.sock", ["may not open /run/user/1000/docker.sock"]),
        (MISSING, None, ["no Docker socket at /var/run/docker.sock: mount it", "socket proxy"]),
        (REFUSED, None, ["nothing listens on /var/run/docker.sock"]),
        ("ConnectionError: ... Connection refused", "tcp://socket-proxy:2375",
         ["DOCKER_HOST=tcp://socket-proxy:2375 does not answer", "CONTAINERS and EVENTS"]),
        ("APIError: 403 Client Error: Forbidden", "tcp://socket-proxy:2375",
         ["refuses the request", "CONTAINERS"]),
        ("ReadTimeout: read timed out", None, ["docker -H unix:///var/run/docker.sock ps",
                                                "EDGEPROXY_DOCKER=false"]),
    ],
)
def test_hint(error: str, host: str | None, expected: list[str]) -> None:
    hint = docker_hint(error, host)
    for part in expected:
        assert part in hint, hint
