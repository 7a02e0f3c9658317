"""Run untrusted Python (the chat model's tool calls, HumanEval completions + tests) in a separate
process with limits.

    run_python(code, timeout=5.0, memory_mb=512, max_output=64_000, stdin="") -> SandboxResult

Every run is a fresh `python -s -S -B` child (no site-packages, no user site; -I is not used because
we build the child's whole environment ourselves, and -E would drop PYTHONHASHSEED=0) that first runs
a small trusted bootstrap, then the untrusted code (only the standard library is importable). Safe to
call from many threads at once: the parent enforces the wall clock with a kill (no SIGALRM anywhere in
the caller), and each run has its own process group, temp dir and (as root) its own user id.

SandboxResult.status: "ok" (exit 0), "error" (an exception or a non-zero exit; reason is the
exception's last line), "timeout" (wall clock or CPU), "memory" (MemoryError under RLIMIT_AS),
"output_limit", "crashed" (SIGSEGV/SIGABRT/...), "killed" (another signal), "setup_error" (the
sandbox itself could not start).

What is contained, in layers (`sandbox_info()` says which layers this machine gives and whether that makes
the sandbox "strong" or "weak"; `describe_sandbox()` says it in one line; `run_python` picks the strongest,
probing once):

  always (any user, any Linux):
    - wall time: the parent kills the whole process group at `timeout` (then sweeps by uid, see below).
    - CPU time: RLIMIT_CPU = ceil(timeout)+1 s (backstop if the parent itself dies).
    - memory: RLIMIT_AS = memory_mb per process; a big allocation gives MemoryError -> status "memory".
    - file size RLIMIT_FSIZE (16 MB), open files RLIMIT_NOFILE (256), core dumps off, no mlock.
    - output: stdout and stderr are each capped at `max_output` bytes; past that the run is killed
      (status "output_limit"), so a print loop cannot fill the caller's memory.
    - environment: only PATH, LANG/LC_ALL, HOME and TMPDIR (inside the sandbox dir), USER, PYTHONHASHSEED=0
      and a few PYTHON*/MALLOC settings; the parent's secrets are not passed.
    - a fresh session keyring: keys in the caller's session keyring are not the code's to read.
    - oom_score_adj 1000 and nice 10: under memory pressure the kernel kills the sandbox, not the server
      holding the model, and the code yields the CPU to it.
    - cwd: a private temp dir, deleted afterwards; no_new_privs (setuid binaries give nothing).
    - a guard inside the child (on by default, `guard=False` turns it off to test the real
      containment): imports of socket/ctypes/subprocess/multiprocessing/... fail; os.system, fork,
      exec*, spawn*, kill, setuid... raise PermissionError; writes, deletes, renames, chmods outside
      the sandbox dir raise PermissionError. It is a speed bump against accidents, NOT a security
      boundary: pure Python can get around it. The layers below are the containment.
  on x86_64 and aarch64 (seccomp; see _DENIED in sandbox_child.py): no sockets of any family (AF_VSOCK and
    AF_UNIX included), no new namespaces, no mounts, no keyctl, bpf, io_uring, userfaultfd, perf_event_open,
    ptrace or reads of other processes' memory, no kernel modules. Another syscall ABI (i386, x32) is refused.
  as root:
    - a fresh unprivileged uid/gid per run (random in [_UID_BASE, _UID_BASE + 2^20), no groups, held with an
      flock so that no other process on the machine draws it at the same time): the code cannot touch root's
      files or other sandboxes' processes, and RLIMIT_NPROC (default 64 processes+threads) is enforced (the
      kernel does not enforce it for root, and a uid shared by concurrent runs would let one run's fork bomb
      starve the others). After the run every live process of that uid is killed (fork bombs that called
      setsid() to leave the process group included).
  when namespaces work (root, or an unprivileged user where user namespaces are enabled; via util-linux
  `unshare`):
    - its own root: an empty tmpfs holding read-only binds of only the interpreter's stdlib folders, the
      system's shared-library folders (/lib, /usr/lib, ...: extension modules load from them), /etc/ld.so.cache
      and /dev/{null,zero,full,random,urandom}, plus a private tmpfs on /tmp (min(memory_mb, 256) MB and 4,096
      inodes; the code runs in /tmp/sandbox), made the root with pivot_root. The host's files (the repository,
      checkpoints, /etc, /home), its sockets (/run, /dev/log) and /proc and /sys are not there at all.
    - network namespace: no interfaces but a down loopback (and no socket() anyway, above).
    - PID namespace: a tiny init (the bootstrap) is PID 1 and the code runs as its child, so it sees
      only its own processes, keeps ordinary signal semantics, and when it exits or is killed the init
      exits and the kernel kills every process the code left behind.
    - IPC and UTS namespaces (System V IPC, hostname).
    - as an unprivileged user (no uid to switch to) the code keeps the caller's uid inside a user
      namespace with all capabilities dropped after setup; everything above still holds.

"strong" = namespaces and seccomp. `serve` runs the model's tool calls only in a strong sandbox unless it is
given --allow-weak-sandbox; chat, RL and the evals say which one they have.

What is NOT contained (know this before exposing it to strangers):
    - total memory, unless a cgroup is delegated: RLIMIT_AS is per process, so with forks the worst case is
      RLIMIT_NPROC x memory_mb (the calculator tool: 4 x 128 MB). Set PICOCHAT_SANDBOX_CGROUP to a cgroup v2
      folder delegated to this user (e.g. systemd's Delegate=yes, or `mkdir /sys/fs/cgroup/picochat` as root
      with +memory +pids in the parent's cgroup.subtree_control) and each run gets its own cgroup there:
      memory.max = memory_mb for all its processes and its /tmp together, no swap, pids.max = max_procs, and
      cgroup.kill at the end. A folder that is not a writable cgroup v2 one stops the sandbox with an error.
    - CPU share: a run can use every core (at nice 10) until its limits hit (no cgroup cpu quota).
    - kernel attack surface beyond the seccomp list: a kernel exploit through an allowed syscall escapes.
    - in the weak sandbox (no namespaces: no unshare(1), or namespaces disallowed, as in Docker without
      CAP_SYS_ADMIN; `PICOCHAT_SANDBOX=basic` forces it, `=ns` demands namespaces): the code can read every
      world-readable file (the repository, /etc, /proc, where the server's command line is), world-writable
      dirs (/tmp, /var/tmp, /dev/shm) are writable (as its own uid when root), and a process that leaves the
      process group survives cleanup unless we are root (uid sweep).
    - if the caller is SIGKILLed mid-run: with namespaces everything dies (PR_SET_PDEATHSIG on unshare
      via setpriv(1), re-armed by the bootstrap on PID 1); without them the code dies but processes
      it moved to their own session survive until RLIMIT_CPU or their own end. Either way its empty
      temp dir (picochat-sbx-*) stays behind.
    - zombies: processes killed on timeout are reaped by the system's init, not by us.
"""
import os
import re
import sys
import math
import stat
import time
import fcntl
import itertools
import platform
import random
import shutil
import signal
import tempfile
import threading
import selectors
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UID_BASE = 1_500_000_000   # per-run uids live far above any real account (no passwd entry needed)
_UID_LOCK_DIR = "/tmp/picochat-sandbox-uids"
_CHILD_DIR = "/tmp/sandbox"  # the code's cwd and HOME inside the mount namespace (a private tmpfs)
_SETUP_FAILED = 125          # bootstrap exit code: the sandbox itself could not be set up
_MAX_PROCS = 64              # run_python's default RLIMIT_NPROC (processes + threads)
_TMPFS_MAX_MB, _TMPFS_INODES = 256, 4096  # the private /tmp: at most this size (and memory_mb), files+folders
# the namespace probe: one tiny run; a generous wall clock, so a slow machine is not taken for one
# without namespaces
_PROBE_TIMEOUT, _PROBE_MEMORY_MB, _PROBE_MAX_OUTPUT = 10.0, 256, 1000


