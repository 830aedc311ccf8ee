"""docs/flower.md's "Three machines" walkthrough, run as written.

The fenced bash blocks of that section, each tagged ``<!-- three-machines: server -->`` or
``<!-- three-machines: owner -->``, run in the doc's order: one bash per machine, in its own
session, in a copy of its folder of examples/deployment (the three owners on this one
machine). The test substitutes only what one machine running four must change: the
server's name and address (this machine's non-loopback address), the SuperLink's port, each
owner's ``--port`` and the fedmoa checkout's path; the shells get ``OMP_NUM_THREADS=1``, as
four machines share these cores. It switches the copied experiment and client files to
the tiny model for one round, as a test must. TLS is on, from the doc's
own openssl recipe (or the same certificates made with ``cryptography`` where openssl is
missing).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from fedmoa.federation.flower.deployment import free_port, session_processes, stop_processes
from fedmoa.federation.flower.node import MODEL_BUILD_LOG
from fedmoa.runs import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "flower.md"
EXAMPLE = ROOT / "examples" / "deployment"
OWNERS = ("node-arith-boxed", "node-arith-strict", "node-chain")
# The placeholders of the walkthrough, and what they become here.
DOC_NAME, DOC_IP, DOC_LINK_PORT, DOC_NODE_PORT = "server.example", "203.0.113.10", 9091, 9094
DOC_CHECKOUT = "/path/to/fedmoa"

TAGGED_BLOCK = re.compile(r"<!-- three-machines: (server|owner) -->\n```bash\n(.*?)```\n", re.S)


def walkthrough() -> list[tuple[str, str]]:
    """The section's bash blocks as (machine, text), in the doc's order; every bash block of
    the section must be tagged."""
    text = DOC.read_text()
    section = text[text.index("\n## Three machines\n") + 1 :]
    section = section[: section.index("\n## ")]
    blocks = TAGGED_BLOCK.findall(section)
    assert len(blocks) == section.count("```bash"), "an untagged bash block in Three machines"
    return blocks


def this_machines_address() -> str:
    """A non-loopback IPv4 address of this machine (what ``hostname -I`` lists), else 127.0.0.1."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


def substitute(block: str, values: dict[str, str]) -> str:
    for pattern, value in values.items():
        block = re.sub(pattern, value, block)
    for placeholder in (DOC_NAME, DOC_IP, DOC_CHECKOUT):
        assert placeholder not in block, placeholder
    return block


def edit(path: Path, *replacements: tuple[str, str]) -> None:
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"{path}: {old!r}"
        text = text.replace(old, new)
    path.write_text(text)


def tiny(deployment: Path) -> None:
    """The tiny model, one round, few prompts, steps and tokens (tests/test_flower.py's)."""
    edit(
        deployment / "server" / "experiment.toml",
        ('name = "smollm2-135m"', 'name = "tiny-random-qwen2"\ndtype = "fp32"\ndevice = "cpu"'),
        ("rounds = 2", "rounds = 1"),
        ("validation_prompts = 4", "validation_prompts = 2"),
        ("test_prompts = 8", "test_prompts = 2"),
    )
    for owner in OWNERS:
        edit(
            deployment / owner / "client.toml",
            ("local_steps = 2", "local_steps = 1"),
            ("max_new_tokens = 32", "max_new_tokens = 6"),
            ("size = 120", "size = 24"),
        )


