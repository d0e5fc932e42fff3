"""Runs inside the sandbox (see sandbox.py): set up isolation, then run code + setup code + asserts in a child.

argv: payload.json mode uid gid (stdlib only; must stay runnable by any Python >= 3.9)
  mode "ns": we are PID 1 of fresh pid/mount/net/ipc/uts namespaces; mount private read-only tmpfs over the
  world-writable directories (a writable one on /dev/shm), make the interpreter's files reachable for the
  unprivileged uid, work in a private size-limited tmpfs directory (TMPDIR points there).
  mode "plain": no namespaces; work in the directory the payload names; we are a child subreaper, so what the run
  leaves behind (even a ``setsid`` daemon) stays our descendant, and we kill it before we exit.
stdin carries the nonce (one line) and is then replaced by /dev/null. We fork: the child sets the rlimits,
drops to ``uid``/``gid`` (when that is 0, inside a user namespace, it gives up every capability instead) and runs
the candidate; it proves it reached the end with a token of its own on a private pipe. Only then, and when no
other process of this run is still alive, does this parent write the nonce to the fd named in the payload.
stdout/stderr are size-limited files set up by the caller.
"""
import ctypes
import json
import os
import resource
import sys
import traceback
import types

# modules that solutions commonly import, loaded while the interpreter's files are surely readable (in "plain"
# mode an unprivileged uid may not be able to open the interpreter's library directory later)
import array, bisect, calendar, cmath, collections, copy, datetime, decimal  # noqa: E401,F401
import fractions, functools, hashlib, heapq, io, itertools, math, operator, random  # noqa: E401,F401
import re, shutil, signal, socket, statistics, string, struct, textwrap, time, typing  # noqa: E401,F401
import unicodedata  # noqa: F401

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MNT_DETACH = 2


def _mount(libc, source, target, fstype, flags, data):
    if libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def _setup_namespace(uid, gid, work_mb, fallback_workdir):
    """Private mounts inside the new mount namespace; every step degrades gracefully if mounting fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    # world-writable places become private and empty (and read-only once the work dir exists); /dev/shm stays
    # writable, as multiprocessing's locks and queues need it (POSIX semaphores live there)
    private = []
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"):
        if os.path.isdir(d) and not os.path.islink(d):
            try:
                size = work_mb if d in ("/tmp", "/dev/shm") else 1
                mode = "1777" if d == "/dev/shm" else "0755"
                _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode={mode}")
                if d != "/dev/shm":
                    private.append(d)
            except OSError:
                pass
    if "/tmp" in private:
        _reach_interpreter(libc)
    work, work_is_mount = "/tmp/work", False
    if "/tmp" in private:
        os.mkdir(work, 0o700)
        try:
            _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={work_mb}m,mode=0700,uid={uid},gid={gid}")
            work_is_mount = True
        except OSError:
            try:
                os.chown(work, uid, gid)
            except OSError:
                pass
        os.chdir(work)
    else:
        os.chdir(fallback_workdir)
    for d in private:
        if d == "/tmp" and not work_is_mount:
            continue
        try:
            _mount(libc, None, d, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        except OSError:
            pass


def _reach_interpreter(libc):
    """Directories on the way to the interpreter's files that "others" cannot traverse (e.g. /root holding a
    pyenv) are hidden under a tmpfs, and only the child the interpreter needs is bound back."""
    needed = {}
    for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))] + \
            [p for p in sys.path if p]:
        parts = os.path.realpath(p).split("/")
        for i in range(2, len(parts)):
            d = "/".join(parts[:i])
            try:
                if not os.stat(d).st_mode & 0o001:
                    needed.setdefault(d, set()).add("/".join(parts[: i + 1]))
                    break
            except OSError:
                break
    stage = 0
    for d, children in needed.items():
        staged = []
        try:
            for child in sorted(children):
                tmp = f"/tmp/.bind{stage}"
                stage += 1
                os.mkdir(tmp)
                _mount(libc, child, tmp, None, MS_BIND | MS_REC, None)
                staged.append((child, tmp))
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for child, tmp in staged:
                os.mkdir(child)
                _mount(libc, tmp, child, None, MS_BIND | MS_REC, None)
        except OSError:
            pass
        for _child, tmp in staged:
            libc.umount2(tmp.encode(), MNT_DETACH)
            try:
                os.rmdir(tmp)
            except OSError:
                pass


def _live_processes():
    """(pid, parent pid, state letter) of every live (not zombie) process but us; None without /proc (macOS)."""
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X"):
                found.append((int(entry), int(fields[1]), fields[0]))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _other_processes_alive():
    """True when another live process of this run exists (a daemon left behind): in "ns" mode (we are PID 1) any other
    process of our PID namespace; else an orphan we adopted as subreaper, or one carrying this run's environment
    marker (a process that cleared its environment has none, but it is still one of those two)."""
    marker = ("REFLECTEVO_SANDBOX_MARK=" + os.environ.get("REFLECTEVO_SANDBOX_MARK", "")).encode()
    me = os.getpid()
    for pid, ppid, _state in _live_processes() or ():  # no /proc (macOS): the caller still kills our process group
        if me == 1 or ppid == me:
            return True
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read():
                    return True
        except OSError:
            continue
    return False


def _kill_descendants(rounds=100):
    """"plain" mode, as subreaper (what the run left behind is our descendant, not init's): stop every descendant (a
    stopped process cannot fork, so a fork bomb cannot outrun us), then SIGKILL them, until none is left."""
    me = os.getpid()
    for attempt in range(rounds):
        while True:  # reap the zombies we adopted
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        children, state = {}, {}
        for pid, ppid, letter in _live_processes() or ():
            children.setdefault(ppid, []).append(pid)
            state[pid] = letter
        tree, stack = set(), [me]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in tree:
                    tree.add(child)
                    stack.append(child)
        if not tree:
            return
        running = {pid for pid in tree if state[pid] not in (b"T", b"t")}
        victims, sig = (running, signal.SIGSTOP) if running and attempt < rounds - 1 else (tree, signal.SIGKILL)
        for pid in victims:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.002)


def _drop_capabilities():
    """Still uid 0 (inside an unprivileged user namespace only our own id is mapped): give up every capability, for
    good (bounding and ambient sets too, so that execve cannot bring them back). With them the program could unmount
    the private /tmp or /proc and reach the caller's files and processes underneath."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # PR_CAPBSET_DROP, up to the first capability this kernel does not know
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _drop_privileges(uid, gid):
    if os.getuid() != 0:
        return
    if uid != 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError:
            try:  # an unmapped id (user namespaces): nobody is the next best thing
                os.setgid(65534)
                os.setuid(65534)
            except OSError:
                pass
    if os.getuid() == 0:
        _drop_capabilities()


