"""Sandbox for untrusted programs (code rewards): isolation, limits and structured results.

Each run starts a small supervisor process (``_sandbox_supervisor.py``, base interpreter, new
session, empty environment) that isolates and runs one program and reports back (a ``marshal``-ed dict; both ends run the same
interpreter):

- **processes**: the program gets its own session and process group; the supervisor is a child
  subreaper, and after the program exits (or times out) every process left with the run's uid is
  killed with one ``kill(-1, SIGKILL)`` sent by a helper holding that uid, so background processes,
  double forks and ``setsid`` escapes die with it;
- **user**: as root, the program runs as a uid of its own (``UID_BASE`` + a slot locked for the
  run), so ``RLIMIT_NPROC`` is enforced (it is not for root), it cannot signal the trainer and file
  permissions apply; otherwise it runs as the trainer's user;
- **limits**: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``,
  no core dumps, a wall-clock timeout enforced by the supervisor (and a backstop in the trainer),
  and a cap on stdout + stderr;
- **network**: a new network namespace (only a down loopback) where the kernel allows it,
  otherwise an audit hook in the program's interpreter that refuses sockets, ctypes and spawning
  new programs; ``network_isolation()`` says which, and the first run logs it;
- **filesystem**: as root, a mount namespace in which ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` are fresh size-limited tmpfs (the working directory is created there and vanishes
  with the run) and the project directory, the home directory and the virtual environment are
  hidden behind empty read-only tmpfs; otherwise a fresh temporary directory, deleted afterwards;
- **environment**: empty but for ``PATH``; ``python -I -S`` (no site, no user paths).

The pass rule: after the program (and its tests) ran to the end, the launcher writes a random
nonce to the real fd 1; a run passes only with exit status 0 and that nonce as its last line. See
``docs/sandbox.md`` for what is and is not protected.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import marshal
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedmoa.errors import ConfigError

logger = logging.getLogger(__name__)

UID_BASE = 1_500_000_000  # sandbox uids: UID_BASE + slot, one slot per concurrent run (as root)
UID_SLOTS = 1024
MAX_CONCURRENT = 32  # runs at once in this process, whatever the callers' max_workers
_GRACE = 10.0  # seconds the trainer waits beyond wall_seconds for the supervisor's report
_SUPERVISOR = Path(__file__).with_name("_sandbox_supervisor.py")
_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SYSTEM_DIRS = frozenset(
    [
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/proc",
        "/run",
        "/sbin",
        "/sys",
        "/usr",
        "/var",
    ]
)
_EXIT_MEMORY, _EXIT_BAD_PAYLOAD = 3, 120  # launcher exit codes

# Switches for the tests (fallback paths on a machine that has the better mechanism).
_TRY_NETNS = True
_DROP_PRIVILEGES = True
_PRIVATE_MOUNTS = True

_running = threading.BoundedSemaphore(MAX_CONCURRENT)
_isolation_lock = threading.Lock()
_isolation: dict[tuple[bool, bool, bool], dict[str, Any]] = {}


class Outcome(enum.StrEnum):
    """How a run ended. Only ``PASSED`` earns a reward."""

    PASSED = "passed"  # ran to the end (tests included), exit status 0
    FAILED = "failed"  # an exception (a failed assert), a syntax error, an early exit
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit
    CRASHED = "crashed"  # killed by a signal, out of memory, output over its cap
    SANDBOX_ERROR = "sandbox_error"  # the sandbox itself failed; says nothing about the program


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. CPU, memory, file size and open files apply to each process of the run;
    ``processes`` counts processes and threads; ``output_bytes`` caps stdout + stderr."""

    cpu_seconds: float = 6.0
    wall_seconds: float = 5.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 8
    output_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(
                    f"sandbox limit {f.name!r} must be a positive number, got {value!r}"
                )
            if f.name not in ("cpu_seconds", "wall_seconds") and not float(value).is_integer():
                raise ConfigError(f"sandbox limit {f.name!r} must be a whole number, got {value!r}")

    @classmethod
    def for_timeout(cls, timeout: float) -> SandboxLimits:
        """Defaults with a ``timeout``-second wall clock and one more (rounded up) of CPU."""
        return cls(cpu_seconds=math.ceil(timeout) + 1, wall_seconds=timeout)

    def updated(self, params: Mapping[str, Any]) -> SandboxLimits:
        """A copy with ``params`` (limit name -> value, e.g. from a reward's ``params``)."""
        known = {f.name for f in fields(self)}
        if unknown := sorted(set(params) - known):
            raise ConfigError(
                f"unknown sandbox limit(s) {unknown}: expected some of {sorted(known)}"
            )
        return replace(self, **params)


