"""The hostile suite: what a client who steers the model into writing code would try, each run through
run_python with the in-child guard off (guard=False), so that the containment itself is what stops it. Where a
defence has two layers (the minimal root and seccomp, the session keyring and seccomp), each layer is also
tested alone. Attacks covered in test_sandbox.py: surviving the timeout (test_setsid_escapee_is_killed,
test_sleeping_child_times_out), fork bombs (test_fork_bomb_is_contained), the network (test_no_network), the
caller's environment (test_parent_environment_is_not_visible), writing outside the sandbox dir."""
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from picochat import sandbox
from picochat.calculator import evaluate_expression
from picochat.sandbox import run_python, sandbox_info

INFO = sandbox_info()
strong = pytest.mark.skipif(INFO["mode"] != "strong", reason="the strong sandbox is unavailable: " + INFO["note"])
REPO = Path(__file__).resolve().parents[1]


def hostile(code, **kw):
    kw.setdefault("timeout", 10.0)
    return run_python(code, guard=False, **kw)


def without_seccomp(code, **kw):
    """The same run with every layer but the seccomp filter: shows that the other layer holds by itself."""
    return sandbox._run(INFO | {"seccomp": False}, code, timeout=10.0, memory_mb=256, max_output=64_000, stdin="",
                        max_procs=sandbox._MAX_PROCS, guard=False)


@strong
@pytest.mark.parametrize("run", [hostile, without_seccomp])
def test_host_files_are_not_there(run, tmp_path):
    planted = REPO / "tests" / f"planted-{os.getpid()}.txt"
    planted.write_text("the repository's secret")
    try:
        os.chmod(planted, 0o644)  # world-readable: only the missing path can stop it
        r = run("import os\nfor p in ['/etc/passwd', %r, %r, '/proc/1/cmdline', '/sys/kernel']:\n"
                "    try:\n        print(p, open(p).read()[:40])\n    except OSError as e:\n"
                "        print(p, type(e).__name__)\nprint(sorted(os.listdir('/')))"
                % (str(planted), str(REPO / ".git" / "HEAD")))
    finally:
        planted.unlink()
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert all(line.endswith(("FileNotFoundError", "NotADirectoryError")) for line in lines[:-1]), r.stdout
    assert eval(lines[-1]) <= ["dev", "etc", "lib", "lib64", "root", "tmp", "usr"]  # the interpreter's needs


@strong
@pytest.mark.parametrize("run", [hostile, without_seccomp])
def test_a_host_unix_socket_cannot_be_reached(run, tmp_path):
    path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o777)
    try:
        r = run("import socket\ntry:\n    s = socket.socket(socket.AF_UNIX)\n    s.connect(%r)\n"
                "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)" % str(path))
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert r.ok and r.stdout.strip() in ("PermissionError", "FileNotFoundError"), (r.stdout, r.stderr)


@strong
def test_no_socket_of_any_family_can_be_made():
    r = hostile("import socket\nfor fam in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_VSOCK, "
                "socket.AF_NETLINK, socket.AF_PACKET):\n    try:\n        socket.socket(fam, socket.SOCK_DGRAM)\n"
                "        print(fam, 'made')\n    except OSError as e:\n        print(fam, e.errno)")
    assert r.ok, r.stderr
    assert all(line.split()[1] == "1" for line in r.stdout.splitlines()), r.stdout  # EPERM