@dataclass
class SandboxResult:
    status: str          # ok | error | timeout | memory | output_limit | crashed | killed | setup_error
    stdout: str
    stderr: str
    returncode: int | None   # exit code, or -signal; None if we never got one
    reason: str          # why it stopped, in words ("" when status is ok)
    wall_time: float     # seconds, spawn to cleanup
    cpu_time: float = 0.0
    isolation: str = ""  # the layers this run had, e.g. "uid,netns,pidns,mntns,ro-fs,rlimits,guard"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# -----------------------------------------------------------------------------
# The bootstrap: trusted code that runs first in the child, as root when we are root. It reads the
# program, sets up mounts and limits, drops privileges, installs the guard, then runs the program.
# It imports only os, sys, resource and ctypes, so a run starts fast. Its contract is at the
# top of sandbox_child.py; it is passed as text with -c, never by path (see there why).

_BOOTSTRAP = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")

# -----------------------------------------------------------------------------
# Probing what this machine gives (once, thread-safe: other callers wait for the probe)

_probe_lock = threading.Lock()
_probe_result = None
_uid_lock = threading.Lock()
_uids_in_use = set()


def sandbox_info() -> dict:
    """What containment this machine gives, detected once at first use with real sandboxed runs, strongest
    first. Keys: mode ("strong": namespaces with the minimal root, and seccomp; else "weak"), root,
    namespaces, seccomp, unshare, setpriv, cgroup (the delegated folder or None) and cgroup_limits (of
    "memory", "pids": what bounds each run as a whole), note (why a layer is missing)."""
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    with _probe_lock:
        if _probe_result is not None:
            return _probe_result
        root = os.geteuid() == 0
        cgroup, cgroup_limits = _cgroup_root()
        info = {"root": root, "namespaces": False, "seccomp": False, "setpriv": None,
                "unshare": shutil.which("unshare"), "cgroup": cgroup, "cgroup_limits": cgroup_limits, "note": ""}
        setpriv = shutil.which("setpriv")
        if setpriv:  # --pdeathsig needs util-linux >= 2.33
            try:
                r = subprocess.run([setpriv, "--pdeathsig", "KILL", "true"], capture_output=True, timeout=10)
                info["setpriv"] = setpriv if r.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                pass
        mode = os.environ.get("PICOCHAT_SANDBOX", "auto")
        notes = []
        if mode == "basic":
            notes.append("PICOCHAT_SANDBOX=basic")
        elif not info["unshare"]:
            notes.append("unshare(1) not found")
        seccomps = [True, False] if platform.machine() in ("x86_64", "aarch64") else [False]
        if not seccomps[0]:
            notes.append(f"no seccomp filter for {platform.machine()}")
        for ns, sc in [(ns, sc) for ns in ([True] if mode != "basic" and info["unshare"] else []) + [False]
                       for sc in seccomps]:
            r = _run(info | {"namespaces": ns, "seccomp": sc}, "print(6 * 7)", timeout=_PROBE_TIMEOUT,
                     memory_mb=_PROBE_MEMORY_MB, max_output=_PROBE_MAX_OUTPUT, stdin="", max_procs=_MAX_PROCS,
                     guard=True)
            if r.status == "ok" and r.stdout.strip() == "42":
                info["namespaces"], info["seccomp"] = ns, sc
                break
            notes.append(f"{'namespaces' if ns else 'basic'}{' + seccomp' if sc else ''} failed: {r.status}: "
                         f"{(r.reason or r.stderr).strip()[:300]}")
        info["mode"] = "strong" if info["namespaces"] and info["seccomp"] else "weak"
        info["note"] = "; ".join(notes)
        if mode == "ns" and not info["namespaces"]:
            raise RuntimeError(f"PICOCHAT_SANDBOX=ns but {info['note']}")
        _probe_result = info
        return info