@dataclass(frozen=True)
class Program:
    """A program and, optionally, tests run after it in its namespace.

    The tests see the program's globals except those that shadow a builtin, unless listed in
    ``exports`` (the function under test may be called ``sum``), and the builtins as they were
    before the program ran."""

    source: str
    tests: str | None = None
    exports: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutionResult:
    """What a run did. ``stdout``/``stderr`` are tails (the last 16 KiB each), without the nonce;
    ``returncode`` is the exit status (None if a signal ended it), ``signal`` that signal."""

    outcome: Outcome
    returncode: int | None
    signal: int | None
    stdout: str
    stderr: str
    duration: float
    detail: str = ""
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED


def run_program(program: str | Program, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Runs ``program`` in the sandbox; never raises for anything the program does, and returns
    within about ``limits.wall_seconds`` + a few seconds."""
    if isinstance(program, str):
        program = Program(program)
    limits = limits or SandboxLimits()
    started = time.monotonic()
    nonce = secrets.token_hex(16)
    request: dict[str, Any] = {"hide": []}
    try:
        with _running, _uid_slot() as uid, _workdir() as workdir:
            request = _request(program, limits, nonce, uid, workdir)
            report = _supervise(request, limits, uid)
    except OSError as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
    result = _result(report, nonce, limits, time.monotonic() - started)
    if result.outcome is not Outcome.SANDBOX_ERROR:
        _note_isolation(report, request)
    return result


def run_many(
    programs: Sequence[str | Program], limits: SandboxLimits | None = None, max_workers: int = 4
) -> list[ExecutionResult]:
    """``run_program`` on each, at most ``max_workers`` at a time (and ``MAX_CONCURRENT`` in all),
    results in order."""
    if not programs:
        return []
    workers = max(1, min(max_workers, len(programs)))
    with ThreadPoolExecutor(workers, thread_name_prefix="fedmoa-sandbox") as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))


def network_isolation() -> str:
    """The network isolation the sandbox applies here: ``"netns"`` or ``"socket-blocked"``
    (``"unavailable"`` when the sandbox cannot run at all). Runs a probe the first time."""
    return _probe().get("network", "unavailable")


def isolation() -> dict[str, Any]:
    """What the sandbox applies here: ``network``, ``filesystem`` (``"private"`` mounts or
    ``"shared"``), ``user`` and the ``hidden`` paths. Runs a probe the first time."""
    return dict(_probe())


def _probe() -> dict[str, Any]:
    key = _switches()
    with _isolation_lock:
        if key in _isolation:
            return _isolation[key]
    run_program("pass", SandboxLimits(wall_seconds=30.0))
    with _isolation_lock:
        return _isolation.get(key, {})


def _switches() -> tuple[bool, bool, bool]:
    return _TRY_NETNS, _DROP_PRIVILEGES, _PRIVATE_MOUNTS


def _note_isolation(report: dict[str, Any], request: dict[str, Any]) -> None:
    """Remembers the mechanisms of the first run (per switch setting) and logs them once."""
    uid = report.get("uid")
    found = {
        "network": report.get("network", "unavailable"),
        "filesystem": report.get("filesystem", "shared"),
        "user": "per-run uid" if uid is not None else "same as the trainer",
        "hidden": list(request["hide"]) if report.get("filesystem") == "private" else [],
    }
    key = _switches()
    with _isolation_lock:
        if key in _isolation:
            return
        _isolation[key] = found
    strong = found["network"] == "netns" and found["filesystem"] == "private" and uid is not None
    reasons = "; ".join(
        f"{k}: {report[k]}" for k in ("netns_error", "mount_error") if report.get(k)
    )
    logger.log(
        logging.INFO if strong else logging.WARNING,
        "code sandbox: network isolation %s, filesystem %s%s, user %s%s",
        found["network"],
        found["filesystem"],
        f" (hidden: {', '.join(found['hidden'])})" if found["hidden"] else "",
        f"uid {UID_BASE}+slot" if uid is not None else "same as the trainer",
        f" ({reasons})" if reasons else "",
    )


def _python() -> str:
    """The base interpreter (the virtual environment lives in the hidden project directory)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _kept_paths() -> list[str]:
    python = _python()
    keep = [os.path.realpath(sys.base_prefix)]
    if not _under(python, keep[0]):
        keep.append(os.path.dirname(python))
    return keep


def _hidden_paths() -> list[str]:
    """The home directory, the working directory, the project checkout and the virtual
    environment, minus system and temporary directories and anything holding the interpreter."""
    candidates = []
    with contextlib.suppress(RuntimeError, KeyError):
        candidates.append(Path.home())
    with contextlib.suppress(OSError):
        candidates.append(Path.cwd())
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file():
        candidates.append(root)
    candidates.append(Path(sys.prefix))
    keep = _kept_paths()
    chosen: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates}, key=len):
        if (
            path in _SYSTEM_DIRS
            or any(_under(path, t) for t in _TMP_DIRS)
            or _under(os.path.realpath(tempfile.gettempdir()), path)  # holds the workdirs
            or any(_under(path, k) for k in keep)
            or any(_under(path, c) for c in chosen)
        ):
            continue
        chosen.append(path)
    return chosen


