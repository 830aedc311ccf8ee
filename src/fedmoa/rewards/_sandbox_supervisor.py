"""Supervisor of one sandboxed run (see ``fedmoa.rewards.sandbox``); standard library only.

The trainer runs this file with the base interpreter as ``python -I -S`` (outside the virtual
environment) in a new session, writes one request (a dict, ``marshal``-ed) to its stdin and reads
one report (the same) from its stdout. The supervisor

1. becomes a child subreaper, so that every orphan the program leaves behind is reparented to it;
2. enters new network and IPC namespaces, and (as root) a mount namespace in which ``/tmp`` and the
   other world-writable directories are fresh size-limited tmpfs and the project directory, the
   home directory and the virtual environment are hidden under empty read-only tmpfs (the Python
   installation is bound back read-only);
3. forks the program: new session, resource limits, an unprivileged per-run uid when root, no new
   privileges, an empty environment, then ``exec`` of the launcher below;
4. relays the program's stdout and stderr with a cap, enforces the wall-clock limit, then kills
   every process left with the run's uid (``kill(-1)`` from a helper with that uid, atomic with
   respect to fork) or, without a uid of its own, every descendant.

Without a network namespace the launcher blocks sockets (and process spawning, which would shed
the hook) with an audit hook instead; the report says which mechanism ran.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import selectors
import signal
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# statvfs flags that a bind remount must keep (they may be locked), mapped to mount flags
_KEEP_FLAGS = {
    1: MS_RDONLY,
    2: MS_NOSUID,
    4: MS_NODEV,
    8: MS_NOEXEC,
    1024: 1024,
    2048: 2048,
    4096: 1 << 21,
}
_TAIL = 16384  # bytes of stdout and of stderr kept for the report
_EXIT_BAD_PAYLOAD = 120

# The program's interpreter runs this (``python -I -S -c``) as the sandbox uid: read the payload
# from stdin, install an audit hook (which later code cannot remove) refusing sys.settrace and
# sys.setprofile (a trace function can jump over asserts) and, without a network namespace, sockets,
# ctypes and starting other programs; then run the solution and the tests. The tests get the
# builtins as they were before the solution ran and none of the solution's globals that shadow a
# builtin (except the exported names). After the tests finish, the nonce is written to the real fd 1
# with a reference to os.write taken before the solution ran, and the process ends with os._exit,
# so early exits, atexit handlers and patched print/sys.stdout/check/builtins cannot produce it.
LAUNCHER = r"""
def _launch():
    import builtins, marshal, os, sys
    read, write, exit_, compile_, exec_ = os.read, os.write, os._exit, compile, exec
    chunks = []
    while chunk := read(0, 1 << 20):
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        nonce, source, tests, exports, block = marshal.loads(b"".join(chunks))
    except Exception:
        write(2, b"sandbox: bad payload\n")
        exit_(120)
    del chunks
    tracing = frozenset(("sys.settrace", "sys.setprofile"))
    spawning = frozenset(("os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.forkpty",
                          "subprocess.Popen", "pty.spawn"))
    modules = frozenset(("_ctypes", "_posixsubprocess"))

    def hook(event, args, block=block):
        if event in tracing:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if block and (event.startswith(("socket.", "ctypes.")) or event in spawning
                      or (event == "import" and args[0] in modules)):
            what = f"import of {args[0]}" if event == "import" else event
            raise PermissionError(f"sandbox: {what} is blocked (no network namespace)")

    sys.addaudithook(hook)
    del hook
    clean = dict(builtins.__dict__)
    scope = {"__name__": "__main__", "__builtins__": builtins}

    def fail(exc, code):  # (traceback is imported only now: it takes 50 ms)
        try:
            import traceback
            write(2, "".join(traceback.format_exception(exc)).encode(errors="replace"))
        except BaseException:
            try:
                write(2, f"{type(exc).__name__}: {exc}\n".encode(errors="replace"))
            except BaseException:
                pass
        exit_(code)

    try:
        program = compile_(source, "<solution>", "exec")
        checks = None if tests is None else compile_(tests, "<tests>", "exec")
        exec_(program, scope)
        if checks is not None:
            names = {k: v for k, v in scope.items() if k not in clean or k in exports}
            names.update(__name__="__main__", __builtins__=clean)
            exec_(checks, names)
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            exit_((code or 0) & 0xFF)
        fail(exc, 1)
    except MemoryError as exc:
        fail(exc, 3)
    except BaseException as exc:
        fail(exc, 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(1, b"\n" + nonce + b"\n")
    exit_(0)


_launch()
"""

_libc = ctypes.CDLL(None, use_errno=True)


class _suppress:  # contextlib.suppress, without contextlib's import time
    def __init__(self, *kinds: type[BaseException]) -> None:
        self.kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


def _call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _call("unshare", ctypes.c_int(flags))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _prctl(option: int, arg: int) -> None:
    zero = ctypes.c_ulong(0)
    _call("prctl", ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _private_mounts(req: dict[str, Any]) -> None:
    """Fresh tmpfs on the world-writable directories, the hidden paths under empty read-only
    tmpfs, the kept paths (the Python installation) bound back read-only."""
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    hide = [p for p in req["hide"] if os.path.isdir(p)]
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in req["keep"] if os.path.isdir(p)}
    size = req["tmp_bytes"]
    for path in req["tmp_dirs"]:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount(
                "tmpfs",
                path,
                "tmpfs",
                MS_NOSUID | MS_NODEV,
                f"size={size},nr_inodes=4096,mode=1777",
            )
    os.makedirs(req["workdir"], mode=0o700, exist_ok=True)
    for path in hide:
        _mount(
            "tmpfs",
            path,
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=1m,nr_inodes=256,mode=755",
        )
    for path, fd in keep.items():
        if any(_under(path, h) for h in hide):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            locked = os.fstatvfs(fd).f_flag
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            flags |= sum(flag for bit, flag in _KEEP_FLAGS.items() if locked & bit)
            _mount(None, path, None, flags, None)
        os.close(fd)
    for path in hide:
        _mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def _user_namespace() -> None:
    """A user namespace (needed for the other namespaces without root) mapping only our own ids."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC)
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (real uid, parent pid, threads) of every live (not zombie) process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("State", "Z").split()[0] in ("Z", "X"):
            continue
        table[int(entry)] = (
            int(fields["Uid"].split()[0]),
            int(fields["PPid"].split()[0]),
            int(fields.get("Threads", "1")),
        )
    return table


def _descendants(table: dict[int, tuple[int, int, int]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class _Run:
    """One program run: the forked process, its output and its exit status."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.uid: int | None = req["uid"]
        self.pid = 0
        self.status: int | None = None
        self.cpu = 0.0
        self.out = bytearray()
        self.err = bytearray()
        self.total = 0

    def reap(self) -> None:
        """Collects every exited child (orphans are reparented to this subreaper)."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                self.status, self.cpu = status, usage.ru_utime + usage.ru_stime

    def leftovers(self) -> list[int]:
        table = _proc_table()
        if self.uid is not None:
            return [pid for pid, (uid, _, _) in table.items() if uid == self.uid]
        return _descendants(table, os.getpid())

    def kill_all(self) -> int:
        """Kills every process of the run; returns how many are left (0 unless something is
        stuck in the kernel)."""
        deadline = time.monotonic() + 3.0
        while True:
            if not self.leftovers():
                self.reap()
                return 0
            if self.uid is not None:
                helper = os.fork()
                if helper == 0:  # kill(-1) as the run's uid: every process of that uid, atomically
                    try:
                        os.setresuid(self.uid, self.uid, self.uid)
                        os.kill(-1, signal.SIGKILL)
                    finally:
                        os._exit(0)
                with _suppress(ChildProcessError):
                    os.waitpid(helper, 0)
            else:
                for pid in self.leftovers():
                    with _suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
            self.reap()
            left = self.leftovers()
            if not left or time.monotonic() > deadline:
                return len(left)

    def child(self, payload_r: int, out_w: int, err_w: int, errpipe_w: int) -> None:
        """In the forked process: session, fds, limits, uid, then exec of the launcher."""
        req, limits = self.req, self.req["limits"]
        try:
            os.setsid()
            for fd, target in ((payload_r, 0), (out_w, 1), (err_w, 2)):
                os.dup2(fd, target)
            os.closerange(3, errpipe_w)
            os.closerange(errpipe_w + 1, 1 << 20)
            os.chdir(req["workdir"])
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            nproc = limits["processes"]
            if self.uid is None:  # the limit counts every task of the uid: add the current ones
                me = os.getuid()
                nproc += sum(n for uid, _, n in _proc_table().values() if uid == me)
            cpu = limits["cpu_seconds"]
            for res, soft, hard in (
                (resource.RLIMIT_CPU, cpu, cpu + 1),
                (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
                (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
                (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
                (resource.RLIMIT_NPROC, nproc, nproc),
                (resource.RLIMIT_CORE, 0, 0),
            ):
                current = resource.getrlimit(res)[1]
                if current != resource.RLIM_INFINITY:
                    soft, hard = min(soft, current), min(hard, current)
                resource.setrlimit(res, (soft, hard))
            if self.uid is not None:
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            python = req["python"]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
            os.execve(python, [python, "-I", "-S", "-c", LAUNCHER], env)
        except BaseException as exc:
            with _suppress(BaseException):
                os.write(errpipe_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        os._exit(127)

    def start(self, payload: bytes) -> tuple[int, int, int, bytes]:
        payload_r, payload_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        errpipe_r, errpipe_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            self.child(payload_r, out_w, err_w, errpipe_w)
        for fd in (payload_r, out_w, err_w, errpipe_w):
            os.close(fd)
        failure = b""
        while chunk := os.read(errpipe_r, 4096):  # EOF once the exec succeeded (close-on-exec)
            failure += chunk
        os.close(errpipe_r)
        return payload_w, out_r, err_r, failure

    def relay(self, payload_w: int, out_r: int, err_r: int, payload: bytes) -> tuple[bool, bool]:
        """Feeds the payload and collects output until the program exits, the wall clock runs out
        or the output passes its cap. Returns (timed_out, output_exceeded)."""
        limits = self.req["limits"]
        deadline = time.monotonic() + limits["wall_seconds"]
        sel = selectors.DefaultSelector()
        os.set_blocking(payload_w, False)
        sel.register(payload_w, selectors.EVENT_WRITE)
        sel.register(out_r, selectors.EVENT_READ, self.out)
        sel.register(err_r, selectors.EVENT_READ, self.err)
        try:
            pidfd: int | None = os.pidfd_open(self.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None
        sent = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True, False
                for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.05)):
                    if key.fd == payload_w:
                        try:
                            sent += os.write(payload_w, payload[sent : sent + 65536])
                        except BlockingIOError:
                            continue
                        except OSError:
                            sent = len(payload)
                        if sent >= len(payload):
                            sel.unregister(payload_w)
                            os.close(payload_w)
                    elif key.fd == pidfd:
                        return False, False
                    elif self._read(key.fd, key.data, sel):
                        return False, True
                if pidfd is None:  # no pidfd_open: poll
                    pid, status, usage = os.wait4(self.pid, os.WNOHANG)
                    if pid:
                        self.status, self.cpu = status, usage.ru_utime + usage.ru_stime
                        return False, False
        finally:
            with _suppress(KeyError, OSError):
                sel.unregister(payload_w)
                os.close(payload_w)
            if pidfd is not None:
                sel.unregister(pidfd)
                os.close(pidfd)
            sel.close()

    def _read(self, fd: int, tail: bytearray, sel: selectors.BaseSelector | None) -> bool:
        """Reads one chunk into ``tail``; True when the output cap is passed."""
        chunk = os.read(fd, 65536)
        if not chunk:
            if sel is not None:
                sel.unregister(fd)
            return False
        self.total += len(chunk)
        tail += chunk
        del tail[:-_TAIL]
        return self.total > self.req["limits"]["output_bytes"]

    def drain(self, fds: list[int]) -> None:
        """After every writer is dead: the rest of the output, up to the cap, without blocking."""
        for fd, tail in zip(fds, (self.out, self.err), strict=True):
            os.set_blocking(fd, False)
            with _suppress(OSError):
                while self.total <= self.req["limits"]["output_bytes"] and (
                    chunk := os.read(fd, 65536)
                ):
                    self.total += len(chunk)
                    tail += chunk
                    del tail[:-_TAIL]
            os.close(fd)


def supervise(req: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "network": "socket-blocked",
        "filesystem": "shared",
        "uid": req["uid"],
    }
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    privileged = req["uid"] is not None
    if req["netns"]:
        try:
            if privileged:
                _unshare(CLONE_NEWNET | CLONE_NEWIPC)
            else:
                _user_namespace()
            report["network"] = "netns"
        except OSError as exc:
            report["netns_error"] = str(exc)
    if privileged and req["mounts"]:
        try:
            _private_mounts(req)
            report["filesystem"] = "private"
        except OSError as exc:
            report["mount_error"] = str(exc)
    if privileged:
        os.chown(req["workdir"], req["uid"], req["uid"])
        os.chmod(req["workdir"], 0o700)
    run = _Run(req)
    if privileged:
        run.kill_all()  # anything a crashed earlier trainer left running with this uid
    program = req["program"]
    payload = marshal.dumps(
        (
            req["nonce"].encode(),
            program["source"],
            program["tests"],
            frozenset(program["exports"]),
            report["network"] != "netns",
        )
    )
    started = time.monotonic()
    payload_w, out_r, err_r, failure = run.start(payload)
    if failure:
        os.close(payload_w)
        run.kill_all()
        run.drain([out_r, err_r])
        run.reap()
        report["error"] = f"could not start the program: {failure.decode(errors='replace')}"
        if privileged and report["filesystem"] != "private":
            report["error"] += (
                " (without private mounts the sandbox uid needs read and execute access to the"
                " interpreter and its standard library)"
            )
        return report
    timed_out, exceeded = run.relay(payload_w, out_r, err_r, payload)
    if not timed_out and not exceeded and run.status is None:  # the main process ended
        with _suppress(ChildProcessError):
            _, run.status, usage = os.wait4(run.pid, 0)
            run.cpu = usage.ru_utime + usage.ru_stime
    left = run.kill_all()  # background processes, escaped sessions, a fork bomb
    run.drain([out_r, err_r])
    if run.status is None:
        with _suppress(ChildProcessError):
            _, run.status, usage = os.wait4(run.pid, 0)
            run.cpu = usage.ru_utime + usage.ru_stime
    run.reap()
    status = run.status
    report.update(
        returncode=os.waitstatus_to_exitcode(status) if status is not None else None,
        timed_out=timed_out,
        output_exceeded=exceeded,
        cpu_seconds=round(run.cpu, 3),
        program_seconds=round(time.monotonic() - started, 3),
        leftover=left,
        stdout=run.out.decode(errors="replace"),
        stderr=run.err.decode(errors="replace"),
    )
    return report


def main() -> None:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        report = supervise(marshal.loads(sys.stdin.buffer.read()))
    except BaseException as exc:
        report = {"error": f"supervisor failed: {type(exc).__name__}: {exc}"}
    out.write(marshal.dumps(report))
    out.flush()


if __name__ == "__main__":
    main()