def describe_sandbox() -> str:
    """One line for a command's start: what the Python tool's sandbox gives on this machine."""
    info = sandbox_info()
    if info["mode"] == "strong":
        return ("sandbox: strong (" + ("fresh uid, " if info["root"] else "") +
                "own root with only the Python install, no network, seccomp, namespaces" +
                "".join(f", cgroup {c}.max" for c in info["cgroup_limits"]) + ")")
    return ("sandbox: WEAK, code the model writes can read world-readable files" +
            ("" if info["namespaces"] else ", reach the network through the guard's gaps") +
            f" ({info['note'] or 'no seccomp'})")


def _uid_lock_dir() -> str:
    """A folder only root can write, shared by every process on this machine that runs sandboxes (a fixed path:
    processes with different TMPDIRs must still see each other's locks)."""
    path = _UID_LOCK_DIR
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a folder of root's with mode 0700: refusing to trust its uid locks")
    return path


def _alloc_uid():
    """A uid no other run on this machine holds, in this process or another (two RL ranks, an eval beside a
    server): each run holds an flock on <lock dir>/<uid> while it lives. Returns (uid, fd)."""
    folder = _uid_lock_dir()
    while True:
        uid = _UID_BASE + random.randrange(1 << 20)
        with _uid_lock:
            if uid in _uids_in_use:
                continue
            path = os.path.join(folder, str(uid))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:  # not unlinked meanwhile
                    _uids_in_use.add(uid)
                    return uid, fd
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)