def _request(
    program: Program, limits: SandboxLimits, nonce: str, uid: int | None, workdir: str
) -> dict[str, Any]:
    return {
        "python": _python(),
        "workdir": workdir,
        "uid": uid,
        "netns": _TRY_NETNS,
        "mounts": _PRIVATE_MOUNTS,
        "hide": _hidden_paths(),
        "keep": _kept_paths(),
        "tmp_dirs": list(_TMP_DIRS),
        "tmp_bytes": 2 * limits.file_bytes + (1 << 20),
        "limits": {
            "cpu_seconds": math.ceil(limits.cpu_seconds),
            "wall_seconds": limits.wall_seconds,
            "memory_bytes": int(limits.memory_bytes),
            "file_bytes": int(limits.file_bytes),
            "open_files": int(limits.open_files),
            "processes": int(limits.processes),
            "output_bytes": int(limits.output_bytes),
        },
        "program": {
            "source": program.source,
            "tests": program.tests,
            "exports": list(program.exports),
        },
        "nonce": nonce,
    }


def _supervise(request: dict[str, Any], limits: SandboxLimits, uid: int | None) -> dict[str, Any]:
    report: dict[str, Any] = {}
    try:
        proc = subprocess.Popen(
            [_python(), "-I", "-S", str(_SUPERVISOR)],
            cwd=request["workdir"],
            env={},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return {"error": f"cannot start the sandbox supervisor: {exc}"}
    try:
        out, err = proc.communicate(marshal.dumps(request), timeout=limits.wall_seconds + _GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5.0)
        report = {"error": f"the supervisor did not report within {limits.wall_seconds + _GRACE}s"}
    else:
        try:
            report = marshal.loads(out)
            if not isinstance(report, dict):
                raise ValueError(f"a {type(report).__name__}, not a dict")
        except (ValueError, EOFError, TypeError):
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            report = {
                "error": f"supervisor exited with status {proc.returncode}: " + " | ".join(tail)
            }
    finally:
        if uid is not None and report.get("leftover", 1):
            _kill_uid(uid)  # backstop: the supervisor died or could not kill everything
    return report


def _result(
    report: dict[str, Any], nonce: str, limits: SandboxLimits, duration: float
) -> ExecutionResult:
    uid = report.get("uid")
    where = (
        f"network={report.get('network', '?')}, filesystem={report.get('filesystem', '?')}, "
        f"user={'uid ' + str(uid) if uid is not None else 'trainer'}"
    )
    if report.get("error") or "returncode" not in report:
        detail = report.get("error") or "incomplete report"
        return ExecutionResult(Outcome.SANDBOX_ERROR, None, None, "", "", duration, detail, where)
    status = report["returncode"]
    sig = -status if status is not None and status < 0 else None
    code = status if sig is None else None
    stdout, stderr = report["stdout"], report["stderr"]
    marker = f"\n{nonce}\n"
    finished = stdout.endswith(marker)
    if finished:
        stdout = stdout[: -len(marker)]

    def result(outcome: Outcome, detail: str) -> ExecutionResult:
        if report.get("leftover"):
            detail += f"; {report['leftover']} process(es) could not be killed"
        return ExecutionResult(outcome, code, sig, stdout, stderr, duration, detail, where)

    if report["timed_out"]:
        return result(Outcome.TIMEOUT, f"wall-clock limit of {limits.wall_seconds:g}s")
    if report["output_exceeded"]:
        return result(Outcome.CRASHED, f"output over its cap of {limits.output_bytes} bytes")
    cpu_limit = math.ceil(limits.cpu_seconds)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report["cpu_seconds"] >= cpu_limit):
        return result(Outcome.TIMEOUT, f"CPU-time limit of {cpu_limit}s")
    if sig is not None:
        return result(Outcome.CRASHED, f"killed by {_signal_name(sig)}")
    if code == 0:
        if finished:
            return result(Outcome.PASSED, "")
        return result(Outcome.FAILED, "exited with status 0 before the end of the program/tests")
    if code == _EXIT_BAD_PAYLOAD and "sandbox: bad payload" in stderr:
        return result(Outcome.SANDBOX_ERROR, "the launcher could not read its payload")
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if code == _EXIT_MEMORY and last.startswith("MemoryError"):
        return result(Outcome.CRASHED, f"out of memory (limit {limits.memory_bytes} bytes)")
    return result(Outcome.FAILED, last or f"exit status {code}")


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@contextlib.contextmanager
def _uid_slot() -> Iterator[int | None]:
    """As root: a sandbox uid, held (flock on a lock file) for the run so that concurrent runs, in
    this process or another, never share one. Otherwise None (the program keeps our uid)."""
    if os.geteuid() != 0 or not _DROP_PRIVILEGES:
        yield None
        return
    folder = Path(tempfile.gettempdir()) / "fedmoa-sandbox-uids"
    folder.mkdir(mode=0o700, exist_ok=True)
    start = secrets.randbelow(UID_SLOTS)
    for i in range(UID_SLOTS):
        slot = (start + i) % UID_SLOTS
        fd = os.open(folder / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield UID_BASE + slot
        finally:
            os.close(fd)
        return
    raise OSError(f"all {UID_SLOTS} sandbox uids are in use")


@contextlib.contextmanager
def _workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="fedmoa-code-")
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """Deletes ``path`` even if the program made files or folders read-only."""

    def retry(func: Any, name: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, 0o700)
            func(name)

    shutil.rmtree(path, onerror=retry)
    if os.path.lexists(path):
        logger.warning("code sandbox: could not delete %s", path)


def _kill_uid(uid: int) -> None:
    """Kills every process with real uid ``uid`` (the trainer's backstop; root only)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        pids = _uid_pids(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    logger.warning("code sandbox: processes of uid %d survive: %s", uid, _uid_pids(uid))


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/status") as f:
            lines = dict(line.split(":", 1) for line in f if ":" in line)
            state = lines.get("State", "Z").split()[0]
            if state not in ("Z", "X") and int(lines["Uid"].split()[0]) == uid:
                pids.append(int(entry))
    return pids
