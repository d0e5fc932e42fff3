"""Run untrusted MBPP candidates (code + test_setup_code + asserts) in a child process that cannot hurt the run.

A program passes only when every assert ran: after the last assert the harness writes a random nonce (which
it received on stdin before the candidate ran) to a private pipe, and we require it. ``sys.exit``/``os._exit``
before the end, a crash, a signal, a timeout, or a process left running after the last assert are failures.

Isolation, strongest first (``sandbox_mode()`` says which one this machine gets; ``REFLECTEVO_SANDBOX=plain``
forces the fallback):

``"ns"`` (``unshare`` from util-linux works: as root, or through an unprivileged user namespace)
    ``unshare --pid --fork --kill-child --mount --mount-proc --net --ipc --uts``: the harness is PID 1 of a
    new PID namespace, so when it ends (or we SIGKILL ``unshare`` on timeout) the kernel kills every
    process of the run, including double-forked ``setsid`` daemons. No network (empty net namespace,
    loopback down). /tmp, /var/tmp and /run/lock are replaced by private, empty, read-only tmpfs mounts, /dev/shm
    by a private, empty, writable one (size-limited; multiprocessing needs it); the code runs in a fresh
    size-limited tmpfs work directory (also ``TMPDIR``) that vanishes with the namespace. As root the code runs
    under an unprivileged uid/gid (a per-run id, so parallel runs cannot signal or touch each other; ``nobody``
    if that id cannot be used): it cannot write or delete files outside its directory, nor signal the harness.
    (Through a user namespace, i.e. when we are not root, the id cannot change and the code can write wherever
    our own user can, outside the private mounts; it runs without capabilities, so it cannot unmount them.)
``"plain"`` (fallback when namespaces are unavailable, e.g. a container without CAP_SYS_ADMIN)
    The child runs in its own session in a fresh temporary directory (deleted afterwards). As root it still
    drops to the unprivileged uid, so files outside the directory stay safe except in world-writable places:
    what that uid left at the top of /tmp, /var/tmp, /dev/shm or /run/lock is removed, what it put deeper (in
    another world-writable directory) survives. The harness is a child subreaper: orphans of the run (``setsid``
    daemons) stay its descendants, and it kills them before it exits. On exit or timeout we sweep /proc for its
    descendants, for any process carrying this run's unique environment marker (``REFLECTEVO_SANDBOX_MARK``) and,
    as root, for every process of the run's uid (killed at once); then we SIGKILL the process group.
    There is NO network isolation in this mode, and when not root the code runs as our own user: it could
    delete our files or signal our processes. It protects against accidents of model-written code (loops,
    memory/fork/output bombs, stray processes, early exits), not against deliberately hostile code.
    Without /proc (macOS) there is no sweep: only the process group is killed (a ``setsid`` daemon escapes and
    does not fail the program), and our user's processes are counted with ``ps``.

Both modes: the candidate runs in a child of the harness, and only the harness, after that child exited
cleanly with its end-of-asserts token, writes the nonce. This catches accidental early exits; it does not stop a
program written to fool the verdict (it can find the token in its own process, as it can define an ``__eq__``
that is always True): the verdict guards against model mistakes, not against reward hacking. The interpreter runs
with ``-I -S`` (standard library only, no site-packages; in "plain" mode as root, when the unprivileged uid
cannot read our interpreter's standard library, e.g. a pyenv under /root, a system ``python3`` it can read is
used). Hard wall-clock timeout for the whole run (default 5 s); rlimits on address space (``memory_mb``), CPU
seconds, file size (so a stdout flood is cut off), number of processes (enforced per uid, hence the per-run
uid; in "plain" mode without root, where the code keeps our uid, the limit is added to the threads our user
already runs), no core dumps; stdin is /dev/null; stdout/stderr are captured to files and truncated to
``max_output`` bytes. ``run_many`` verifies candidates in parallel with a thread pool launching one subprocess each.
"""
from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["SandboxResult", "run_program", "run_many", "sandbox_mode", "MARK_ENV"]

