"""The sandbox must hold against code that loops, forks, allocates, writes files, reads secrets or opens
sockets, and still run ordinary code fast. Most attacks run with guard=False: the in-child guard is a
speed bump, the kernel-enforced limits and namespaces are what must hold."""
import os
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from picochat import sandbox
from picochat.sandbox import run_python, sandbox_info

INFO = sandbox_info()
needs_ns = pytest.mark.skipif(not INFO["namespaces"], reason="namespaces unavailable: " + INFO["note"])
needs_root = pytest.mark.skipif(not INFO["root"], reason="per-run uid needs root")


def live_pids_of_uid(uid):
    return [pid for pid, state, puid, _, _ in sandbox._proc_table() if puid == uid and state not in "ZX"]


def test_hello_is_fast_and_clean():
    r = run_python("import sys\nprint('hello', sum(range(10)))\nprint(sys.stdin.read().upper())", stdin="abc")
    assert r.status == "ok", r
    assert r.stdout == "hello 45\nABC\n"
    assert r.returncode == 0 and r.reason == "" and r.stderr == ""
    assert r.wall_time < 1.0


def test_error_reports_the_exception():
    r = run_python("def f():\n    return 1/0\nf()")
    assert r.status == "error" and r.returncode == 1
    assert r.reason == "ZeroDivisionError: division by zero"
    assert 'File "<sandbox>", line 2' in r.stderr and "return 1/0" in r.stderr
    r = run_python("import sys; print('bye'); sys.exit(3)")
    assert (r.status, r.returncode, r.stdout) == ("error", 3, "bye\n")


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run_python("print('started')\nwhile True: pass", timeout=1.0)
    assert r.status == "timeout" and "wall-clock" in r.reason
    assert r.stdout == "started\n"  # what it printed before the kill still comes back
    assert time.monotonic() - t < 2.5


def test_sleeping_child_times_out():
    r = run_python("import time; time.sleep(60)", timeout=0.5)
    assert r.status == "timeout" and r.wall_time < 2.0


def test_output_is_capped():
    r = run_python("while True: print('x' * 1000)", timeout=5.0, max_output=10_000)
    assert r.status == "output_limit"
    assert len(r.stdout) == 10_000 and r.wall_time < 2.0


def test_huge_allocation_is_a_memory_error():
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=256, guard=False)
    assert r.status == "memory", r
    assert "allocated" not in r.stdout


def test_deep_recursion_is_an_error_not_a_crash():
    r = run_python("def f(n): return f(n + 1)\nf(0)")
    assert r.status == "error" and "RecursionError" in r.reason
    # with the recursion limit lifted, C recursion overflows the stack: the child dies, we do not
    r = run_python("import sys\nsys.setrecursionlimit(10**8)\na = []\nfor _ in range(10**6): a = [a]\nprint(repr(a))",
                   timeout=10.0)
    assert r.status in ("crashed", "memory", "error"), r
    assert run_python("print(2 + 2)").stdout == "4\n"


@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_contained(guard):
    bomb = ("import os, time\nprint(os.getuid(), flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except BlockingIOError:\n        time.sleep(0.001)\n")
    t = time.monotonic()
    r = run_python(bomb, timeout=2.0, guard=guard)
    assert time.monotonic() - t < 6.0
    if guard:  # the guard refuses os.fork outright
        assert r.status == "error" and "PermissionError" in r.reason
    else:
        assert r.status == "timeout", r
    uid = int(r.stdout.split()[0])
    if INFO["root"]:
        assert uid != 0 and live_pids_of_uid(uid) == []  # nothing of the run is left
    # and we are unaffected: we can still start processes and run sandboxes
    assert subprocess.run(["true"]).returncode == 0
    assert run_python("print('alive')").stdout == "alive\n"


@needs_root
def test_fork_bomb_without_namespaces_is_contained_by_uid():
    bomb = ("import os, time\nprint(os.getuid(), flush=True)\n"
            "while True:\n    try:\n        os.fork() or os.setsid()\n    except (BlockingIOError, PermissionError):\n"
            "        time.sleep(0.001)\n")
    r = sandbox._run(INFO | {"namespaces": False}, bomb, timeout=1.5, memory_mb=256, max_output=10_000, stdin="",
                     max_procs=64, guard=False)
    assert r.status == "timeout", r
    assert live_pids_of_uid(int(r.stdout.split()[0])) == []