class Shell:
    """One machine's shell: ``bash`` in the machine's folder, in a session of its own, fed
    the walkthrough's blocks one at a time (``source``, so variables carry to later blocks
    as in a terminal); its output, and its background jobs', goes to ``log``."""

    def __init__(self, name: str, folder: Path, env: dict[str, str], scratch: Path) -> None:
        self.name, self.scratch, self.blocks = name, scratch, 0
        self.log = scratch / f"{name}.log"
        self.process = subprocess.Popen(
            ["bash"],
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(self, block: str, timeout: float, seen: dict[psutil.Process, str]) -> int:
        """Run ``block`` and return its exit status (its last command's); ``seen`` collects
        the processes of this test's sessions meanwhile, with their command lines (Flower's
        app processes come and go)."""
        self.blocks += 1
        script = self.scratch / f"{self.name}-{self.blocks}.sh"
        status = script.with_suffix(".status")
        script.write_text(block)
        assert self.process.stdin is not None
        self.process.stdin.write(f"source '{script}'; echo $? > '{status}'\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            for process in session_processes(SESSIONS):
                # The latest command line (a job is "bash" until it execs), but not the empty
                # one that a process may show while it exits.
                seen.setdefault(process, "")
                with contextlib.suppress(psutil.Error):
                    seen[process] = " ".join(process.cmdline()) or seen[process]
            if status.exists() and status.read_text().strip():
                break
            assert self.process.poll() is None, f"{self.name}'s shell exited\n{self.tail()}"
            assert time.monotonic() < deadline, (
                f"{self.name}: block {self.blocks} hung\n{self.tail()}"
            )
            time.sleep(0.5)
        return int(status.read_text())

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


SESSIONS: set[int] = set()  # the session ids of the running test's shells


def cryptography_certificates(certs: Path, name: str, address: str) -> None:
    """The doc's openssl recipe, with ``cryptography``: a CA and a server certificate whose
    subjectAltName holds DNS:name, IP:address and IP:127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key_file(key: rsa.RSAPrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = (rsa.generate_private_key(public_exponent=65537, key_size=3072) for _ in "ab")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoa deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(address))]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs.mkdir(exist_ok=True)
    key_file(ca_key, certs / "ca.key")
    key_file(key, certs / "server.key")
    (certs / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (certs / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))


def wait_for_port(address: str, port: int, shell: Shell, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {address}:{port}\n{shell.tail()}")


def test_the_server_folder_is_the_flower_app_of_examples_flower_app():
    """examples/deployment/server/pyproject.toml runs the same apps with the same run-config
    defaults as examples/flower_app (the walkthrough runs ``flwr run .`` in server/)."""
    app, server = (
        tomllib.loads(path.read_text())
        for path in (
            ROOT / "examples" / "flower_app" / "pyproject.toml",
            EXAMPLE / "server" / "pyproject.toml",
        )
    )
    assert server["tool"]["flwr"]["app"] == app["tool"]["flwr"]["app"]
    assert server["project"]["dependencies"] == app["project"]["dependencies"] == []
    # runs/ and certs/ stay out of the FAB that `flwr run .` builds (flwr reads this file).
    ignored = (EXAMPLE / "server" / ".gitignore").read_text().splitlines()
    assert {"runs/", "certs/"} <= set(ignored)
    roles = [machine for machine, _ in walkthrough()]
    assert roles == ["server", "server", "owner", "server", "owner", "server"]


def test_three_machines_walkthrough_as_written(tmp_path):
    """Certificates, a TLS SuperLink on this machine's address, three SuperNodes with their own
    client files and resident ClientApps connecting to it over TLS, ``flwr run .`` from the
    server folder: one round, a client record per owner; after the walkthrough's ``kill``s,
    no process is left."""
    openssl = shutil.which("openssl") is not None
    if not openssl:
        pytest.importorskip("cryptography", reason="neither openssl nor cryptography")
    deployment = tmp_path / "deployment"
    shutil.copytree(EXAMPLE, deployment, ignore=shutil.ignore_patterns("runs", "certs", "*.state"))
    tiny(deployment)
    server_dir = deployment / "server"
    scratch = tmp_path / "shells"
    scratch.mkdir()

    address = this_machines_address()
    link = free_port()
    node_ports = {owner: free_port() for owner in OWNERS}
    server_values = {
        rf"SERVER_NAME={re.escape(DOC_NAME)}\b": f"SERVER_NAME={address}",
        rf"SERVER_IP={re.escape(DOC_IP)}\b": f"SERVER_IP={address}",
        rf"\b{DOC_LINK_PORT}\b": str(link),
        re.escape(DOC_CHECKOUT): str(ROOT),
    }

    def owner_values(owner: str) -> dict[str, str]:
        return {
            rf"\b{re.escape(DOC_NAME)}:{DOC_LINK_PORT}\b": f"{address}:{link}",
            rf"\b{DOC_NODE_PORT}\b": str(node_ports[owner]),
            re.escape(DOC_CHECKOUT): str(ROOT),
        }

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # four machines' processes on this machine's cores
        "FLWR_HOME": str(tmp_path / "flwr-home"),  # the owners' (the server sets its own)
    }
    env.pop("VIRTUAL_ENV", None)
    shells = {"server": Shell("server", server_dir, env, scratch)}
    shells.update({o: Shell(o, deployment / o, env, scratch) for o in OWNERS})
    SESSIONS.clear()
    SESSIONS.update(shell.process.pid for shell in shells.values())
    seen: dict[psutil.Process, str] = {}
    try:
        blocks = walkthrough()
        certificates, superlink, node, submit, stop_node, stop_superlink = blocks
        # On the server: certificates, then the SuperLink and flwr's connection.
        block = substitute(certificates[1], server_values)
        if not openssl:  # only the recipe's variables; the same files from cryptography
            block = "\n".join(line for line in block.splitlines() if re.match(r"[A-Z_]+=", line))
            cryptography_certificates(server_dir / "certs", address, address)
        assert shells["server"].run(block, 120, seen) == 0, shells["server"].tail()
        assert shells["server"].run(substitute(superlink[1], server_values), 60, seen) == 0
        wait_for_port(address, link, shells["server"])
        ca = server_dir / "certs" / "ca.crt"
        if address != "127.0.0.1":  # bound to the given address only
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", link)) != 0, "reachable on 127.0.0.1"
        # HTTPS with the doc's CA and the server's address; no plain HTTP.
        secure = http.client.HTTPSConnection(
            address, link, timeout=30, context=ssl.create_default_context(cafile=ca)
        )
        secure.request("GET", "/health")
        assert secure.getresponse().status == 200
        secure.close()
        plain = http.client.HTTPConnection(address, link, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/health")
            plain.getresponse()
        plain.close()
        # Each owner gets ca.crt (only), into its folder, and starts its node there.
        for owner in OWNERS:
            shutil.copy(ca, deployment / owner / "ca.crt")
            assert shells[owner].run(substitute(node[1], owner_values(owner)), 60, seen) == 0
        # The run, from the server folder.
        began = time.monotonic()
        status = shells["server"].run(substitute(submit[1], server_values), 900, seen)
        seconds = time.monotonic() - began
        log = shells["server"].tail()
        assert status == 0, log
        run = server_dir / "runs" / "deployment"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds"] == 1, log
        clients = [r for r in RunDirectory(run).read_metrics() if r["type"] == "client"]
        assert sorted((r["client"], r["round"]) for r in clients) == [
            ("arith-boxed", 1),
            ("arith-strict", 1),
            ("chain", 1),
        ], log
        assert not any("failed" in r for r in clients), clients
        for owner in OWNERS:  # one resident model per node, built once
            assert shells[owner].tail(10**7).count(MODEL_BUILD_LOG) == 1, shells[owner].tail()
        # The walkthrough's kills: each owner's ClientApp and SuperNode, then the SuperLink.
        for owner in OWNERS:
            assert shells[owner].run(substitute(stop_node[1], owner_values(owner)), 30, seen) == 0
        assert shells["server"].run(substitute(stop_superlink[1], server_values), 30, seen) == 0
        for shell in shells.values():
            shell.close()
        started = " | ".join(seen.values())
        for program, count in [
            ("flower-superlink", 1),
            ("flower-superexec", 1),  # the SuperLink's
            ("flwr-serverapp", 1),
            ("flower-supernode", 3),
            ("fedmoa clientapp", 3),
        ]:  # what there was to stop: each seen, so each checked below
            assert started.count(program) >= count, (program, list(seen.values()))
        _, left = psutil.wait_procs(seen.keys() | session_processes(SESSIONS), timeout=30)
        described = []
        for process in left:
            try:
                described.append(f"{process.pid}: {' '.join(process.cmdline())}")
            except psutil.Error:  # gone meanwhile
                continue
        assert described == [], "processes outlived the walkthrough's kill commands"
        print(f"flwr run took {seconds:.0f} s")
    finally:
        for shell in shells.values():
            if shell.process.stdin and not shell.process.stdin.closed:
                shell.process.stdin.close()
        stop_processes(seen.keys() | session_processes(SESSIONS))
        for shell in shells.values():
            shell.process.wait(timeout=30)
        SESSIONS.clear()
