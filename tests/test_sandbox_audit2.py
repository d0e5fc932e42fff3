"""Sandbox audit: cleanup on error paths, and systems without /proc, os.waitid or os.sched_getaffinity (macOS)."""
import errno
import importlib.util
import os
import tempfile
import time

import pytest

from reflectevo.data import sandbox
from reflectevo.data.sandbox import run_many, run_program
from test_sandbox import leftover_processes as marked_processes

GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def sandbox_dirs():
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("reflectevo-sbx-")}


def open_fds():
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


@pytest.fixture(autouse=True)
def probed():
    """The probes are cached: run them before any test patches subprocess or os."""
    sandbox.sandbox_mode()
    sandbox._plain_interpreter()


def hide_proc(monkeypatch, module=os):
    """Make ``module.listdir`` behave as on a system without /proc (macOS)."""
    real = os.listdir

    def listdir(path="."):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real(path)

    monkeypatch.setattr(module, "listdir", listdir)


def test_failed_launch_leaks_no_dir_nor_descriptor(monkeypatch):
    """An exception between creating the work dir and the end of the run (fork failing with EAGAIN, a bad test
    list, Ctrl-C while waiting) left the reflectevo-sbx-* directory and the report pipe behind."""
    before_dirs, before_fds = sandbox_dirs(), open_fds()

    real = sandbox.subprocess.Popen

    def no_fork(cmd, *args, **kwargs):
        if sandbox._HARNESS in cmd:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(cmd, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sandbox.subprocess, "Popen", no_fork)
        with pytest.raises(BlockingIOError):
            run_program(GOOD, TESTS, timeout=2.0)
    with pytest.raises(TypeError):
        run_program(GOOD, None, timeout=2.0)
    assert sandbox_dirs() <= before_dirs
    assert open_fds() == before_fds


def test_interrupted_wait_cleans_up(monkeypatch):
    """Ctrl-C during the wait: the program is killed and its directory removed."""
    before_dirs = sandbox_dirs()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "_wait_unreaped", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_program("import time\ntime.sleep(30)\n", [], timeout=2.0)
    time.sleep(0.1)
    assert marked_processes() == []
    assert sandbox_dirs() <= before_dirs


def test_without_proc_waitid_and_affinity(monkeypatch):
    """macOS has no /proc, no os.sched_getaffinity and (before Python 3.13) no os.waitid: run_program and run_many
    raised FileNotFoundError/AttributeError there. Correct, wrong and looping programs must still be told apart, and
    a loop must still be killed with its process group."""
    monkeypatch.setenv("REFLECTEVO_SANDBOX", "plain")
    monkeypatch.delattr(os, "waitid", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    before = sandbox_dirs()
    loop = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nwhile True:\n    pass\n"
    with monkeypatch.context() as m:
        hide_proc(m)
        results = run_many([(GOOD, TESTS), (GOOD.replace("+", "-"), TESTS), (loop, TESTS)], timeout=1.5)
    assert [r.status for r in results] == ["passed", "failed", "timeout"], results
    assert results[2].seconds < 1.5 + 1.5
    time.sleep(0.1)
    assert marked_processes() == []
    assert sandbox_dirs() <= before


def test_user_task_count_without_proc(monkeypatch):
    """Without /proc the count of our user's tasks (the base RLIMIT_NPROC is added to) comes from ps, else None."""
    hide_proc(monkeypatch)
    count = sandbox._tasks_of_our_user()
    assert count is None or count >= 1


def test_harness_leftover_check_without_proc(monkeypatch):
    """The harness looked for leftover processes in /proc after every passing program: without /proc it crashed,
    so no program could pass."""
    spec = importlib.util.spec_from_file_location("_audit_harness", sandbox._HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    hide_proc(monkeypatch)
    assert harness._other_processes_alive() is False