def test_setsid_escapee_is_killed():
    """A child that leaves the process group and outlives the program must not survive the run."""
    code = ("import os, time\nprint(os.getuid(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    for info in (INFO, INFO | {"namespaces": False}):
        r = sandbox._run(info, code, timeout=5.0, memory_mb=256, max_output=10_000, stdin="",
                         max_procs=64, guard=False)
        assert r.status == "ok", r
        assert r.wall_time < 2.0
        if INFO["root"]:
            assert live_pids_of_uid(int(r.stdout.split()[0])) == []


@needs_root
def test_runs_as_an_unprivileged_uid_without_capabilities():
    # no /proc in the sandbox's root: ask the kernel directly (capget, PR_GET_NO_NEW_PRIVS)
    r = run_python("import os, ctypes\nprint(os.getuid(), os.getgid(), os.getgroups())\n"
                   "libc = ctypes.CDLL(None)\nhdr = (ctypes.c_uint32 * 2)(0x20080522, 0)\n"
                   "data = (ctypes.c_uint32 * 6)(*[7] * 6)\nassert libc.capget(hdr, data) == 0\n"
                   "print(list(data), libc.prctl(39, 0, 0, 0, 0))", guard=False)
    uid, gid, groups = r.stdout.split("\n")[0].split(" ", 2)
    assert int(uid) >= sandbox._UID_BASE and uid == gid and groups == "[]"
    assert r.stdout.split("\n")[1] == "[0, 0, 0, 0, 0, 0] 1"  # no capability in any set; no_new_privs


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    code = (f"import os\nprint(sorted(os.environ))\nprint(os.environ.get('PICOCHAT_TEST_SECRET'))\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
            f"except OSError as e:\n    print('denied', type(e).__name__)\n")
    r = run_python(code, guard=False)
    assert r.status == "ok", r
    assert "hunter2" not in r.stdout and "PICOCHAT_TEST_SECRET" not in r.stdout
    assert "denied" in r.stdout


def _outside_dir():
    # /var/tmp is world-writable and (unlike /tmp) not replaced by the sandbox's own tmpfs, so only
    # the sandbox stops writes there; the dir and file are world-writable on purpose
    d = tempfile.mkdtemp(prefix="picochat-test-outside-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(d, 0o777)
    victim = os.path.join(d, "victim.txt")
    with open(victim, "w") as f:
        f.write("keep me")
    os.chmod(victim, 0o666)
    return d, victim


def _attack_files(d, victim):
    return (f"import os, shutil\nres = []\n"
            f"for name, fn in [('create', lambda: open({d!r} + '/new.txt', 'w').write('x')),\n"
            f"                 ('overwrite', lambda: open({victim!r}, 'w').write('pwned')),\n"
            f"                 ('delete', lambda: os.remove({victim!r})),\n"
            f"                 ('rmtree', lambda: shutil.rmtree({d!r})),\n"
            f"                 ('own_dir', lambda: open('mine.txt', 'w').write('ok'))]:\n"
            f"    try:\n        fn()\n        res.append(name + ':done')\n"
            f"    except OSError as e:\n        res.append(name + ':' + type(e).__name__)\n"
            f"print(' '.join(res))\nprint(open('mine.txt').read())\n")


@pytest.mark.parametrize("guard", [True, False])
def test_files_outside_the_sandbox_are_untouched(guard):
    if not guard and not INFO["namespaces"]:
        pytest.skip("without a mount namespace only the guard protects world-writable dirs")
    d, victim = _outside_dir()
    try:
        r = run_python(_attack_files(d, victim), guard=guard)
        assert r.status == "ok", r
        assert "own_dir:done" in r.stdout and r.stdout.endswith("ok\n")  # its own dir is writable
        for attack in ("create", "overwrite", "delete", "rmtree"):
            assert f"{attack}:done" not in r.stdout, r.stdout
        assert os.listdir(d) == ["victim.txt"]
        assert open(victim).read() == "keep me"
    finally:
        subprocess.run(["rm", "-rf", d])


def test_sandbox_dir_is_private_and_removed():
    def ours():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("picochat-sbx-")}
    before = ours()
    r = run_python("import os\nprint(os.getcwd() == os.environ['HOME'])\nopen('f.txt', 'w').write('x')\n"
                   "print(os.listdir('.'))")
    assert r.status == "ok", r
    assert r.stdout == "True\n['f.txt']\n"  # neither the program nor its stdin is left for the code to see
    assert ours() <= before  # deleted afterwards


def test_process_limit():
    code = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except BlockingIOError:\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
            "    n += 1\nprint(n)")
    r = run_python(code, guard=False, max_procs=16)
    assert r.status == "ok", r
    assert 0 < int(r.stdout) < 16


