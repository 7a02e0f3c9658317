"""The sandbox child's bootstrap: trusted code that runs first in the child (as root when the caller is
root), sets up mounts and limits, drops privileges, installs the guard, then runs the untrusted program.

Standard library only (os, sys, resource, ctypes): picochat is not importable in the child. The parent
(picochat.sandbox) reads this file as text once and runs it with `python -s -S -B -X utf8 -c <text>`,
never by its path, so that the script's folder never lands on the child's sys.path and the new uid needs
no access to this file. Any change here changes what every sandboxed run starts with.

What it guards (see picochat/sandbox.py for the layers the parent adds around it):
    - its own root (ns=1): a tmpfs with read-only binds of only what the interpreter needs and a private
      /tmp, made the root with pivot_root; the host's tree is detached.
    - its own cgroup (cgroup=...), joined first: memory.max and pids.max bound the run as a whole.
    - a fresh session keyring, oom_score_adj 1000, nice 10.
    - seccomp (seccomp=1): the syscalls in _DENIED fail, as do clone with a CLONE_NEW* flag and clone3.
    - rlimits: CPU, address space, file size, open files, processes+threads, no core dumps, no mlock.
    - privileges: no_new_privs; a fresh uid/gid and no groups (uid >= 0), or every capability dropped
      inside a user namespace; the parent-death signal re-armed after the credential change.
    - PID 1 (ns=1): the program runs in a forked child; PID 1 reaps orphans and reports how it ended.
    - the guard (guard=1): denied os functions, writes outside the work dir, blocked imports. A speed
      bump against accidents, not a security boundary.

What it expects from the parent:
    - argv: key=value pairs, every one of them present:
        code      path of the program (read, then unlinked when uid != -1 or ns=1)
        stdin     path of the stdin file (unlinked with code)
        work      the program's cwd, created 0700 if missing (/tmp/sandbox under ns=1)
        uid       the uid/gid to switch to, or -1 to keep the caller's
        ns        1 inside fresh net/pid/mount/ipc/uts namespaces (and a user namespace unless root), else 0
        guard     1 to install the guard, else 0
        mem       RLIMIT_AS in MB;  cpu  RLIMIT_CPU in s (hard limit cpu+1);  nproc  RLIMIT_NPROC
        stage     an existing folder of the parent's where the new root is built (ns=1)
        seccomp   1 to install the seccomp filter (x86_64 and aarch64), else 0
        tmpfs_mb  size of the /tmp tmpfs (ns=1);  inodes  its file+folder cap
        cgroup    a cgroup v2 folder made for this run, joined before anything else, or - for none
    - env: the whole environment, built by the parent (no secrets; HOME and TMPDIR = work).
    - fds: 0 is the stdin file, 1 and 2 are the parent's pipes; nothing else is expected open.

What the parent gets back: the program's stdout and stderr; exit code 125 with "sandbox setup failed: ..."
on stderr if setup failed; 1 with a traceback of the program's own frames on an uncaught exception (a
one-line "MemoryError: ..." on MemoryError); under ns=1, 128+N and a final "\\n\\x00sandbox: signal N\\n"
on stderr when the program died of signal N; 137 if the parent died before the parent-death signal was
re-armed.
"""
import os
import sys
import resource

def _fail(msg):
    os.write(2, ("sandbox setup failed: " + msg + "\n").encode())
    os._exit(125)

# The namespace's file system: an empty tmpfs holding read-only binds of only what the interpreter needs (its
# stdlib, the system's shared libraries for extension modules, a few /dev nodes) and a private tmpfs on /tmp,
# made the root with pivot_root. The host's files, sockets (/run, /dev/log) and /proc are not there at all.
_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")
_FILES = ("/etc/ld.so.cache",)
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
# MS_* flags; a bind's remount must keep the source mount's locked flags (nosuid, nodev, noexec, atime),
# read here with statvfs, whose ST_* bits equal the MS_* bits but for relatime
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_KEPT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048  # ... | MS_NOATIME | MS_NODIRATIME
_ST_RELATIME, MS_RELATIME = 4096, 1 << 21
# syscall numbers for (x86_64, aarch64): the ones the bootstrap itself calls
_NR = {"pivot_root": (155, 41), "umount2": (166, 39), "keyctl": (250, 219)}