@strong
def test_no_new_namespaces_or_mounts():
    # inside a new user namespace the code would hold every capability; clone3 cannot be filtered by flags, so
    # it is refused outright and libc falls back to clone (threads and fork still work)
    r = hostile("import ctypes, os, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "for flag in (0x10000000, 0x20000, 0x40000000, 0x20000000):\n"
                "    print('unshare', libc.unshare(flag), ctypes.get_errno())\n"
                "print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n"
                "print('clone3', libc.syscall(435, None, 0), ctypes.get_errno())\n"
                "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
                "pid = os.fork()\nif pid == 0:\n    os._exit(7)\n"
                "print('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["unshare -1 1"] * 4 and lines[4] == "mount -1 1", r.stdout
    assert lines[5] == "clone3 -1 38" and lines[6] == "fork 7", r.stdout  # ENOSYS


@strong
def test_a_python_outside_is_not_an_escape():
    # no /proc, no host paths: nothing to exec, and the folder the interpreter came from is gone
    r = hostile("import os\ntry:\n    os.execv(%r, ['python', '-c', 'print(1)'])\nexcept OSError as e:\n"
                "    print(type(e).__name__)" % sys.executable)
    assert r.ok and r.stdout.strip() == "FileNotFoundError", (r.stdout, r.stderr)


def _add_session_key(payload: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 248, "aarch64": 217}[os.uname().machine]  # add_key
    serial = libc.syscall(nr, b"user", b"picochat-test", payload, len(payload), ctypes.c_int(-3))  # @s
    if serial < 0:
        pytest.fail(f"could not plant a key in the session keyring: {os.strerror(ctypes.get_errno())}")
    return serial


@strong
@pytest.mark.parametrize("run", [hostile, without_seccomp])
def test_the_callers_session_keyring_is_out_of_reach(run):
    serial = _add_session_key(b"hunter2")
    nr = {"x86_64": 250, "aarch64": 219}[os.uname().machine]  # keyctl
    r = run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(64)\n"
            "n = libc.syscall(%d, 11, %d, buf, 64)\nprint(n, ctypes.get_errno(), buf.value)" % (nr, serial))
    assert r.ok, r.stderr
    n, _, value = r.stdout.split(" ", 2)
    assert int(n) < 0 and "hunter2" not in value, r.stdout


@strong
def test_memory_and_process_budgets_hold():
    r = hostile("x = bytearray(200 << 20)", memory_mb=128)
    assert r.status == "memory", r
    r = hostile("import os, time\nmade = 0\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n"
                "            time.sleep(3); os._exit(0)\n        made += 1\n    except OSError:\n        break\n"
                "print(made)", max_procs=8)
    assert r.ok and int(r.stdout) < 8, (r.stdout, r.stderr)
    # the private /tmp holds a bounded number of files
    r = hostile("import os\nfor i in range(10000):\n    try:\n        open(str(i), 'w').close()\n"
                "    except OSError as e:\n        print(i, e.errno); break")
    assert r.ok and 0 < int(r.stdout.split()[0]) <= sandbox._TMPFS_INODES and r.stdout.split()[1] == "28"  # ENOSPC


@strong
def test_the_oom_killer_and_the_scheduler_take_the_sandbox_first():
    seen = {}

    def watch():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            for pid, _, uid, _, _ in sandbox._proc_table():
                if uid >= sandbox._UID_BASE:
                    try:
                        seen["oom"] = Path(f"/proc/{pid}/oom_score_adj").read_text().strip()
                        seen["nice"] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]
                    except OSError:
                        continue
                    break
            time.sleep(0.01)

    if not INFO["root"]:
        pytest.skip("without a uid of its own the sandbox's processes are not told apart from ours")
    t = threading.Thread(target=watch)
    t.start()
    hostile("import time\ntime.sleep(1.5)")
    t.join()
    assert seen == {"oom": "1000", "nice": "10"}


@strong
def test_a_run_cannot_kill_another_runs_processes():
    results = {}
    victim = threading.Thread(target=lambda: results.update(v=hostile("import time\ntime.sleep(2)\nprint('alive')")))
    victim.start()
    time.sleep(0.5)
    r = hostile("import os, signal\nkilled = 0\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
                "for pid in range(2, 4000):\n    try:\n        os.kill(pid, signal.SIGKILL); killed += 1\n"
                "    except OSError:\n        pass\nprint(killed)")
    victim.join()
    assert results["v"].ok and results["v"].stdout == "alive\n", results["v"]
    assert r.status in ("ok", "killed")  # kill(-1) may take the attacker itself down, never the victim


@pytest.mark.skipif(not INFO["root"], reason="per-run uids need root")
def test_uids_are_unique_across_processes(monkeypatch):
    """A uid another process holds (an RL rank, an eval beside a server) is never drawn: its timeout sweep
    would kill our run's processes."""
    taken = sandbox._UID_BASE + 12345
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)"),
        os.path.join(sandbox._uid_lock_dir(), str(taken))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        draws = iter([12345, 12345, 777])
        monkeypatch.setattr(sandbox.random, "randrange", lambda n: next(draws))
        uid, fd = sandbox._alloc_uid()
        assert uid == sandbox._UID_BASE + 777
        sandbox._free_uid(uid, fd)
        assert not os.path.exists(os.path.join(sandbox._uid_lock_dir(), str(uid)))
    finally:
        holder.kill()
        holder.wait()