def test_signals_are_reported():
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('survived')", guard=False)
    assert (r.status, r.returncode, r.stdout) == ("killed", -9, "")
    r = run_python("import os\nos.abort()", guard=False)
    assert r.status == "crashed" and "SIGABRT" in r.reason and r.returncode == -6
    assert "\x00" not in r.stderr and "unshare" not in r.stderr


@pytest.mark.parametrize("guard", [True, False])
def test_no_network(guard):
    if not guard and not INFO["namespaces"]:
        pytest.skip("without a network namespace only the guard blocks sockets")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            f"    print('connected')\nexcept OSError as e:\n    print('refused', e)\n")
    try:
        r = run_python(code, guard=guard)
        assert "connected" not in r.stdout, r
        if guard:
            assert r.status == "error" and "socket" in r.reason
        else:
            assert r.status == "ok" and r.stdout.startswith("refused")
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody ever reached us
    finally:
        srv.close()


def test_ctypes_is_contained():
    r = run_python("import ctypes\nctypes.CDLL(None).system(b'id')")
    assert r.status == "error" and "ctypes" in r.reason  # the guard
    r = run_python("import ctypes\nctypes.string_at(0)", guard=False)
    assert r.status == "crashed" and "SIGSEGV" in r.reason
    d, victim = _outside_dir()
    if not INFO["namespaces"]:  # then only file permissions (and the uid switch) protect it
        os.chmod(d, 0o755)
        os.chmod(victim, 0o644)
    try:  # system() works without the guard, but as the sandbox's uid, inside its namespaces
        r = run_python(f"import ctypes\nprint(ctypes.CDLL(None).system(b'rm -f {victim}; touch {d}/new'))", guard=False)
        if INFO["root"] or INFO["namespaces"]:
            assert os.listdir(d) == ["victim.txt"], r
    finally:
        subprocess.run(["rm", "-rf", d])


def test_concurrent_runs_from_threads():
    def job(i):
        return run_python(f"import time\ntime.sleep(0.05)\nprint({i} * {i})")
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(job, range(16)))
    for i, r in enumerate(results):
        assert r.status == "ok" and r.stdout == f"{i * i}\n", r


def test_concurrent_timeouts_do_not_disturb_others():
    with ThreadPoolExecutor(4) as ex:
        slow = [ex.submit(run_python, "while True: pass", 1.0) for _ in range(2)]
        fast = [ex.submit(run_python, f"print({i})") for i in range(6)]
        assert [f.result().stdout for f in fast] == [f"{i}\n" for i in range(6)]
        assert all(f.result().status == "timeout" for f in slow)


def test_basic_mode_still_limits():
    """The fallback without namespaces (old kernels, containers that forbid them) still works."""
    info = INFO | {"namespaces": False}
    r = sandbox._run(info, "print(6 * 7)", timeout=5.0, memory_mb=256, max_output=1000, stdin="",
                     max_procs=64, guard=True)
    assert r.status == "ok" and r.stdout == "42\n" and "netns" not in r.isolation
    r = sandbox._run(info, "while True: pass", timeout=0.5, memory_mb=256, max_output=1000, stdin="",
                     max_procs=64, guard=True)
    assert r.status == "timeout"
    r = sandbox._run(info, "import socket", timeout=5.0, memory_mb=256, max_output=1000, stdin="",
                     max_procs=64, guard=True)
    assert r.status == "error"