def _arch():
    m = os.uname().machine
    return 0 if m == "x86_64" else 1 if m == "aarch64" else None

def _setup(cfg):
    import ctypes
    import errno
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    def mount(src, dst, fstype, flags, data, *, what):
        if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                      data and data.encode()) != 0:
            _fail("%s: %s" % (what, os.strerror(ctypes.get_errno())))
    def syscall(name, *args):
        if libc.syscall(_NR[name][cfg["arch"]], *args) != 0:
            return ctypes.get_errno()
        return 0
    if cfg["cgroup"] != "-":  # the run's own cgroup (a folder under the operator's delegated one): first of all,
        try:                  # so that every process the code starts is counted against its memory.max and pids.max
            with open(cfg["cgroup"] + "/cgroup.procs", "w") as f:
                f.write("0")
        except OSError as e:
            _fail("joining the cgroup %s: %s" % (cfg["cgroup"], e.strerror))
    try:  # the OOM killer takes the sandbox before the server that holds the model
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    # a fresh session keyring: the caller's keys are no longer "possessed", so the code cannot read them
    if cfg["arch"] is not None:
        err = syscall("keyctl", ctypes.c_long(1), ctypes.c_void_p(0))  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
        if err and err not in (errno.ENOSYS, errno.EPERM):
            _fail("session keyring: " + os.strerror(err))
    uid = int(cfg["uid"])
    work = cfg["work"]
    if cfg["ns"] == "1":
        if cfg["arch"] is None:
            _fail("pivot_root: unknown architecture " + os.uname().machine)
        new = cfg["stage"]  # a folder of the parent's that exists; the tmpfs covers it in this namespace only
        mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=512,mode=0755", what="tmpfs root")
        binds = [p for p in _LIB_DIRS + _FILES if os.path.lexists(p)]
        binds += [p for p in sys.path if os.path.isdir(p) and not any(p.startswith(b + "/") for b in binds)]
        binds += ["/dev/" + n for n in _DEV_NODES if os.path.exists("/dev/" + n)]
        for path in binds:
            dst = new + path
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems
                os.symlink(os.readlink(path), dst)
                continue
            if os.path.isdir(path):
                os.makedirs(dst, 0o755, exist_ok=True)
            else:
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(path, dst, None, MS_BIND, None, what="bind " + path)
            st = os.statvfs(path)
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (st.f_flag & _KEPT_FLAGS)
            flags |= MS_RELATIME if st.f_flag & _ST_RELATIME else 0
            mount(None, dst, None, flags, None, what="read-only remount of " + path)
            if not os.statvfs(dst).f_flag & MS_RDONLY:
                _fail("%s is still writable" % path)
        os.mkdir(new + "/tmp", 0o1777)
        mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
              "size=%sm,nr_inodes=%s,mode=1777" % (cfg["tmpfs_mb"], cfg["inodes"]), what="tmpfs on /tmp")
        os.mkdir(new + "/.old", 0o700)
        err = syscall("pivot_root", new.encode(), (new + "/.old").encode())
        if err:
            _fail("pivot_root: " + os.strerror(err))
        os.chdir("/")
        err = syscall("umount2", b"/.old", ctypes.c_int(2))  # MNT_DETACH: the host's tree is gone from here
        if err:
            _fail("detaching the old root: " + os.strerror(err))
        os.rmdir("/.old")
        mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None, what="read-only root")
        if not os.statvfs("/").f_flag & MS_RDONLY:
            _fail("root file system is still writable")
    if not os.path.isdir(work):
        os.mkdir(work, 0o700)
    if uid >= 0:
        os.chown(work, uid, uid)
    os.chmod(work, 0o700)
    os.chdir(work)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing
        _fail("no_new_privs")
    return libc

def _limits(cfg):
    mb = 1 << 20
    cpu = int(cfg["cpu"])
    for res, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                     (resource.RLIMIT_AS, (int(cfg["mem"]) * mb,) * 2),
                     (resource.RLIMIT_FSIZE, (16 * mb,) * 2),
                     (resource.RLIMIT_NOFILE, (256, 256)),
                     (resource.RLIMIT_NPROC, (int(cfg["nproc"]),) * 2),
                     (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_MEMLOCK, (0, 0))):
        try:
            resource.setrlimit(res, val)
        except (ValueError, OSError) as e:
            _fail("setrlimit %s: %s" % (res, e))

