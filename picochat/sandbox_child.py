"""The sandbox child's bootstrap: trusted code that runs first in the child (as root when the caller is
root), sets up mounts and limits, drops privileges, installs the guard, then runs the untrusted program.

Standard library only (os, sys, resource, ctypes): picochat is not importable in the child. The parent
(picochat.sandbox) reads this file as text once and runs it with `python -s -S -B -X utf8 -c <text>`,
never by its path, so that the script's folder never lands on the child's sys.path and the new uid needs
no access to this file. Any change here changes what every sandboxed run starts with.

What it guards (see picochat/sandbox.py for the layers the parent adds around it):
    - mounts (ns=1): every mount read-only, a fresh tmpfs on /tmp, a tmpfs over the caller's home (hide).
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
        tmpfs_mb  size of the /tmp tmpfs (ns=1);  hide  a folder to cover with a tmpfs, or empty
    - env: the whole environment, built by the parent (no secrets; HOME and TMPDIR = work).
    - fds: 0 is the stdin file, 1 and 2 are the parent's pipes; nothing else is expected open.

What the parent gets back: the program's stdout and stderr; exit code 125 with "sandbox setup failed: ..."
on stderr if setup failed; 1 with a traceback of the program's own frames on an uncaught exception (a
one-line "MemoryError: ..." on MemoryError); under ns=1, 128+N and a final "\\n\\x00sandbox: signal N\\n"
on stderr when the program died of signal N; 137 if the parent died before the parent-death signal was
re-armed.
"""
import os, sys, resource

def _fail(msg):
    os.write(2, ("sandbox setup failed: " + msg + "\n").encode())
    os._exit(125)

def _setup(cfg):
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src, dst, fstype, flags, data) != 0:
            return ctypes.get_errno()
        return 0
    uid = int(cfg["uid"])
    work = cfg["work"]
    if cfg["ns"] == "1":
        # every mount read-only for this child only (the namespace is private), keeping the locked
        # flags (nosuid/nodev/noexec/atime) or an unprivileged remount would fail with EPERM
        bits = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
                "relatime": 1 << 21, "strictatime": 1 << 24, "nosymfollow": 256}
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        for line in lines:
            fields = line.split(" ")
            target = fields[4]
            for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                target = target.replace(esc, ch)
            flags = 32 | 4096 | 1  # MS_REMOUNT | MS_BIND | MS_RDONLY
            for opt in fields[5].split(","):
                flags |= bits.get(opt, 0)
            err = mount(None, target.encode(), None, flags, None)
            if err and err not in (errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.EINVAL):
                _fail("read-only remount of %s: %s" % (target, os.strerror(err)))
        if not os.statvfs("/").f_flag & 1:
            _fail("root file system is still writable")
        size = cfg["tmpfs_mb"]
        err = mount(b"tmpfs", b"/tmp", b"tmpfs", 2 | 4, ("size=%sm,mode=1777" % size).encode())
        if err:
            _fail("tmpfs on /tmp: " + os.strerror(err))
        home = cfg.get("hide")
        if home and os.path.isdir(home):
            err = mount(b"tmpfs", home.encode(), b"tmpfs", 2 | 4 | 8, b"size=1m,mode=0755")
            if err:
                _fail("tmpfs over %s: %s" % (home, os.strerror(err)))
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
    import builtins, io, posix
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
    paths = _paths()  # before _setup: it may hide the directory the interpreter lives in
    libc = _setup(cfg)
    _limits(cfg)
    _drop(cfg, libc)
    del libc
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
            import linecache, traceback
            linecache.cache["<sandbox>"] = (len(source), None, source.decode("utf-8", "replace").splitlines(True), "<sandbox>")
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