def _free_uid(uid: int, fd: int):
    with _uid_lock:
        try:  # unlink before unlocking: whoever opened the old file sees it unlinked and draws again
            os.unlink(os.path.join(_uid_lock_dir(), str(uid)))
        except OSError:
            pass
        os.close(fd)
        _uids_in_use.discard(uid)


def _cgroup_root():
    """The cgroup v2 folder the operator delegated to sandbox runs ($PICOCHAT_SANDBOX_CGROUP), or None when unset;
    and which of the memory and pids controllers its children get (enabled here when the folder allows it).
    Raises RuntimeError when the variable names anything but a writable cgroup v2 folder: asked for a bound, a run
    should not start without it."""
    path = os.environ.get("PICOCHAT_SANDBOX_CGROUP", "")
    if not path:
        return None, []
    if not os.path.isfile(os.path.join(path, "cgroup.controllers")) or not os.access(path, os.W_OK | os.X_OK):
        raise RuntimeError(f"PICOCHAT_SANDBOX_CGROUP={path} is not a writable cgroup v2 folder")
    subtree = os.path.join(path, "cgroup.subtree_control")
    available = set(Path(path, "cgroup.controllers").read_text().split())
    missing = ({"memory", "pids"} & available) - set(Path(subtree).read_text().split())
    if missing:
        try:  # refused when the folder holds processes itself (cgroup v2's no-internal-process rule)
            Path(subtree).write_text(" ".join("+" + c for c in sorted(missing)))
        except OSError:
            pass
    return path, sorted({"memory", "pids"} & set(Path(subtree).read_text().split()))


_cgroup_count = itertools.count()


def _cgroup_make(root, *, memory_mb, max_procs):
    """A fresh cgroup for one run under root, with memory.max = memory_mb for all its processes together (the
    /tmp tmpfs included) and no swap, and pids.max = max_procs, where those controllers are enabled."""
    path = os.path.join(root, f"run-{os.getpid()}-{next(_cgroup_count)}")
    os.mkdir(path)
    for name, value in (("memory.max", memory_mb << 20), ("memory.swap.max", 0), ("pids.max", max_procs)):
        if os.path.exists(os.path.join(path, name)):
            Path(path, name).write_text(str(value))
    return path


def _cgroup_remove(path) -> bool:
    """Kill whatever is left in a run's cgroup (cgroup.kill reaches processes that left the process group and the
    uid sweep's view alike), remove it, and say whether the kernel's OOM killer acted in it."""
    try:
        events = Path(path, "memory.events").read_text().split()
        oom = int(events[events.index("oom_kill") + 1]) > 0
    except (OSError, ValueError, IndexError):
        oom = False
    try:
        Path(path, "cgroup.kill").write_text("1")
    except OSError:
        pass
    for _ in range(300):  # the kill is asynchronous: the folder empties within moments
        try:
            os.rmdir(path)
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.01)
    return oom


# -----------------------------------------------------------------------------
# Finding and killing whatever a run left behind

def _proc_table():
    """(pid, state, uid, pgid, threads) of every process, from /proc/*/status (readable for all)."""
    rows = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                text = f.read().decode("ascii", "replace")
        except OSError:
            continue
        state, uid, pgid, threads = "?", -1, -1, 1
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key == "State":
                state = val.split()[0]
            elif key == "Uid":
                uid = int(val.split()[0])
            elif key == "NSpgid":
                pgid = int(val.split()[0])
            elif key == "Threads":
                threads = int(val.split()[0])
        rows.append((int(name), state, uid, pgid, threads))
    return rows


def _survivors(pgid: int, uid: int) -> list:
    """Live (non-zombie) processes in process group pgid or owned by uid (uid < 0: group only)."""
    return [pid for pid, state, puid, ppgid, _ in _proc_table()
            if state not in ("Z", "X") and (ppgid == pgid or (uid >= 0 and puid == uid))]


