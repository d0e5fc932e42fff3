"""The MBPP sandbox: correct code passes; hostile programs fail, leave nothing behind and respect the timeout."""
import os
import secrets
import socket
import time

import pytest

from reflectevo.data import sandbox
from reflectevo.data.sandbox import MARK_ENV, run_many, run_program, sandbox_mode

TIMEOUT = 2.0
SLACK = 1.5
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def live_processes_with(needle: bytes, where: str) -> list[int]:
    """Live (not zombie) processes whose /proc/PID/``where`` (environ, cmdline) contains ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/{where}", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def leftover_processes():
    """Live processes that carry a sandbox marker in their environment."""
    return live_processes_with(MARK_ENV.encode() + b"=", "environ")


def sandbox_dirs():
    import tempfile
    base = tempfile.gettempdir()
    return {d for d in os.listdir(base) if d.startswith("reflectevo-sbx-")}


@pytest.fixture(params=["ns", "plain"])
def mode(request, monkeypatch):
    if request.param == "ns" and sandbox.sandbox_mode() != "ns":
        pytest.skip("namespaces unavailable here")
    if request.param == "plain":
        monkeypatch.setenv("REFLECTEVO_SANDBOX", "plain")
    return request.param


def test_correct_and_wrong_programs(mode):
    assert run_program(GOOD, TESTS, timeout=TIMEOUT).passed
    r = run_program(GOOD.replace("a + b", "a - b"), TESTS, timeout=TIMEOUT)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    assert not run_program("def add(a, b) return", TESTS, timeout=TIMEOUT).passed  # syntax error
    assert not run_program("", TESTS, timeout=TIMEOUT).passed


def test_files_and_tempfiles_inside_the_work_dir(mode):
    code = ("import os, tempfile\nwith open('data.txt', 'w') as f:\n    f.write('5')\n"
            "with tempfile.NamedTemporaryFile('w', delete=False) as t:\n    t.write('6')\n"
            "os.mkdir('locked')\nopen('locked/x', 'w').write('1')\nos.chmod('locked', 0)\n"
            "def value():\n    return int(open('data.txt').read()) + int(open(t.name).read())\n")
    before = sandbox_dirs()
    r = run_program(code, ["assert value() == 11"], timeout=TIMEOUT)
    assert r.passed, r.stderr
    assert sandbox_dirs() <= before


def test_setup_code_runs_between_code_and_asserts(mode):
    code = "class Box:\n    def __init__(self, v):\n        self.v = v\n"
    assert run_program(code, ["assert b.v == 7"], test_setup_code="b = Box(7)", timeout=TIMEOUT).passed
    assert not run_program(code, ["assert b.v == 7"], timeout=TIMEOUT).passed


def test_multiprocessing_and_pickle(mode):
    code = ("import multiprocessing, pickle\n"
            "class Point:\n    def __init__(self, x):\n        self.x = x\n"
            "def double(x):\n    return 2 * x\n"
            "def put(q, x):\n    q.put(double(x))\n"
            "def pooled(xs):\n    with multiprocessing.Pool(2) as pool:\n        return pool.map(double, xs)\n"
            "def queued(x):\n    q = multiprocessing.Queue()\n"
            "    p = multiprocessing.Process(target=put, args=(q, x))\n    p.start()\n    r = q.get()\n"
            "    p.join()\n    return r\n")
    tests = ["assert pooled([1, 2, 3]) == [2, 4, 6]", "assert queued(5) == 10",
             "assert pickle.loads(pickle.dumps(Point(3))).x == 3"]
    r = run_program(code, tests, timeout=TIMEOUT)
    assert r.passed, r.stderr


def test_replaced_builtins_do_not_skip_the_asserts(mode):
    wrong = "def add(a, b):\n    return 0\n"
    for patch in ("builtins.exec = lambda *a, **k: None", "builtins.enumerate = lambda *a: iter(())"):
        r = run_program(wrong + "import builtins\n" + patch + "\n", TESTS, timeout=TIMEOUT)
        assert not r.passed and "AssertionError" in r.stderr, (patch, r)


def _hostile(tmp_victim: str, escape_path: str, port: int) -> dict[str, str]:
    ok = GOOD
    return {
        "infinite_loop": "while True:\n    pass\n" + ok,
        "fork_swarm": "import os\nfor _ in range(100000):\n    try:\n        os.fork()\n    except OSError:\n"
                      "        pass\n" + ok,
        "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n" + ok,
        "delete_outside": ok + f"import os, shutil\nos.remove({tmp_victim!r})\n",
        "write_tmp": ok + f"open({escape_path!r}, 'w').write('x')\n",
        "write_beside_victim": ok + f"open({tmp_victim!r} + '.new', 'w').write('x')\n",
        "kill_parent": ok + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n",
        "exit_early": ok + "import sys\nsys.exit(0)\n",
        "os_exit_in_test": "import os\ndef add(a, b):\n    os._exit(0)\n",
        "socket": "import socket\ndef add(a, b):\n"
                  f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    s.close()\n"
                  "    return a + b\n",
        "daemon": ok + "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                       "        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.2)\n",
        "flood_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n" + ok,
        "infinite_recursion": "def add(a, b):\n    return add(a, b)\n",
        "deep_recursion_crash": "import sys\nsys.setrecursionlimit(10**8)\ndef add(a, b):\n    return add(a, b) + 1\n",
    }


def test_hostile_programs(mode, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    escape = f"/tmp/reflectevo-escape-{secrets.token_hex(6)}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    before = sandbox_dirs()
    programs = _hostile(str(victim), escape, port)
    if mode == "plain":  # documented limits of the fallback: no network isolation, /tmp is writable
        programs.pop("socket")
        if os.geteuid() != 0:
            pytest.skip("the fallback without root cannot protect our own files")
        programs.pop("write_tmp")
    names = list(programs)
    start = time.monotonic()
    results = run_many([(programs[n], TESTS) for n in names], workers=4, timeout=TIMEOUT, memory_mb=512)
    total = time.monotonic() - start
    listener.close()
    for name, r in zip(names, results):
        assert not r.passed, f"{name} passed: {r}"
        assert r.seconds <= TIMEOUT + SLACK, f"{name} took {r.seconds:.1f}s"
    assert total <= 4 * (TIMEOUT + SLACK)
    assert victim.read_text() == "keep me"
    assert not os.path.exists(escape)
    assert sorted(os.listdir(tmp_path)) == ["victim.txt"]
    time.sleep(0.1)
    assert leftover_processes() == []
    assert sandbox_dirs() <= before
    flood = results[names.index("flood_stdout")]
    assert len(flood.stdout) < 10_000


def test_no_network_in_namespace_mode():
    if sandbox_mode() != "ns":
        pytest.skip("namespaces unavailable here")
    r = run_program("import socket\nprint(socket.gethostname())\ns = socket.socket()\ns.settimeout(1)\n"
                    "s.connect(('1.1.1.1', 80))\n", [], timeout=TIMEOUT)
    assert not r.passed and ("OSError" in r.stderr or "unreachable" in r.stderr.lower())


def test_run_many_keeps_order_and_parallelism():
    progs = [(GOOD if i % 2 == 0 else GOOD.replace("+", "*"), TESTS) for i in range(6)]
    results = run_many(progs, workers=3, timeout=TIMEOUT)
    assert [r.passed for r in results] == [True, False] * 3
    sleepers = [("import time\ntime.sleep(0.6)\n" + GOOD, TESTS)] * 4
    start = time.monotonic()
    assert all(r.passed for r in run_many(sleepers, workers=4, timeout=TIMEOUT))
    assert time.monotonic() - start < 4 * 0.6


def test_run_many_runs_one_program_per_usable_core(monkeypatch):
    """The timeout is wall-clock: two programs sharing a core could each run past it, so the default pool has one
    worker per usable core (at most 8)."""
    import reflectevo.data.sandbox as sb

    sizes = []
    real = sb.ThreadPoolExecutor

    def recording_pool(max_workers):
        sizes.append(max_workers)
        return real(max_workers=max_workers)

    monkeypatch.setattr(sb, "ThreadPoolExecutor", recording_pool)
    results = run_many([(GOOD, TESTS)] * 3)
    assert [r.passed for r in results] == [True] * 3
    assert sizes == [min(8, len(os.sched_getaffinity(0)))]


def _as_nobody(script: str, forced: str, timeout: float = 60):
    """Run ``script`` (with the project importable) as uid 65534: its stdout, or None when it ran past ``timeout``."""
    import shutil
    import subprocess

    from reflectevo.data.sandbox import _others_can_read, _plain_interpreter
    python = _plain_interpreter()
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not _others_can_read(os.path.dirname(python)):
        pytest.skip("needs root, setpriv and a Python an unprivileged user can run")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__))))
    if not _others_can_read(os.path.join(root, "reflectevo", "data", "sandbox.py")):
        pytest.skip("the project is not readable by other users")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REFLECTEVO_SANDBOX": forced, "HOME": "/"}
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                            f"import sys; sys.path.insert(0, {root!r})\n" + script], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd="/")
    except subprocess.TimeoutExpired:
        return None
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_unprivileged_caller():
    """As a non-root user: user namespaces when the kernel allows them, else the plain fallback."""
    script = (
        "from reflectevo.data.sandbox import run_program, sandbox_mode\n"
        "good = run_program('def f():\\n    return 1\\n', ['assert f() == 1'], timeout=2)\n"
        "loop = run_program('while True:\\n    pass\\n', [], timeout=1)\n"
        "daemon = run_program('import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(30)\\n', [],"
        " timeout=2)\n"
        "print(sandbox_mode(), good.passed, loop.status, daemon.passed)\n")
    for forced in ("", "plain"):
        mode, good, loop, daemon = _as_nobody(script, forced).split()
        assert (good, loop, daemon) == ("True", "timeout", "False")
        if forced:
            assert mode == "plain"
    time.sleep(0.1)
    assert leftover_processes() == []


def test_unprivileged_caller_with_many_threads():
    """RLIMIT_NPROC counts every thread of the user: a caller's own threads must not stop the program's."""
    script = (
        "import threading\nfrom reflectevo.data.sandbox import run_program\n"
        "stop = threading.Event()\nidle = [threading.Thread(target=stop.wait) for _ in range(100)]\n"
        "for t in idle:\n    t.start()\n"
        "code = 'import threading\\ndef f():\\n    out = []\\n'"
        " '    t = threading.Thread(target=out.append, args=(1,))\\n'"
        " '    t.start()\\n    t.join()\\n    return out[0]\\n'\n"
        "r = run_program(code, ['assert f() == 1'], timeout=2)\nstop.set()\nprint(r.passed, r.stderr[-200:])\n")
    for forced in ("", "plain"):
        out = _as_nobody(script, forced)
        assert out.startswith("True"), (forced, out)