def _drop(cfg, libc):
    import ctypes
    uid = int(cfg["uid"])
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            _fail("setuid")
    elif os.geteuid() == 0 and cfg["ns"] == "1":
        # unprivileged caller inside a user namespace: we are "root" there; drop every capability
        # so the code cannot undo the read-only mounts
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(hdr, data) != 0:
            _fail("capset")
    # the credential change cleared the parent-death signal: re-arm it (the parent is unshare or
    # the caller), so the code dies with its parent even if it left our process group
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != cfg["ppid"]:  # the parent died before the re-arm
        os._exit(137)
    if cfg["seccomp"] == "1":
        _seccomp(libc, cfg["arch"])

# The seccomp filter: syscalls the code has no business making, for (x86_64, aarch64). They fail with EPERM:
# new namespaces (the code would be root in a nested user namespace), mounts, keys, BPF, io_uring (its own
# syscall path), userfaultfd, perf, ptrace and reading other processes, kernel modules, and creating sockets
# (AF_VSOCK and AF_UNIX paths are outside what the network namespace covers). clone with a CLONE_NEW* flag
# fails with EPERM; clone3, whose flags a filter cannot read, with ENOSYS, so libc falls back to clone.
_DENIED = {"socket": (41, 198), "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40),
           "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "keyctl": (250, 219),
           "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280), "io_uring_setup": (425, 425),
           "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "userfaultfd": (323, 282),
           "perf_event_open": (298, 241), "ptrace": (101, 117), "process_vm_readv": (310, 270),
           "process_vm_writev": (311, 271), "open_tree": (428, 428), "move_mount": (429, 429),
           "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
           "mount_setattr": (442, 442), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
           "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
           "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265), "acct": (163, 89),
           "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "sethostname": (170, 161),
           "setdomainname": (171, 162), "quotactl": (179, 60), "syslog": (103, 116), "pidfd_getfd": (438, 438)}
_CLONE, _CLONE3 = (56, 220), (435, 435)
_AUDIT_ARCH = (0xC000003E, 0xC00000B7)
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

def _seccomp(libc, arch):
    import ctypes
    import errno
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    deny = (RET, 0, 0, ERRNO | errno.EPERM)
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, _AUDIT_ARCH[arch]), (RET, 0, 0, KILL),  # another ABI (i386 on x86_64)
            (LD, 0, 0, 0)]
    if arch == 0:
        prog += [(JGE, 0, 1, 0x40000000), deny]  # the x32 ABI's numbers
    for nrs in _DENIED.values():
        prog += [(JEQ, 0, 1, nrs[arch]), deny]
    prog += [(JEQ, 0, 1, _CLONE3[arch]), (RET, 0, 0, ERRNO | errno.ENOSYS)]
    prog += [(JEQ, 0, 3, _CLONE[arch]), (LD, 0, 0, 16), (JSET, 0, 1, _CLONE_NEW), deny]  # 16: args[0], low half
    prog += [(RET, 0, 0, ALLOW)]
    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        _fail("seccomp: " + os.strerror(ctypes.get_errno()))

def _paths():
    # the interpreter may live where the new uid cannot reach (pyenv under /root, mode 0700): keep the
    # stdlib importable through directory fds opened while still privileged
    fds = {}
    for p in sys.path:
        if p and os.path.isdir(p):
            fds[p] = "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    return fds

def _repath(fds):
    # sys.path and the packages imported so far (encodings, ...) must find submodules via the fds
    sys.path[:] = list(fds.values())
    sys.path_importer_cache.clear()
    def moved(path):
        for old, new in fds.items():
            if path == old or path.startswith(old + "/"):
                return new + path[len(old):]
        return path
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__path__", None)
        if isinstance(path, list):
            path[:] = [moved(p) for p in path]