MARK_ENV = "REFLECTEVO_SANDBOX_MARK"
_HARNESS = str(Path(__file__).with_name("_sandbox_harness.py"))
_UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--ipc", "--uts"]
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" (an assert/exception/early exit) | "timeout" | "killed" (a signal)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@lru_cache(maxsize=1)
def _probe_namespaces() -> list[str] | None:
    """The unshare prefix that works here, or None."""
    if shutil.which("unshare") is None:
        return None
    candidates = [_UNSHARE] if os.geteuid() == 0 else []
    candidates.append(_UNSHARE[:1] + ["--user", "--map-root-user"] + _UNSHARE[1:])
    for prefix in candidates:
        try:
            r = subprocess.run(prefix + ["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return None


def _others_can_read(path: str) -> bool:
    """True when a user who is neither owner nor group member can reach and read ``path``."""
    path = os.path.realpath(path)
    parts = path.split("/")
    try:
        for i in range(2, len(parts)):
            if not os.stat("/".join(parts[:i])).st_mode & 0o001:
                return False
        mode = os.stat(path).st_mode
        need = 0o005 if os.path.isdir(path) else 0o004
        return mode & need == need
    except OSError:
        return False


@lru_cache(maxsize=1)
def _plain_interpreter() -> str:
    """The interpreter for "plain" mode: ours when an unprivileged uid can import its standard library,
    else a system Python that it can (without namespaces we cannot bind-mount ours into reach)."""
    if os.geteuid() != 0 or _others_can_read(os.path.dirname(os.__file__)):
        return sys.executable
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if not os.path.exists(exe) or not _others_can_read(exe):
            continue
        try:
            r = subprocess.run([exe, "-I", "-S", "-c", "import os, sys; print(os.path.dirname(os.__file__)); "
                                "print(sys.version_info >= (3, 9))"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = r.stdout.split()
        if r.returncode == 0 and len(lines) == 2 and lines[1] == "True" and _others_can_read(lines[0]):
            return exe
    return sys.executable


def sandbox_mode() -> str:
    """ "ns" when PID/mount/net namespaces are usable here, else "plain" (or as forced by REFLECTEVO_SANDBOX)."""
    forced = os.environ.get("REFLECTEVO_SANDBOX", "").strip().lower()
    if forced == "plain":
        return "plain"
    return "ns" if _probe_namespaces() is not None else "plain"


def _run_uid() -> tuple[int, int]:
    """A per-run unprivileged uid/gid (the harness falls back to nobody when it cannot switch to it)."""
    with _uid_lock:
        n = next(_uid_counter)
    uid = 1_900_000_000 + (os.getpid() % 100_000) * 1000 + n % 1000
    return uid, uid


def _tasks_of_our_user() -> int | None:
    """Threads of all processes whose real uid is ours (what RLIMIT_NPROC counts against the limit); without /proc
    (macOS, which counts processes) the processes ``ps`` lists; None when neither can be read."""
    uid, count = os.getuid(), 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            r = subprocess.run(["ps", "-A", "-o", "ruid="], stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        uids = r.stdout.split()
        return sum(u == str(uid) for u in uids) if r.returncode == 0 and uids else None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return count


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state letter: "Z" zombie, "T"/"t" stopped, ..., real uid) for every process we can see
    (none without /proc)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if b":" in line)
            table[int(entry)] = (int(fields[b"PPid"]), fields[b"State"].split()[0].decode(),
                                 int(fields[b"Uid"].split()[0]))
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read()
    except OSError:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _kill_uid(uid: int, gid: int) -> None:
    """SIGKILL every process of ``uid`` at once: kill(-1) sent by a process of that uid, which the kernel makes atomic
    against fork (a sweep signals one process after another, and a fork bomb can outrun it)."""
    kill = shutil.which("kill")
    cmd = [kill, "-9", "-1"] if kill else [_plain_interpreter(), "-I", "-S", "-c", "import os; os.kill(-1, 9)"]
    try:
        subprocess.run(cmd, user=uid, group=gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


def _sweep(root_pid: int, marker: str, ids: tuple[int, int] | None = None, rounds: int = 60) -> None:
    """SIGKILL every live descendant of ``root_pid``, every process carrying ``marker`` in its environment and every
    process whose real uid is ``ids[0]`` (the run's own uid and gid, when it has them: those go at once, see _kill_uid).
    The others are stopped first (a stopped process cannot fork: a fork bomb of setsid processes outran one SIGKILL
    per round), and ``root_pid`` goes last: while it lives (in "plain" mode a subreaper) the orphans of the run, even
    those that cleared their environment, stay its descendants."""
    needle = f"{MARK_ENV}={marker}".encode()
    me, uid = os.getpid(), ids[0] if ids else None
    for attempt in range(rounds):
        table = _proc_table()
        if attempt == 1 and ids and any(ruid == uid and state not in "ZX" for _p, state, ruid in table.values()):
            _kill_uid(*ids)
            table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _s, _u) in table.items():
            children.setdefault(ppid, []).append(pid)
        victims, stack = set(), [root_pid]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in victims:
                    victims.add(child)
                    stack.append(child)
        victims |= {pid for pid, (_p, state, ruid) in table.items()
                    if state != "Z" and (ruid == uid or _has_marker(pid, needle))}
        victims = {p for p in victims if p not in (me, root_pid) and table.get(p, (0, "Z", 0))[1] not in "ZX"}
        running = {p for p in victims if table[p][1] not in "Tt"}
        if running and attempt < rounds - 1:
            victims, sig = running, signal.SIGSTOP
        elif victims:
            sig = signal.SIGKILL
        elif root_pid in table and table[root_pid][1] not in "ZX":
            victims, sig = {root_pid}, signal.SIGKILL
        else:
            return
        for pid in victims:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.005)


def _read_head(fd: int, limit: int) -> str:
    """The first ``limit`` bytes of the file open at ``fd`` (not reopened by path: without root, in "plain" mode, the
    program runs under our uid and could have put a FIFO, which would block us forever, in its place)."""
    try:
        data = os.pread(fd, limit + 1, 0)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n...[truncated]" if len(data) > limit else "")


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until ``proc`` exits (True) or ``deadline`` passes (False), leaving it unreaped (a zombie).

    Without os.waitid (macOS before Python 3.13) it is reaped; its id stays reserved while its group lives."""
    pid, pause = proc.pid, 0.001
    if not hasattr(os, "waitid"):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.02)


def _remove_tree(path: str) -> None:
    """Delete a work tree even when the program left unreadable or unwritable directories in it."""
    def make_writable_and_retry(func, failed, _exc):
        try:
            os.chmod(os.path.dirname(failed) or failed, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)
        except OSError:
            pass

    try:
        for root, dirs, _files in os.walk(path):
            for d in dirs:
                try:
                    full = os.path.join(root, d)
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
                except OSError:
                    pass
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
    except RecursionError:  # a tree deeper than the recursion limit: os.walk / rmtree recurse (before 3.12 / 3.13)
        pass
    if os.path.lexists(path):  # the system's tools walk any depth (chmod -R skips the symbolic links it meets)
        for cmd in (["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
            try:
                subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError:
                pass


def _remove_owned_by(uid: int) -> None:
    """"plain" mode as root: remove what the run's own uid left at the top of the world-writable directories."""
    for top in sorted({"/tmp", "/var/tmp", "/dev/shm", "/run/lock", tempfile.gettempdir()}):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def run_program(code: str, test_list: list[str] | tuple[str, ...] = (), test_setup_code: str = "",
                timeout: float = 5.0, memory_mb: int = 1024, max_output: int = 8192,
                max_file_mb: int = 16, max_procs: int = 64) -> SandboxResult:
    """Run ``code``, then ``test_setup_code``, then every assert of ``test_list`` in the sandbox.

    ``passed`` is True only when all asserts ran (nonce check) within ``timeout`` wall-clock seconds.
    """
    mode = sandbox_mode()
    tests = list(test_list)
    marker, nonce = secrets.token_hex(16), secrets.token_hex(16)
    uid, gid = _run_uid()
    if mode == "ns" and "--user" in _probe_namespaces():
        uid = gid = 0  # only our own id is mapped inside an unprivileged user namespace: no switch possible
    host_dir = tempfile.mkdtemp(prefix="reflectevo-sbx-")
    done_r = done_w = out_fd = err_fd = -1
    try:  # whatever fails (fork, Ctrl-C), the directory, the pipe and the output files go
        os.chmod(host_dir, 0o711)  # the unprivileged uid may pass through to its work dir, not list or read here
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        if os.geteuid() == 0:
            os.chown(workdir, uid, gid)
        done_r, done_w = os.pipe()
        limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout) + 1, "RLIMIT_FSIZE": max_file_mb << 20,
                  "RLIMIT_NPROC": max_procs, "RLIMIT_CORE": 0}
        if mode == "plain" and os.geteuid() != 0:
            ours = _tasks_of_our_user()  # the program keeps our uid: our own threads count against its limit
            if ours is None:
                del limits["RLIMIT_NPROC"]  # unknown base: any limit could stop every fork
            else:
                limits["RLIMIT_NPROC"] += ours
        payload = {"code": code or "", "setup": test_setup_code or "", "tests": tests, "done_fd": done_w,
                   "workdir": workdir, "limits": limits}
        payload_path = os.path.join(host_dir, "payload.json")
        with open(os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            json.dump(payload, f)
        out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", MARK_ENV: marker}
        python = sys.executable if mode == "ns" else _plain_interpreter()
        cmd = [python, "-I", "-S", _HARNESS, payload_path, mode, str(uid), str(gid)]
        if mode == "ns":
            cmd = _probe_namespaces() + cmd
        start = time.monotonic()
        proc = None
        status, returncode = "failed", None
        try:
            out_fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            err_fd = os.open(err_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out_fd, stderr=err_fd, env=env, cwd=host_dir,
                                    pass_fds=(done_w,), start_new_session=True)
            os.close(done_w)
            done_w = -1
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass
            if not _wait_unreaped(proc, start + timeout):
                status = "timeout"
        finally:
            if proc is not None:
                # the child is not reaped yet (see _wait_unreaped), so its pid (= process group id) cannot have
                # been reused. In "ns" mode that group holds the namespace's PID 1, with which the kernel kills the
                # whole run: first. In "plain" mode the harness (a subreaper) goes last, after the sweep.
                if mode == "ns":
                    _kill_group(proc.pid)
                _sweep(proc.pid, marker, (uid, gid) if os.geteuid() == 0 and uid != 0 else None)
                _kill_group(proc.pid)
                if mode == "plain" and os.geteuid() == 0:
                    _remove_owned_by(uid)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                if status != "timeout":
                    returncode = proc.returncode
        if done_w >= 0:
            os.close(done_w)
            done_w = -1
        os.set_blocking(done_r, False)
        try:
            done = os.read(done_r, 256).decode(errors="replace").strip()
        except OSError:
            done = ""
        seconds = time.monotonic() - start
        stdout, stderr = _read_head(out_fd, max_output), _read_head(err_fd, max_output)
    finally:
        for fd in (done_r, done_w, out_fd, err_fd):
            if fd >= 0:
                os.close(fd)
        _remove_tree(host_dir)
    passed = status != "timeout" and returncode == 0 and done == nonce
    if passed:
        status = "passed"
    elif status != "timeout" and returncode is not None and returncode < 0:
        status = "killed"
    return SandboxResult(passed, status, returncode, stdout, stderr, seconds)


def _as_kwargs(program) -> dict:
    if isinstance(program, str):
        return {"code": program}
    if isinstance(program, dict):
        keys = ("code", "test_list", "test_setup_code")
        return {k: program[k] for k in keys if k in program}
    code, tests, *rest = program
    return {"code": code, "test_list": tests, "test_setup_code": rest[0] if rest else ""}


def run_many(programs, workers: int | None = None, **kwargs) -> list[SandboxResult]:
    """Run many candidates in parallel (a thread pool launching one sandboxed subprocess each; by default one
    worker per usable CPU core, at most 8).

    ``programs``: items that are dicts with ``code``, ``test_list`` [, ``test_setup_code``], or tuples
    ``(code, test_list[, test_setup_code])``, or bare code strings. ``kwargs`` go to :func:`run_program`.
    Results come back in input order.
    """
    programs = list(programs)
    if not programs:
        return []
    # one program per usable core: the timeout is wall-clock, so programs sharing a core could time out
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(8, cores)
    sandbox_mode()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(**_as_kwargs(p), **kwargs), programs))
