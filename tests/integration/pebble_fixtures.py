"""Pebble (Let's Encrypt's RFC 8555 test CA, Debian package `pebble`) on loopback for the tests.

pebble-challtestsrv (same package) is Pebble's DNS server: it answers every A query with
127.0.0.1 (and no AAAA), so Pebble validates HTTP-01 for any name, e.g. app.test, on our
challenge port at 127.0.0.1 without touching /etc/hosts. Pebble's own HTTPS listener uses a
trustme certificate; its issuing root is fetched from the management endpoint /roots/0.
Never skipped: a missing binary fails with what to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import trustme
from helpers import free_port, wait_for

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


class Pebble:
    """A Pebble ACME server and its mock DNS; `http_port` is where it sends HTTP-01 requests."""

    def __init__(self, workdir: Path) -> None:
        for binary in (PEBBLE, CHALLTESTSRV):
            if not os.access(binary, os.X_OK):
                pytest.fail(f"{binary} not found: install the Debian package `pebble` "
                            "(scripts/test.sh does)", pytrace=False)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self.http_port = free_port()
        self.directory = f"https://localhost:{self.port}/dir"
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(workdir / "pebble-key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "pebble-cert.pem"))
        # What the ACME client must trust to talk to Pebble (not the issuing root).
        self.ca_bundle = workdir / "pebble-listener-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        (workdir / "pebble-config.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(workdir / "pebble-cert.pem"),
            "privateKey": str(workdir / "pebble-key.pem"),
            "httpPort": self.http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_path = workdir / "pebble.log"
        self.dns_log_path = workdir / "challtestsrv.log"

    def start(self) -> None:
        dns_log = self.dns_log_path.open("wb")
        self.procs.append(subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "",
             "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "",
             "-management", f"127.0.0.1:{self.dns_management_port}"],
            stdout=dns_log, stderr=subprocess.STDOUT))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}
        log = self.log_path.open("wb")
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.workdir / "pebble-config.json"),
             "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir))
        wait_for(lambda: requests.get(self.directory, verify=str(self.ca_bundle),
                                      timeout=1).ok, 15, what=f"pebble at {self.directory}")
        wait_for(lambda: requests.post(f"http://127.0.0.1:{self.dns_management_port}/set-default-ipv4",
                                       json={"ip": "127.0.0.1"}, timeout=1).ok,
                 15, what="pebble-challtestsrv management")

    def root_pem(self) -> str:
        """Pebble's issuing root (regenerated at every Pebble start)."""
        r = requests.get(f"https://localhost:{self.management_port}/roots/0",
                         verify=str(self.ca_bundle), timeout=5)
        r.raise_for_status()
        return r.text

    def resolve(self, host: str, address: str) -> None:
        """Make Pebble's DNS answer `host` with `address` (e.g. an address nobody listens on)."""
        r = requests.post(f"http://127.0.0.1:{self.dns_management_port}/add-a",
                          json={"host": host.rstrip(".") + ".", "addresses": [address]}, timeout=5)
        r.raise_for_status()

    def orders(self) -> int:
        """How many orders Pebble has accepted (from its log): the CA's own count."""
        return len(re.findall(r"^Pebble .* Added order ", self.log_path.read_text(errors="replace"),
                              re.MULTILINE))

    def issued_serials(self) -> list[int]:
        """Serial numbers Pebble logged as issued, oldest first."""
        text = self.log_path.read_text(errors="replace")
        return [int(s, 16) for s in re.findall(r"Issued certificate serial ([0-9a-f]+)", text)]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