def test_lone_surrogates_are_an_error_not_an_exception():
    r = run_python("print('\ud800')")
    assert r.status == "error" and "not valid text" in r.reason
    assert run_python("print(input())", stdin="\udfff").status == "error"
    assert evaluate_expression("'\ud800'.upper()") is None


def test_weak_mode_is_said_and_serve_refuses_the_tool(tmp_path):
    """PICOCHAT_SANDBOX=basic forces the weak sandbox: serve turns the tool off and says why, unless
    --allow-weak-sandbox; chat says which sandbox it has."""
    code = ("import sys\nfrom picochat.server import tool_policy\nfrom picochat.sandbox import sandbox_info\n"
            "print(sandbox_info()['mode'])\nfor allow in (False, True):\n"
            "    on, lines = tool_policy(no_tool=False, allow_weak=allow)\n    print(on, lines)\n"
            "print(tool_policy(no_tool=True, allow_weak=True))")
    env = dict(os.environ, PICOCHAT_SANDBOX="basic", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "weak"
    assert lines[1].startswith("False sandbox: WEAK") and "PICOCHAT_SANDBOX=basic" in lines[1]
    assert lines[2].startswith("tool: OFF") and "--allow-weak-sandbox" in lines[2]
    assert lines[3].startswith("True sandbox: WEAK")
    assert lines[4] == "tool: on, in the weak sandbox (--allow-weak-sandbox)"
    assert lines[5] == "(False, 'tool: off (--no-tool)')"


def writable_cgroup2():
    """A fresh folder in a cgroup v2 hierarchy this process may write, or None (the hierarchy a delegation gives)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            folder = Path(fields[4]) / f"picochat-test-{os.getpid()}-{time.monotonic_ns()}"
            try:
                folder.mkdir()
                return folder
            except OSError:
                continue
    return None


def test_a_cgroup_that_is_not_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_result", None)
    monkeypatch.setenv("PICOCHAT_SANDBOX_CGROUP", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"PICOCHAT_SANDBOX_CGROUP={tmp_path} is not a writable cgroup v2 folder"):
        sandbox_info()


def test_each_run_lives_in_its_own_cgroup_and_leaves_none_behind(monkeypatch):
    folder = writable_cgroup2()
    if folder is None:  # no delegation possible here: the variable is refused rather than ignored (test above)
        monkeypatch.setattr(sandbox, "_probe_result", None)
        monkeypatch.setenv("PICOCHAT_SANDBOX_CGROUP", "/sys/fs/cgroup/no-such-folder")
        with pytest.raises(RuntimeError, match="not a writable cgroup v2 folder"):
            sandbox_info()
        return
    try:
        monkeypatch.setattr(sandbox, "_probe_result", None)
        monkeypatch.setenv("PICOCHAT_SANDBOX_CGROUP", str(folder))
        info = sandbox_info()
        assert info["cgroup"] == str(folder) and "cgroup" in isolation_of(info)
        members = []
        result = {}
        runner = threading.Thread(target=lambda: result.update(r=hostile(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(1.5)\nprint('ok')",
            timeout=20.0)))
        runner.start()
        while runner.is_alive():
            for run in folder.glob("run-*"):
                try:
                    members += (run / "cgroup.procs").read_text().split()
                except OSError:
                    pass
            time.sleep(0.05)
        runner.join()
        assert result["r"].status == "ok" and "cgroup" in result["r"].isolation, result["r"]
        assert len(set(members)) >= 2  # the code and the process it forked, both counted in the run's cgroup
        assert not list(folder.glob("run-*"))  # killed and removed, the setsid'd sleeper included
        if "memory" in info["cgroup_limits"]:  # where the controller is delegated: the run as a whole is bounded
            r = hostile("import os\nfor _ in range(3):\n    os.fork()\nx = bytearray(60 << 20)\nimport time\n"
                        "time.sleep(1)", memory_mb=128, timeout=20.0)
            assert r.status == "memory", r
    finally:
        for run in folder.glob("run-*"):
            run.rmdir()
        folder.rmdir()


def isolation_of(info):
    return sandbox._run(info, "print(1)", timeout=10.0, memory_mb=64, max_output=1000, stdin="", max_procs=4,
                        guard=True).isolation