def _kill_all(pgid: int, uid: int, limit: float = 3.0):
    """SIGKILL the process group and every process of the run's uid until none is left alive."""
    deadline = time.monotonic() + limit
    delay = 0.001
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        left = _survivors(pgid, uid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not left or time.monotonic() > deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _exited(pid: int) -> bool:
    """Has the child exited? Without reaping it (we reap with wait4 to get its CPU time)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# -----------------------------------------------------------------------------
# The public API

def _child_env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": home, "TMPDIR": home, "USER": "sandbox", "LOGNAME": "sandbox",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "MALLOC_ARENA_MAX": "2"}  # each malloc arena reserves 64 MB of the address-space limit


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 64_000,
               stdin: str = "", *, max_procs: int = _MAX_PROCS, guard: bool = True) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process and return what happened; never
    raises for anything the code does. max_procs bounds processes+threads (RLIMIT_NPROC); guard=False
    removes the in-child guard (to test the real containment)."""
    return _run(sandbox_info(), code, timeout=timeout, memory_mb=memory_mb, max_output=max_output, stdin=stdin,
                max_procs=max_procs, guard=guard)


def _run(info, code, *, timeout, memory_mb, max_output, stdin, max_procs, guard) -> SandboxResult:
    """run_python with the containment given by info (sandbox_info() or a variant of it, e.g. namespaces
    off); every limit is explicit, the defaults live in run_python."""
    t0 = time.monotonic()
    ns, root, seccomp = info["namespaces"], info["root"], info["seccomp"]
    layers = (["uid"] if root else []) + (["netns", "pidns", "mntns", "own-root"] if ns else [])
    isolation = ",".join(layers + (["seccomp"] if seccomp else []) + (["cgroup"] if info.get("cgroup") else []) +
                         ["rlimits"] + (["guard"] if guard else []))
    try:  # never raises for what it is given: text the child could not read is the code's error
        code_bytes, stdin_bytes = code.encode("utf-8"), stdin.encode("utf-8")
    except UnicodeEncodeError as e:
        return SandboxResult("error", "", "", None, f"the program or its stdin is not valid text: {e.reason}",
                             time.monotonic() - t0, isolation=isolation)
    uid, uid_fd = _alloc_uid() if root else (-1, None)
    workdir = tempfile.mkdtemp(prefix="picochat-sbx-")  # 0700, ours: holds the program and its stdin
    child_dir = _CHILD_DIR if ns else workdir
    cpu = int(math.ceil(timeout)) + 1
    nproc = max_procs
    if not root:  # RLIMIT_NPROC counts every task of our own uid, not just the sandbox's
        nproc += sum(t for _, _, u, _, t in _proc_table() if u == os.getuid())
    proc = None
    out, err = bytearray(), bytearray()
    timed_out = overflow = False
    returncode, cpu_time = None, 0.0
    cgroup, oom = None, False
    try:
        if info.get("cgroup"):
            try:
                cgroup = _cgroup_make(info["cgroup"], memory_mb=memory_mb, max_procs=max_procs)
            except OSError as e:
                return SandboxResult("setup_error", "", "", None, f"could not make the run's cgroup: {e}",
                                     time.monotonic() - t0, isolation=isolation)
        code_path, stdin_path = os.path.join(workdir, "main.py"), os.path.join(workdir, "stdin")
        with open(code_path, "wb") as f:
            f.write(code_bytes)
        with open(stdin_path, "wb") as f:
            f.write(stdin_bytes)
        cfg = {"code": code_path, "stdin": stdin_path, "work": child_dir, "stage": workdir, "uid": uid,
               "ns": int(ns), "seccomp": int(seccomp), "guard": int(guard), "mem": memory_mb, "cpu": cpu,
               "nproc": nproc, "tmpfs_mb": min(memory_mb, _TMPFS_MAX_MB), "inodes": _TMPFS_INODES,
               "cgroup": cgroup or "-"}
        cmd = _command(info, cfg)
        with open(stdin_path, "rb") as stdin_file:
            try:
                proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=_child_env(child_dir), cwd=workdir, start_new_session=True)
            except OSError as e:
                return SandboxResult("setup_error", "", "", None, f"could not start the sandbox: {e}",
                                     time.monotonic() - t0, isolation=isolation)
        pgid = proc.pid  # start_new_session: the child leads its own session and process group
        timed_out, overflow, lingered = _collect(proc, out, err, deadline=t0 + timeout, max_output=max_output)
        if timed_out or overflow or lingered or not ns:
            # without a PID namespace, anything the code started may still run: kill the group and
            # (as root) every process of the run's uid; with one, killing PID 1 takes the namespace down
            _kill_all(pgid, uid)
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = returncode = os.waitstatus_to_exitcode(status)
        cpu_time = rusage.ru_utime + rusage.ru_stime
    finally:
        if proc is not None:
            proc.stdout.close()
            proc.stderr.close()
            if proc.returncode is None:  # an exception on our side: leave nothing running
                _kill_all(proc.pid, uid)
                try:
                    os.waitpid(proc.pid, 0)
                except ChildProcessError:
                    pass
                proc.returncode = -signal.SIGKILL
        shutil.rmtree(workdir, ignore_errors=True)
        if cgroup:
            oom = _cgroup_remove(cgroup)
        if uid >= 0:
            _free_uid(uid, uid_fd)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if ns and returncode is not None:
        returncode, stderr = _ns_exit(returncode, stderr)
    status, reason = _classify(returncode, stderr, timed_out, overflow, timeout=timeout, cpu_limit=cpu,
                               cpu_time=cpu_time, memory_mb=memory_mb, max_output=max_output)
    if oom and status not in ("ok", "timeout", "output_limit"):
        status, reason = "memory", f"killed by the kernel: the run's cgroup memory.max ({memory_mb} MB) was reached"
    return SandboxResult(status, stdout, stderr, returncode, reason, time.monotonic() - t0, cpu_time, isolation)


