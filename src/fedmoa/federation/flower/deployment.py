"""A whole Flower deployment on one machine: a SuperLink, SuperNodes and ``flwr run``.

For tests, benchmarks and trying a deployment before spreading it over machines: the
processes are the ones docs/flower.md starts by hand, each SuperNode in its own folder.
With ``resident=True`` each SuperNode runs ``--isolation process`` and gets one
long-lived ``fedmoa clientapp`` (the model stays loaded); otherwise Flower starts a
``flwr-clientapp`` process per message.

``session_processes`` and ``stop_processes`` find and stop what a shell started by hand
(docs/flower.md, "Three machines"; tests/test_deployment_walkthrough.py): the shell's
background jobs share its session, and Flower starts its SuperExec and app processes
below them in sessions of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedmoa.errors import FedMOAError
from fedmoa.federation.flower.settings import FLOWER_ENV

BIN = Path(sys.executable).parent  # flwr, flower-superlink, ... and fedmoa live beside python


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: the folder it starts in and its ``--node-config``."""

    name: str
    folder: Path
    node_config: str  # e.g. "client-config='client.toml'" or "partition-id=0 num-partitions=2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalDeployment:
    """Start with ``with LocalDeployment(...) as d:``, run with ``d.run(...)``; every process
    is stopped on exit and ``d.leftover`` lists any that outlived it."""

    def __init__(
        self,
        root: Path,
        nodes: list[NodeSpec],
        *,
        resident: bool = True,
        threads_per_node: int = 1,
        object_wait: float | None = None,
    ) -> None:
        root = root.resolve()  # Flower's processes do not start in this cwd
        nodes = [NodeSpec(n.name, n.folder.resolve(), n.node_config) for n in nodes]
        self.root, self.nodes, self.resident = root, nodes, resident
        # each fedmoa clientapp's --object-wait (its default when None)
        self.object_wait = [] if object_wait is None else ["--object-wait", str(object_wait)]
        self.logs = root / "logs"
        self.home = root / "flwr-home"
        self.link = free_port()
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its CLIs
            # Several torch processes share the cores: without a cap, OpenMP spin-waits make a
            # local step ~100x slower.
            "OMP_NUM_THREADS": str(threads_per_node),
        }
        self.processes: list[subprocess.Popen] = []
        self.leftover: list[int] = []

    def __enter__(self) -> LocalDeployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n'
            f'[superlink.local]\naddress = "127.0.0.1:{self.link}"\ninsecure = true\n'
        )
        try:
            self._start(
                "superlink", self.root, "flower-superlink", "--insecure", "--port", str(self.link)
            )
            self._wait_for_port(self.link)
            for node in self.nodes:
                port = free_port()
                isolation = ["--isolation", "process"] if self.resident else []
                self._start(
                    f"supernode-{node.name}",
                    node.folder,
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.link}",
                    "--port",
                    str(port),
                    *isolation,
                    "--node-config",
                    node.node_config,
                )
                self._wait_for_port(port)
                if self.resident:
                    self._start(
                        f"clientapp-{node.name}",
                        node.folder,
                        "fedmoa",
                        "clientapp",
                        "--runtime-api-address",
                        f"127.0.0.1:{port}",
                        *self.object_wait,
                    )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, str | bool],
        cwd: Path,
        timeout: float = 3600,
    ) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR local --run-config ... --stream``; returns when the run ends."""
        process = self.start_run(app_dir, run_config, cwd, capture=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def start_run(
        self,
        app_dir: Path,
        run_config: Mapping[str, str | bool],
        cwd: Path,
        capture: bool = False,
    ) -> subprocess.Popen:
        """``flwr run`` started, not waited for (strings quoted, booleans as TOML's)."""
        config = " ".join(
            f"{key}={str(value).lower()}" if isinstance(value, bool) else f"{key}='{value}'"
            for key, value in run_config.items()
        )
        pipe = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app_dir), "local", "--run-config", config, "--stream"],
            env=self.env,
            cwd=cwd,
            stdout=pipe,
            stderr=pipe,
            text=True,
        )

    def kill_serverapps(self) -> int:
        """SIGKILL every ``flwr-serverapp`` process of this deployment (a server that dies);
        returns how many there were."""
        killed = 0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if any("flwr-serverapp" in part for part in child.cmdline()):
                            child.kill()
                            killed += 1
        return killed

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def __exit__(self, *exc: object) -> None:
        """SIGTERM each process group, SIGKILL what is left, then the detached descendants
        (Flower starts its SuperExec and app processes in sessions of their own)."""
        children: list[psutil.Process] = []
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                children += psutil.Process(process.pid).children(recursive=True)
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=10)
        pids = [p.pid for p in self.processes] + [c.pid for c in children]
        self.leftover = [pid for pid in pids if _alive(pid)]

    def _start(self, name: str, cwd: Path, *args: str) -> None:
        out = (self.logs / f"{name}.log").open("w")
        self.processes.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=self.env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        process = self.processes[-1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FedMOAError(f"{process.args[0]} exited at start; see {self.logs}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FedMOAError(f"nothing listens on port {port} after {timeout:.0f}s")


def session_processes(sessions: Collection[int]) -> set[psutil.Process]:
    """The live processes of these sessions (session ids: the PIDs of the processes started
    with ``start_new_session=True``) and every descendant of theirs, whatever its session."""
    found: set[psutil.Process] = set()
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) in sessions and _running(process):
                found.add(process)
                found.update(process.children(recursive=True))
    return found


def stop_processes(processes: Iterable[psutil.Process], timeout: float = 10) -> list[int]:
    """SIGTERM each process, SIGKILL those alive after ``timeout`` seconds; returns the PIDs
    that outlived both (a ``psutil.Process`` knows its start time, so a reused PID is not
    signalled)."""
    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in processes if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
