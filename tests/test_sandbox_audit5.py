"""Sandbox audit 5: processes that clear their environment, trees too deep to delete recursively, candidates that
keep capabilities inside a user namespace, output files swapped for FIFOs, files left in world-writable places."""
import os
import secrets
import shutil
import sys
import tempfile
import time

import pytest

from reflectevo.data.sandbox import run_program
from test_sandbox import _as_nobody, live_processes_with, mode  # noqa: F401 (fixture)

TIMEOUT = 2.0
SLACK = 1.5
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def sandbox_dirs():
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("reflectevo-sbx-")}


def processes_with(needle: bytes):
    """Live processes whose command line contains ``needle``."""
    return live_processes_with(needle, "cmdline")


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _daemons(duration: str) -> dict[str, str]:
    """Programs that pass every assert but leave a process running that carries no trace of the sandbox's environment
    marker (its environment is empty) and is no descendant of the sandbox (a new session, orphaned)."""
    return {
        "popen": GOOD + f"import subprocess\nsubprocess.Popen(['sleep', '{duration}'], env={{}}, "
                        "start_new_session=True)\n",
        "double_fork": GOOD + "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                              f"        os.execve('/bin/sleep', ['sleep', '{duration}'], {{}})\n    os._exit(0)\n"
                              "time.sleep(0.3)\n",
    }


def test_daemon_without_environment_fails_and_dies(mode):
    """A setsid daemon that cleared its environment escaped the marker check: the program passed although a process
    was left running, and in "plain" mode that process survived the call (ns mode: killed with the namespace)."""
    duration = f"30.{secrets.randbelow(10**6):06d}1"
    try:
        for name, code in _daemons(duration).items():
            r = run_program(code, TESTS, timeout=TIMEOUT)
            assert not r.passed, (name, r)
            assert r.seconds <= TIMEOUT + SLACK
            time.sleep(0.1)
            assert processes_with(duration.encode()) == [], name
    finally:
        kill_all(processes_with(duration.encode()))


def test_daemon_without_environment_after_timeout(mode):
    """The same daemon, from a program that then runs past its timeout: the sweep must still find it."""
    duration = f"30.{secrets.randbelow(10**6):06d}2"
    code = _daemons(duration)["double_fork"] + "while True:\n    pass\n"
    try:
        r = run_program(code, TESTS, timeout=TIMEOUT)
        assert r.status == "timeout" and r.seconds <= TIMEOUT + SLACK
        time.sleep(0.1)
        assert processes_with(duration.encode()) == []
    finally:
        kill_all(processes_with(duration.encode()))


def test_fork_bomb_without_environment(mode):
    """A fork bomb of setsid processes without environment (each also wakes up any stopped one), left behind by a
    program that passed its asserts, or by one that then runs past its timeout: the marker cannot find it, and
    killing one process after another, round after round, could not keep up with it. Nothing may survive the call."""
    if mode == "plain" and os.geteuid() != 0:
        pytest.skip("without root the bomb would run (and signal) as our own user")
    # "ns": the candidate's sys.executable may be a venv link under the /tmp the sandbox hides; the interpreter
    # it points to is reachable. "plain" runs the candidate under an interpreter its uid can execute: its own.
    real = os.path.realpath(sys.executable)
    if mode == "ns" and real.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
        pytest.skip(f"the interpreter {real} lies under a directory the sandbox hides")
    exe = repr(real) if mode == "ns" else "sys.executable"
    token = f"bomb-{secrets.token_hex(6)}"
    loop = ("import os, signal\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass\n    try:\n        os.kill(-1, signal.SIGCONT)\n    except OSError:\n"
            "        pass\n")
    start = (GOOD + "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
             f"    os.execve({exe}, [{exe}, '-I', '-S', '-c', {loop!r}, {token!r}], {{}})\n")
    try:
        for tail in ("import time\ntime.sleep(0.3)\n", "while True:\n    pass\n"):
            r = run_program(start + tail, TESTS, timeout=TIMEOUT, max_procs=16)
            assert not r.passed
            assert r.seconds <= TIMEOUT + 2 * SLACK  # a bomb on few cores slows the sweep down too
            time.sleep(0.1)
            assert processes_with(token.encode()) == [], tail
    finally:
        for _ in range(50):
            kill_all(processes_with(token.encode()))