def _command(info, cfg) -> list:
    """The child's command line: the bootstrap with its settings (cfg) as key=value arguments, inside unshare(1)
    when info has namespaces, under setpriv(1) when info has it."""
    cmd = [sys.executable, "-s", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP]
    cmd += [f"{k}={v}" for k, v in cfg.items()]
    if info["namespaces"]:
        cmd = [info["unshare"]] + ([] if info["root"] else ["--user", "--map-root-user"]) + [
            "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"] + cmd
    if info["setpriv"]:  # the whole tree dies if this (calling) thread's process dies
        cmd = [info["setpriv"], "--pdeathsig", "KILL"] + cmd
    return cmd


def _collect(proc, out, err, *, deadline, max_output):
    """Read the child's stdout and stderr into out and err (bytearrays, each cut at max_output bytes) until it
    has exited and closed both pipes, the deadline passes, or the output overflows. Returns (timed_out, overflow,
    lingered): lingered is set when something the program started still held the pipes 0.2 s after it exited."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable when the child exits: no polling
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    timed_out = overflow = False
    open_fds, exited, lingered = set(bufs), False, None
    try:
        while not (exited and not open_fds):
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            wait = deadline - now
            if exited:  # the program is gone but something it started still holds the pipes
                lingered = lingered or now + 0.2
                if now >= lingered:
                    break
                wait = min(wait, lingered - now)
            elif pidfd is None:
                wait = min(wait, 0.02)
            for key, _ in sel.select(wait):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                    exited = True
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk
                if len(buf) > max_output:
                    del buf[max_output:]
                    overflow = True
            if overflow:
                break
            if pidfd is None and not exited:
                exited = _exited(proc.pid)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    return timed_out, overflow, lingered


_SIGNAL_NOTE = re.compile(r"\n?\x00sandbox: signal (\d+)\n$")
_UNSHARE_SIGKILL = re.compile(r"\n?unshare: sigprocmask unblock failed: [^\n]*\n?$")


def _ns_exit(rc, stderr):
    """In a PID namespace the code's fate comes from our PID 1 (a note on stderr) or from unshare,
    which cannot re-raise SIGKILL on itself and says so instead."""
    m = _SIGNAL_NOTE.search(stderr)
    if m and rc == 128 + int(m.group(1)):
        return -int(m.group(1)), stderr[:m.start()]
    m = _UNSHARE_SIGKILL.search(stderr)
    if m and rc == 1:
        return -signal.SIGKILL, stderr[:m.start()]
    return rc, stderr


def _classify(rc, stderr, timed_out, overflow, *, timeout, cpu_limit, cpu_time, memory_mb, max_output):
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout:g} s exceeded"
    if overflow:
        return "output_limit", f"output exceeded {max_output} bytes"
    last = _last_line(stderr)
    if rc == 0:
        return "ok", ""
    if rc == _SETUP_FAILED and stderr.startswith("sandbox setup failed"):
        return "setup_error", last
    if last.startswith("MemoryError"):
        return "memory", f"MemoryError (address-space limit {memory_mb} MB)"
    if rc is not None and rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_time >= cpu_limit - 0.5):
            return "timeout", f"CPU time limit exceeded ({name}; the limit is {cpu_limit} s)"
        if sig in (signal.SIGABRT, signal.SIGSEGV) and ("MemoryError" in stderr or "memory" in last.lower()):
            return "memory", f"out of memory ({name}, address-space limit {memory_mb} MB)"
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS):
            return "crashed", f"crashed with {name}"
        if sig == signal.SIGXFSZ:
            return "error", "file size limit exceeded (SIGXFSZ)"
        return "killed", f"killed by {name}"
    return "error", last or f"exit code {rc}"