def _guard(allowed):
    import builtins
    import io
    import posix
    os_ = os
    real = os.path.realpath
    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True
        path = os_.fsdecode(path)
        if dir_fd is not None and not os_.path.isabs(path):
            path = os_.path.join(os_.readlink("/proc/self/fd/%d" % dir_fd), path)
        p = real(path)
        return p == os_.devnull or any(p == a or p.startswith(a + "/") for a in allowed)
    def deny(name):
        def denied(*args, **kwargs):
            raise PermissionError("%s is disabled in the sandbox" % name)
        return denied
    for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
                 "setresuid", "setresgid", "setgroups", "chroot", "setns", "unshare", "pidfd_open",
                 "plock"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, deny("os." + name))
    def checked(name, fn, npaths=1):
        def wrapper(*args, **kwargs):
            for p in args[:npaths]:
                if not inside(p, kwargs.get("dir_fd", kwargs.get("src_dir_fd"))):
                    raise PermissionError("%s outside the sandbox dir: %r" % (name, p))
            return fn(*args, **kwargs)
        return wrapper
    for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("rename", 2),
                    ("renames", 2), ("replace", 2), ("truncate", 1), ("chmod", 1), ("lchmod", 1),
                    ("chown", 1), ("lchown", 1), ("link", 2), ("symlink", 2), ("mkdir", 1),
                    ("makedirs", 1), ("utime", 1), ("mkfifo", 1), ("mknod", 1)):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, checked("os." + name, getattr(mod, name), n))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            raise PermissionError("writing outside the sandbox dir: %r" % (path,))
        return real_os_open(path, flags, *args, **kwargs)
    os.open = posix.open = guarded_os_open
    real_open = io.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("writing outside the sandbox dir: %r" % (file,))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open
    for name in ("socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "subprocess",
                 "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "mmap",
                 "resource", "fcntl", "termios", "_posixshmem", "asyncio", "ipdb", "pdb", "psutil",
                 "tkinter", "webbrowser", "urllib.request", "http.client", "ftplib", "smtplib"):
        sys.modules[name] = None

def _init():
    # we are PID 1 of the namespace, which the kernel shields from signals sent from inside it (the
    # code could not even SIGKILL itself, and SIGXCPU would be ignored): run the code in a child with
    # ordinary signal semantics, reap orphans, and report how the code ended; when we exit, the kernel
    # kills everything left in the namespace
    pid = os.fork()
    if pid == 0:
        return
    os.close(0)
    os.close(1)
    while True:
        try:
            p, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if p == pid:
            break
    if os.WIFSIGNALED(status):
        os.write(2, b"\n\x00sandbox: signal %d\n" % os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))

def _run(cfg):
    with open(cfg["code"], "rb") as f:
        source = f.read()
    if cfg["uid"] != "-1" or cfg["ns"] == "1":
        try:
            os.unlink(cfg["code"])  # not the code's to read back (and gone before the uid drop)
            os.unlink(cfg["stdin"])
        except OSError:
            pass
    cfg["ppid"] = os.getppid()
    cfg["arch"] = _arch()
    # without namespaces the new uid may not reach the interpreter's folders: keep them open. Never with a
    # new root: a folder fd from the old root would lead back into the host's tree with openat(fd, "..")
    paths = _paths() if cfg["ns"] != "1" else None
    libc = _setup(cfg)
    _limits(cfg)
    _drop(cfg, libc)
    del libc
    if paths:
        _repath(paths)
    if cfg["ns"] == "1":
        _init()
    if cfg["guard"] == "1":
        _guard([cfg["work"], os.path.realpath(cfg["work"])] + (["/tmp"] if cfg["ns"] == "1" else []))
    sys.stdout.reconfigure(line_buffering=True)  # a killed run still returns what it printed
    main = type(sys)("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["<sandbox>"]
    try:
        code = compile(source, "<sandbox>", "exec")
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except MemoryError:
        # no traceback: formatting one may need the memory we just ran out of
        _flush()
        os.write(2, b"MemoryError: out of memory (address-space limit)\n")
        os._exit(1)
    except BaseException as e:
        _flush()
        try:  # the code's own frames only, with its source lines
            import linecache
            import traceback
            source_lines = source.decode("utf-8", "replace").splitlines(True)
            linecache.cache["<sandbox>"] = (len(source), None, source_lines, "<sandbox>")
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            sys.stderr.flush()
        except BaseException:
            os.write(2, ("%s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
        os._exit(1)  # like an uncaught exception, without waiting on threads the code left running

def _flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass

if __name__ == "__main__":  # run with -c by the parent; importing it runs nothing
    _run(dict(a.split("=", 1) for a in sys.argv[1:]))