def test_directory_tree_deeper_than_the_recursion_limit(monkeypatch):
    """A work dir nested deeper than Python's recursion limit made the cleanup (os.walk / shutil.rmtree, recursive
    before Python 3.12/3.13) raise RecursionError out of run_program, leaking the directory ("plain" mode)."""
    monkeypatch.setenv("REFLECTEVO_SANDBOX", "plain")
    before = sandbox_dirs()
    code = GOOD + "import os\nfor _ in range(sys.getrecursionlimit() + 200):\n    os.mkdir('d')\n    os.chdir('d')\n"
    r = run_program("import sys\n" + code, TESTS, timeout=TIMEOUT)
    assert r.passed, r.stderr
    assert sandbox_dirs() <= before


def test_plain_mode_removes_what_the_run_uid_left_in_world_writable_dirs(monkeypatch):
    """As root, "plain" mode runs the program under a uid of its own: files and directories it left in /tmp,
    /var/tmp or /dev/shm are found by that uid and removed."""
    if os.geteuid() != 0:
        pytest.skip("the program keeps our uid when we are not root")
    monkeypatch.setenv("REFLECTEVO_SANDBOX", "plain")
    tag = secrets.token_hex(6)
    paths = [f"{d}/reflectevo-audit5-{tag}" for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    code = GOOD + "import os\n" + "".join(
        f"os.makedirs({p + '/sub'!r})\nopen({p + '/sub/f'!r}, 'w').write('x')\nopen({p + '.txt'!r}, 'w').write('x')\n"
        for p in paths)
    try:
        r = run_program(code, TESTS, timeout=TIMEOUT)
        assert r.passed, r.stderr
        assert [p for p in paths if os.path.lexists(p) or os.path.lexists(p + ".txt")] == []
    finally:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
            if os.path.lexists(p + ".txt"):
                os.unlink(p + ".txt")


def test_user_namespace_candidate_has_no_capabilities():
    """Through an unprivileged user namespace the program stayed uid 0 there with every capability: it could unmount
    the private /tmp (and /proc) and reach the caller's /tmp and processes underneath."""
    script = (
        "from reflectevo.data.sandbox import run_program, sandbox_mode\n"
        "code = ('import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n'\n"
        "        'def unmounted(path):\\n    return libc.umount2(path.encode(), 2) == 0\\n'\n"
        "        'def capabilities():\\n'\n"
        "        '    return int(open(\"/proc/self/status\").read().split(\"CapEff:\")[1].split()[0], 16)\\n')\n"
        "tests = ['assert capabilities() == 0', 'assert not unmounted(\"/tmp\")', 'assert not unmounted(\"/proc\")']\n"
        "r = run_program(code, tests, timeout=3)\n"
        "print(sandbox_mode(), r.passed, repr(r.stderr[-300:]))\n")
    out = _as_nobody(script, "", timeout=40)
    mode, passed = out.split()[:2]
    if mode != "ns":
        pytest.skip("no user namespaces for an unprivileged user here")
    assert passed == "True", out


def test_unprivileged_plain_mode_output_fifo_and_daemon():
    """Without root, "plain" mode runs the program under our own uid, so it can touch the run's directory: an output
    file replaced by a FIFO made the caller block forever reading it. A daemon without environment survived the
    call (no marker, no ancestry) and the program passed."""
    duration = f"30.{secrets.randbelow(10**6):06d}3"
    fifo = GOOD + "import os\nos.unlink('../stdout')\nos.mkfifo('../stdout')\nos.unlink('../stderr')\n" \
                  "os.mkfifo('../stderr')\n"
    daemon = _daemons(duration)["double_fork"]
    script = (
        "import time\nfrom reflectevo.data.sandbox import run_program\n"
        f"tests = {TESTS!r}\n"
        "for code in (" + repr(fifo) + ", " + repr(daemon) + "):\n"
        f"    start = time.monotonic()\n    r = run_program(code, tests, timeout={TIMEOUT})\n"
        "    print(r.passed, round(time.monotonic() - start, 2))\n")
    try:
        out = _as_nobody(script, "plain", timeout=20)
        assert out is not None, "the caller hung"
        (fifo_passed, fifo_seconds), (daemon_passed, _) = [line.split() for line in out.splitlines()]
        assert float(fifo_seconds) <= TIMEOUT + SLACK
        assert daemon_passed == "False"
        time.sleep(0.1)
        assert processes_with(duration.encode()) == []
    finally:
        kill_all(processes_with(duration.encode()))