def _run_candidate(payload, uid, gid, report_fd, token):
    """Child process: limits, unprivileged ids, then code, setup code and asserts; report ``token`` at the end."""
    for name, value in payload["limits"].items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError, AttributeError):
            pass
    _drop_privileges(uid, gid)
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()
    sys.argv = ["solution.py"]
    # the program is imported, not run: a main block ("if __name__ == '__main__': input()") must stay out of the
    # tests, as when the asserts import the solution. The module is registered under its name (pickle and
    # multiprocessing look its functions up there) and as __main__ (code that imports __main__ finds it).
    module = types.ModuleType("solution")
    module.__builtins__ = __builtins__
    sys.modules["solution"] = sys.modules["__main__"] = module
    namespace = module.__dict__
    # bound before the program runs: replacing builtins.exec, compile or enumerate must not skip the asserts
    run, build, numbered, write = exec, compile, enumerate, os.write
    code, setup, tests = payload["code"], payload["setup"], payload["tests"]
    run(build(code, "solution.py", "exec"), namespace)
    if setup.strip():
        run(build(setup, "test_setup.py", "exec"), namespace)
    for i, test in numbered(tests):
        run(build(test, f"test_{i}.py", "exec"), namespace)
    sys.stdout.flush()
    write(report_fd, token)


def main():
    payload_path, mode, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(payload_path, encoding="utf-8") as f:
        payload = json.load(f)
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    done_fd = payload["done_fd"]
    os.set_inheritable(done_fd, False)
    if mode == "ns":
        _setup_namespace(uid, gid, payload["limits"]["RLIMIT_FSIZE"] >> 20, payload["workdir"])
    else:
        os.chdir(payload["workdir"])
    # the candidate runs in a child, which cannot write the nonce (done_fd is closed there) nor signal this
    # (privileged) parent; its token is in its own memory, so a program written to forge it can (sandbox.py)
    token = os.urandom(16).hex().encode()
    if mode != "ns":  # orphans of the run (a setsid daemon) come to us, not to init: _other_processes_alive sees them
        try:
            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux)
        except (OSError, AttributeError):
            pass
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(done_fd)
        code = 1
        try:
            _run_candidate(payload, uid, gid, report_w, token)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(report_w)
    _, status = os.waitpid(pid, 0)
    os.set_blocking(report_r, False)
    try:
        report = os.read(report_r, 64)
    except OSError:
        report = b""
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code < 0:
        exit_code = 128 - exit_code
    if exit_code == 0 and report == token and _other_processes_alive():
        sys.stderr.write("sandbox: the program left processes running\n")
        exit_code = 3
    if mode != "ns":
        _kill_descendants()
    if exit_code == 0 and report == token:
        os.write(done_fd, (nonce + "\n").encode())
    os._exit(exit_code)


if __name__ == "__main__":
    main()
