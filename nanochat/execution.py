"""Sandboxed execution of model-generated Python: the python tool used in generation, and HumanEval's runs.

Each run is a bootstrap process (`python execution.py --bootstrap`) that confines a fresh child, runs the code
in it with a wall-clock timeout, kills everything the code started and reports how it ended. Every run gets
rlimits (address space, CPU seconds, file size, open files, processes), a reduced environment (PATH, HOME,
TMPDIR, LANG), closed stdin, size-capped stdout/stderr, no_new_privs, a fresh session keyring plus a seccomp
filter that refuses the keyring system calls (the caller's keys can be neither read nor left for the next
run), and a subreaper that kills whatever the code left running. How much more depends on what the kernel
grants us, detected once per process by isolation_mode(); ExecutionResult.protections lists what each run
really got, and a line is printed once when something is missing.

- "root" (we are root): new mount, network, pid, ipc and uts namespaces. The code runs chrooted in a
  read-only tree holding only /usr, /lib*, the Python install and a few /dev nodes, plus a private tmpfs
  as its working directory; the home directory, the repository, /tmp and every other file are simply not
  there. The network namespace has no usable interface. It runs as a fresh unprivileged uid (so
  RLIMIT_NPROC applies and nothing can signal another run) as pid 1 of its namespace: when it ends, or is
  killed at the timeout, every process it started dies with it.
- "userns" (not root, unprivileged user namespaces allowed): the same namespaces and chroot, entered
  through a user namespace; the code runs as the calling user mapped to a non-root uid, with no
  capabilities left after exec.
- "guard" (no namespaces: a non-root user on a distribution that restricts user namespaces, or a container
  without CAP_SYS_ADMIN): rlimits plus a Python audit hook, installed before the code runs, that refuses
  writes outside the working directory, reads of the home directory, the repository, /root, /home, /tmp
  and /proc, sockets, fork/exec/subprocess, signals to other processes and ctypes. The hook lives in the
  same interpreter as the code it watches: it stops accidents and the usual escape routes, NOT a
  determined attacker, who can disable it and then do whatever its uid may (read what that user can read,
  use the network, fill /tmp). The kernel still enforces the rlimits, no_new_privs, the keyring filter and
  the clean-up, and the code never runs as root: as root, guard mode switches to a fresh unprivileged uid
  and afterwards removes what that uid left in /tmp, /var/tmp, /dev/shm and SysV IPC. When it cannot
  (no CAP_SETUID, or an interpreter that uid cannot run, e.g. Python installed under /root: point
  execution.PYTHON at one it can), execute_code raises SandboxError instead of running the code weaker.

Memory: RLIMIT_AS caps each process's address space. Memory held outside it (memfd files, SysV shared
memory, tmpfs files, pipe buffers) is capped by a memory cgroup where one can be made (root, or a delegated
cgroup v2 subtree): a child of our own memory cgroup (v2, or v1's memory controller) limited to
memory_limit_mb with no swap, which every process of the run joins; an OOM kill there is what sets
memory_exceeded, besides a MemoryError that ended the program. Namespace modes also cap SysV IPC in their
own IPC namespace (shared memory in total = the memory limit, IPC_MAX_IDS ids of each kind) and the work
tmpfs (size and inodes). Without a cgroup, memory outside the address space is bounded only by the timeout.

Entry point: execute_code(code). HumanEval's harness (the candidate's code and the tests in two processes)
is nanochat/humaneval_harness.py: it runs through run_sandboxed with a `check`, and its tests run in
_harness_child; check_humaneval and run_humaneval are importable from here too. The chat tool's calculator is
nanochat/calculator.py.
"""

import errno
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# ctypes and subprocess are imported inside the functions that need them: the guard-mode child runs this
# file, and a module already imported there would be handed to the code without passing the import audit.

if __name__ != "__main__":  # (the bootstrap, python -I -S execution.py, sees no package: see _load_harness)
    from nanochat.humaneval_harness import check_humaneval, run_humaneval

__all__ = ["ExecutionResult", "SandboxError", "check_humaneval", "execute_code", "isolation_mode", "run_humaneval",
           "run_sandboxed"]

MAX_OUTPUT_BYTES = 1 << 20  # stdout / stderr kept per stream
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: any file written, captured output included
MAX_OPEN_FILES = 64
MAX_PROCESSES = 16  # RLIMIT_NPROC of the sandbox uid (threads count too)
WORK_TMPFS_BYTES = 64 << 20  # the private working directory (namespace modes)
WORK_TMPFS_INODES = 4096  # every inode is kernel memory that no size limit counts
IPC_MAX_IDS = 16  # SysV shm segments, message queues, semaphore sets and POSIX queues (own IPC namespace)
MODES = ("root", "userns", "guard")

# The interpreter that runs the sandbox: any Python >= 3.10 will do (the code gets only the standard library);
# guard mode as root needs one that an unprivileged uid can run
PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)  # never a venv's
PYTHON_PREFIXES = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(PYTHON)))})
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a chrooted run sees, read-only (symlinks such as /lib -> usr/lib are recreated as links)
ROOTFS_PATHS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime"]
DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
SHARED_DIRS = ["/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"]  # where any uid may leave files (guard mode)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 2, 0x7FFF0000, 0x00050000
KEYCTL_JOIN_SESSION_KEYRING, IPC_RMID = 1, 0
# per machine: seccomp's audit arch, then the add_key, request_key and keyctl system call numbers
KEY_SYSCALLS = {"x86_64": (0xC000003E, 248, 249, 250), "aarch64": (0xC00000B7, 217, 218, 219),
                "riscv64": (0xC00000F3, 217, 218, 219)}


class SandboxError(RuntimeError):
    """The sandbox refuses to run the code: it cannot give the isolation its mode documents."""


@dataclass
class ExecutionResult:
    success: bool  # exited with status 0 within the limits (check_humaneval: the tests passed)
    stdout: str
    stderr: str
    error: str | None = None  # None on success, else a one-line reason
    timeout: bool = False
    memory_exceeded: bool = False
    protections: tuple = ()  # what this run got, e.g. ("namespaces", "chroot", "memory cgroup", ...)


def execute_code(code, timeout=5.0, memory_limit_mb=256, isolation=None):
    """Run `code` as a Python program in the sandbox. isolation: None = strongest available (isolation_mode())."""
    return run_sandboxed(code, timeout, memory_limit_mb, isolation)


def run_sandboxed(code, timeout, memory_limit_mb, isolation, check=None):
    """Run `code` in the sandbox; with check (nanochat/humaneval_harness.py) the harness process runs its tests
    against the program's entry point and success is their verdict."""
    import subprocess
    mode = isolation or isolation_mode()
    if mode not in MODES:
        raise ValueError(f"unknown isolation mode {mode!r}; one of {MODES}")
    memory_bytes = int(memory_limit_mb) << 20
    top = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    cgroup = _make_cgroup(memory_bytes)
    oom_kills, status = 0, None
    try:
        work = os.path.join(top, "work")  # in namespace modes it exists only inside the sandbox, as a tmpfs
        if mode == "guard":
            os.mkdir(work, 0o700)
        with open(os.path.join(top, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        uid, harness_uid = random.SystemRandom().sample(range(1 << 20, 1 << 30), 2)
        cfg = {"mode": mode, "top": top, "work": work, "timeout": float(timeout), "memory_bytes": memory_bytes,
               "uid": uid, "harness_uid": harness_uid, "cgroup": cgroup and cgroup[1], "check": check,
               "env": {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
               "guard": {"work": work,
                         "denied": [d for d in (os.path.expanduser("~"), top, REPO_DIR, os.environ.get("NANOCHAT_BASE_DIR")) if d]
                                   + ["/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/proc"]}}
        with open(os.path.join(top, "config.json"), "w") as f:  # a file: prompt and tests can outgrow one argv string
            json.dump(cfg, f)
        out_path, err_path = os.path.join(top, "stdout"), os.path.join(top, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([PYTHON, "-I", "-S", os.path.abspath(__file__), "--bootstrap", os.path.join(top, "config.json")],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=top, env=cfg["env"],
                                    start_new_session=True)
            try:
                proc.wait(timeout + 30)  # the bootstrap enforces `timeout` itself; this only catches it hanging
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the children follow through their parent-death signal
                proc.wait()
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        status_path = os.path.join(top, "status.json")
        if os.path.exists(status_path):
            with open(status_path) as f:
                status = json.load(f)
    finally:
        if cgroup:
            oom_kills = _remove_cgroup(cgroup)
        shutil.rmtree(top, ignore_errors=True)
    if status is None:
        last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return ExecutionResult(False, stdout, stderr, f"sandbox failed ({mode}): {last[0]}")
    if status["refused"]:
        raise SandboxError(f"{mode} mode refuses to run the code: {status['refused']}")
    protections = tuple(status["applied"])
    if status["failed"]:
        return ExecutionResult(False, stdout, stderr, f"sandbox failed ({mode}): {status['failed']}", protections=protections)
    sig, exitcode = status["signal"], status["exitcode"]
    timed_out = status["timeout"] or sig == signal.SIGXCPU  # wall clock, or CPU seconds (RLIMIT_CPU)
    # out of memory: the cgroup's OOM kills, or a failed run whose traceback ends in MemoryError (the word printed
    # anywhere else, or by a run that exits 0, does not count)
    died_of_memory_error = check is None and exitcode == 1 and re.fullmatch(r"MemoryError(: .*)?", stderr.rstrip("\n").rpartition("\n")[2])
    memory = not timed_out and (oom_kills > 0 or bool(died_of_memory_error))
    if timed_out:
        error = f"timed out after {timeout} s"
    elif memory:
        error = f"memory limit of {memory_limit_mb} MB exceeded"
    elif check is not None:
        verdict = status["verdict"]
        if verdict is None:
            error = "the tests did not finish" + (f" (killed by {_signal_name(sig)})" if sig is not None else "")
        else:
            error = None if verdict["passed"] else verdict["reason"]
    elif sig is not None:
        error = f"killed by {_signal_name(sig)}"
    elif exitcode != 0:
        lines = stderr.strip().splitlines()
        error = lines[-1] if lines else f"exit status {exitcode}"
    else:
        error = None
    return ExecutionResult(error is None, stdout, stderr, error, timed_out, memory, protections)


def _signal_name(sig):
    try:
        return signal.Signals(sig).name
    except ValueError:  # e.g. a real-time signal: the enum names only SIGRTMIN and SIGRTMAX
        return f"signal {sig}"


def _read_capped(path):
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")


_mode = None
_mode_lock = threading.Lock()


def isolation_mode():
    """The strongest isolation this machine grants: "root", "userns" or "guard" (probed once by a real run)."""
    global _mode
    with _mode_lock:
        if _mode is None:
            candidates = (["root"] if os.geteuid() == 0 else []) + ["userns"]
            for mode in candidates:
                try:
                    probe = execute_code("print(6 * 7)", timeout=20, isolation=mode)
                except SandboxError:
                    continue
                if probe.stdout == "42\n":
                    _mode = mode
                    if "memory cgroup" not in probe.protections:
                        print(f"nanochat.execution: no memory cgroup can be made here ({mode} mode): memory held outside "
                              "the address space (memfd, shared memory) is bounded only by the timeout", file=sys.stderr)
                    break
            else:
                _mode = "guard"
                print("nanochat.execution: no namespaces available; generated code runs under the weaker "
                      "in-process guard (see the nanochat/execution.py docstring)", file=sys.stderr)
        return _mode

# -----------------------------------------------------------------------------
# Memory cgroups, made and removed by the caller; the sandbox's processes join them.

_cgroup_parent = None
_cgroup_lock = threading.Lock()


def _find_cgroup_parent():
    """(version, directory): our own memory cgroup, v2 or v1, if we may create children in it; else None."""
    try:
        with open("/proc/self/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for _, controllers, path in memberships:
        for fields in mounts:
            sep = fields.index("-")
            root, point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3].split(",")
            if controllers == "" and fstype == "cgroup2":
                version = 2
            elif fstype == "cgroup" and "memory" in controllers.split(",") and "memory" in options:
                version = 1
            else:
                continue
            if not (path.rstrip("/") + "/").startswith(root.rstrip("/") + "/"):
                continue  # our cgroup is outside what this mount shows
            directory = os.path.normpath(os.path.join(point, os.path.relpath(path, root)))
            if version == 2:  # children get a memory controller only if it is enabled below us
                try:
                    with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                        if "memory" not in f.read().split():
                            continue
                except OSError:
                    continue
            if os.access(directory, os.W_OK):
                return version, directory
    return None


def _write(directory, name, value):
    with open(os.path.join(directory, name), "w") as f:
        f.write(f"{value}\n")


def _make_cgroup(memory_bytes):
    """A fresh memory cgroup limited to memory_bytes with no swap: (version, path), or None where none can be made."""
    global _cgroup_parent
    with _cgroup_lock:
        if _cgroup_parent is None:
            _cgroup_parent = _find_cgroup_parent() or ()
    if not _cgroup_parent:
        return None
    version, parent = _cgroup_parent
    path = os.path.join(parent, f"nanochat-sandbox-{os.urandom(8).hex()}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    try:
        if version == 2:
            _write(path, "memory.max", memory_bytes)
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(path, "memory.swap.max", 0)
        else:
            _write(path, "memory.limit_in_bytes", memory_bytes)
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):  # memory + swap, so: no swap
                _write(path, "memory.memsw.limit_in_bytes", memory_bytes)
    except OSError:
        os.rmdir(path)
        return None
    return version, path


def _remove_cgroup(cgroup):
    """Kill whatever is still in the run's cgroup and remove it; returns how many OOM kills it saw."""
    version, path = cgroup
    oom_kills = 0
    try:
        with open(os.path.join(path, "memory.events" if version == 2 else "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    oom_kills = int(value)
    except OSError:
        pass
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(path)
            return oom_kills
        except FileNotFoundError:
            return oom_kills
        except OSError:  # EBUSY: processes still in it (only if the bootstrap itself was killed)
            if time.monotonic() > deadline:
                print(f"nanochat.execution: could not remove {path}", file=sys.stderr)
                return oom_kills
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                for pid in f.read().split():
                    _kill(int(pid))
        except OSError:
            pass
        time.sleep(0.01)


def _kill(pid, group=False):
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

# -----------------------------------------------------------------------------
# Inside the sandbox. The bootstrap runs as `python -I -S execution.py --bootstrap CONFIG` with the caller's
# privileges, in a single thread (so fork is safe): it builds the namespaces and the chroot, forks the child
# that confines itself and execs Python on main.py (and, for HumanEval, the harness), enforces the timeout,
# kills what is left and writes status.json.

def _libc(name, *args):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, name)
    function.restype = ctypes.c_long if name == "syscall" else ctypes.c_int
    result = function(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if result == -1 or name != "syscall" and result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args[:2]}: {os.strerror(err)}")
    return result


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _libc("mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def _bind_readonly(src, dst):
    """Bind src onto dst read-only, keeping the mount flags that an unprivileged remount may not drop."""
    _mount(src, dst, None, MS_BIND | MS_REC)
    st_flags = os.statvfs(src).f_flag  # ST_* values equal MS_* ones, except ST_RELATIME (4096)
    kept = st_flags & (MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if st_flags & 4096 else 0)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept)


def _makedirs_hidden(path):
    """mkdir -p whose new directories can be passed through but not listed (e.g. /root on the way to ~/.pyenv)."""
    if not os.path.isdir(path):
        _makedirs_hidden(os.path.dirname(path))
        os.mkdir(path)
        os.chmod(path, 0o111)


def _build_rootfs(cfg):
    """A read-only tree for chroot: system libraries, the Python install, devices, and a tmpfs work dir."""
    root = os.path.join(cfg["top"], "root")
    os.mkdir(root)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    bound = []
    for src in ROOTFS_PATHS + PYTHON_PREFIXES:
        if not os.path.lexists(src) or any(src == b or src.startswith(b + "/") for b in bound):
            continue
        dst = root + src
        _makedirs_hidden(os.path.dirname(dst))
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
            continue
        if os.path.isdir(src):
            os.mkdir(dst, 0o755)
        else:
            open(dst, "w").close()
        _bind_readonly(src, dst)
        bound.append(src)
    os.mkdir(root + "/dev", 0o755)
    for dev in DEVICES:
        open(root + dev, "w").close()
        _mount(dev, root + dev, None, MS_BIND)
    for name, target in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")]:
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/proc", 0o555)
    work = root + cfg["work"]
    _makedirs_hidden(work)
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["mode"] == "root" else ""
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={WORK_TMPFS_BYTES},nr_inodes={WORK_TMPFS_INODES},mode=700{owner}")
    shutil.copyfile(os.path.join(cfg["top"], "main.py"), work + "/main.py")
    if cfg["mode"] == "root":
        os.chown(work + "/main.py", cfg["uid"], cfg["uid"])
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return root


def _enter_namespaces(cfg):
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _libc("unshare", flags | (CLONE_NEWUSER if cfg["mode"] == "userns" else 0))
    if cfg["mode"] == "userns":
        inner = uid or 65534  # never uid 0 inside: exec then drops every capability
        for name, text in [("setgroups", "deny"), ("uid_map", f"{inner} {uid} 1"), ("gid_map", f"{gid or 65534} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host


def _limit_ipc(cfg):
    """Bound SysV IPC and POSIX queues in our new IPC namespace (its sysctls are its own); False if refused."""
    page = os.sysconf("SC_PAGE_SIZE")
    settings = {"kernel/shmmax": cfg["memory_bytes"], "kernel/shmall": cfg["memory_bytes"] // page,
                "kernel/shmmni": IPC_MAX_IDS, "kernel/msgmni": IPC_MAX_IDS,
                "kernel/sem": f"64 {64 * IPC_MAX_IDS} 64 {IPC_MAX_IDS}", "fs/mqueue/queues_max": IPC_MAX_IDS}
    for name, value in settings.items():
        try:
            _write("/proc/sys", name, value)
        except FileNotFoundError:  # a kernel without that kind of IPC
            pass
        except OSError:
            return False
    return True


def _set_limits(cfg):
    cpu = math.ceil(cfg["timeout"]) + 1
    limits = [(resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
              (resource.RLIMIT_NOFILE, MAX_OPEN_FILES), (resource.RLIMIT_NPROC, MAX_PROCESSES),
              (resource.RLIMIT_CORE, 0)]
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL at the hard


def _block_keyring_syscalls():
    """Seccomp: add_key, request_key and keyctl fail with EPERM, as does every syscall of a foreign ABI."""
    import ctypes
    arch = KEY_SYSCALLS.get(os.uname().machine)
    if arch is None:
        return False
    audit_arch, add_key, request_key, keyctl = arch
    deny, allow = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ALLOW
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, deny),  # seccomp_data.arch
               (LD, 0, 0, 0), (JGE, 4, 0, 0x40000000),  # seccomp_data.nr; x32 numbers are denied too
               (JEQ, 3, 0, add_key), (JEQ, 2, 0, request_key), (JEQ, 1, 0, keyctl),
               (RET, 0, 0, allow), (RET, 0, 0, deny)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    filters = (Filter * len(program))(*[Filter(*f) for f in program])
    _libc("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(program), filters)), 0, 0)
    return True


def _new_session_keyring():
    """Join a new, empty session keyring: nothing of the caller's session is possessed any more."""
    arch = KEY_SYSCALLS.get(os.uname().machine)
    if arch is None:
        return False
    try:
        _libc("syscall", arch[3], KEYCTL_JOIN_SESSION_KEYRING, None)
    except OSError as e:
        if e.errno == errno.ENOSYS:  # a kernel without keyrings: nothing to inherit
            return False
        raise
    return True


class _Refused(Exception):
    pass


def _confine(cfg, root, uid, cwd, mount_proc):
    """Everything a sandbox process does to itself before running anything; returns the protections applied."""
    applied = ["rlimits"]
    if cfg["cgroup"]:
        try:
            _write(cfg["cgroup"], "cgroup.procs", 0)  # 0: this process
            applied.append("memory cgroup")
        except OSError:
            pass
    if root is not None:
        if mount_proc:
            try:
                _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:  # some containers refuse a fresh proc; an empty /proc then
                pass
            for name in ("keys", "key-users"):  # they list the caller's key names when the uid is the caller's (userns)
                if os.path.exists(f"{root}/proc/{name}"):
                    _mount(root + "/dev/null", f"{root}/proc/{name}", None, MS_BIND)
        os.chroot(root)
        applied += ["namespaces", "chroot"]
        if cfg["ipc_limited"]:
            applied.append("ipc limits")
        applied.append("tmpfs limits")
    os.chdir(cwd)
    _set_limits(cfg)
    if cfg["mode"] == "root" or cfg["mode"] == "guard" and os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            raise _Refused(f"cannot switch to an unprivileged uid: {e}")
        applied.append("fresh uid")
    if os.geteuid() == 0 or os.getuid() == 0:
        raise _Refused("the code would run as root")
    if not os.access(PYTHON, os.X_OK):
        raise _Refused(f"uid {os.getuid()} cannot run {PYTHON} (a directory on its path is closed to other users); "
                       "set nanochat.execution.PYTHON to an interpreter it can run")
    if _new_session_keyring():
        applied.append("fresh session keyring")
    _libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    applied.append("no_new_privs")
    if _block_keyring_syscalls():
        applied.append("keyring syscalls blocked")
    if cfg["mode"] == "guard":
        applied.append("audit hook")
    _libc("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # after setuid, which clears it
    return applied


def _report(fd, **what):
    os.write(fd, (json.dumps(what) + "\n").encode())


def _program_child(cfg, root, report_w, rpc_fds):
    """The program's process (pid 1 of the new pid namespace in namespace modes): confines itself, reports, execs."""
    try:
        os.setpgid(0, 0)
        applied = _confine(cfg, root, cfg["uid"], cfg["work"], mount_proc=True)
        for target, fd in rpc_fds.items():
            os.dup2(fd, target)  # inheritable: the candidate serves calls on them
        if cfg["mode"] == "guard":
            if not os.access(os.path.abspath(__file__), os.R_OK):
                raise _Refused(f"uid {os.getuid()} cannot read {os.path.abspath(__file__)}")
            argv = [PYTHON, "-I", "-S", os.path.abspath(__file__), "--guard", json.dumps(cfg["guard"])]
        else:
            argv = [PYTHON, "-I", "-S", "main.py"]  # -S: no site-packages (nor exit()), a 5x faster start here
        _report(report_w, who="program", applied=applied)
        os.execve(PYTHON, argv, cfg["env"])
    except _Refused as e:
        _report(report_w, refused=str(e))
    except BaseException as e:
        _report(report_w, failed=f"setup: {e!r}")
    os._exit(70)


def _load_harness():
    """The bootstrap's run_tests (nanochat/humaneval_harness.py, stdlib only), loaded before any chroot from the
    file beside this one: python -I -S sees no package."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from humaneval_harness import run_tests
    finally:
        sys.path.pop(0)
    return run_tests


def _harness_child(cfg, root, report_w, req_w, resp_r, verdict_w, run_tests):
    """HumanEval's tests, in their own process (see the module docstring); reports a verdict and exits."""
    keep = sorted({report_w, req_w, resp_r, verdict_w})
    for lo, hi in zip([3] + [fd + 1 for fd in keep], keep + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
        os.closerange(lo, hi)  # above all the candidate's ends of the pipes: its exit must be our EOF
    try:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)  # what the tests print is not the program's output
        os.close(null)
        _confine(cfg, root, cfg["harness_uid"], "/", mount_proc=False)
        _report(report_w, who="harness")
        os.close(report_w)
        verdict = run_tests(cfg["check"], req_w, resp_r)
    except _Refused as e:
        _report(report_w, refused=str(e))
        os._exit(70)
    except BaseException as e:
        verdict = {"passed": False, "reason": f"harness setup failed: {e!r}"}
    os.write(verdict_w, json.dumps(verdict).encode())
    os._exit(0)


def _pipe():
    """os.pipe() with both ends above fd 4, so that dup2 onto the candidate's fds 3 and 4 never hits them."""
    import fcntl
    ends = os.pipe()
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in ends]
    for fd in ends:
        os.close(fd)
    return high


def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def _children():
    """Pids whose parent is this process (orphans of the run land here: we are a subreaper)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == me:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _kill_leftovers():
    """SIGKILL and reap every remaining descendant; killing a parent hands its children to us, so repeat."""
    deadline = time.monotonic() + 10
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        if time.monotonic() > deadline:
            return
        for pid in _children():
            _kill(pid)
        time.sleep(0.002)


def _remove_leftovers(uid):
    """Guard mode as root: what the run's fresh uid left where any user may write (files, SysV IPC objects)."""
    for directory in SHARED_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # fd-based: symlinks inside are removed, never followed
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
    for kind, remove in (("shm", "shmctl"), ("msg", "msgctl"), ("sem", "semctl")):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = [line.split() for line in f]
        except OSError:
            continue
        for row in rows:
            if int(row[header.index("uid")]) == uid:
                args = (int(row[1]), 0, IPC_RMID) if kind == "sem" else (int(row[1]), IPC_RMID, None)
                try:
                    _libc(remove, *args)
                except OSError:
                    pass


def _bootstrap(cfg):
    _libc("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)  # inherited by the harness (never exec'd): no ptrace, no /proc reads
    _libc("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what the code leaves running comes back to us
    mode, root = cfg["mode"], None
    run_tests = _load_harness() if cfg["check"] is not None else None  # before the namespaces
    cfg["ipc_limited"] = False
    if mode == "guard":
        cfg["guard"]["allowed"] = PYTHON_PREFIXES  # this interpreter's, which need not be the caller's
        main = os.path.join(cfg["work"], "main.py")
        shutil.copyfile(os.path.join(cfg["top"], "main.py"), main)
        if os.geteuid() == 0:  # the code will run as cfg["uid"]: let it through to its own directory
            os.chmod(cfg["top"], 0o711)
            for path in (cfg["work"], main):
                os.chown(path, cfg["uid"], cfg["uid"])
    else:
        _enter_namespaces(cfg)
        cfg["ipc_limited"] = _limit_ipc(cfg)
        root = _build_rootfs(cfg)
    report_r, report_w = _pipe()
    check = cfg["check"] is not None
    rpc_fds = {}
    if check:
        req_r, req_w = _pipe()
        resp_r, resp_w = _pipe()
        verdict_r, verdict_w = _pipe()
        rpc_fds = {3: req_r, 4: resp_w}
    pid = os.fork()
    if pid == 0:
        _program_child(cfg, root, report_w, rpc_fds)
    try:
        os.setpgid(pid, pid)  # the child does it too: whichever runs first, the kills below reach its group
    except OSError:  # the child got there first and has already exec'd
        pass
    harness = None
    if check:
        try:
            harness = os.fork()
        except OSError:  # the program already ended, and its pid namespace with it: no verdict
            pass
        if harness == 0:
            _harness_child(cfg, root, report_w, req_w, resp_r, verdict_w, run_tests)
        for fd in (req_r, req_w, resp_r, resp_w, verdict_w):
            os.close(fd)
    os.close(report_w)
    timed_out = []

    def kill_run():  # namespace modes: the program is pid 1, its namespace dies with it (the harness too)
        _kill(pid, group=mode == "guard")
        if harness is not None:
            _kill(harness)

    def on_alarm(signum, frame):
        timed_out.append(True)
        kill_run()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout"])
    reports = [json.loads(line) for line in _read_all(report_r).splitlines()]
    waited = harness or pid  # with tests, the run is over when the harness has its verdict
    os.waitid(os.P_PID, waited, os.WEXITED | os.WNOWAIT)  # exited but not reaped: its pid cannot be reused yet
    signal.setitimer(signal.ITIMER_REAL, 0)
    kill_run()
    _, wstatus = os.waitpid(waited, 0)
    verdict = _read_all(verdict_r) if check else ""
    _kill_leftovers()
    if mode == "guard" and os.geteuid() == 0:
        _remove_leftovers(cfg["uid"])
    sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
    status = {"timeout": bool(timed_out), "signal": sig, "exitcode": os.WEXITSTATUS(wstatus) if sig is None else None,
              "applied": next((r["applied"] for r in reports if r.get("who") == "program"), []),
              "refused": next((r["refused"] for r in reports if "refused" in r), None),
              "failed": next((r["failed"] for r in reports if "failed" in r), None),
              "verdict": json.loads(verdict) if verdict else None}
    tmp = os.path.join(cfg["top"], "status.json.tmp")
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, os.path.join(cfg["top"], "status.json"))


def _guard(cfg):
    """Guard mode, inside the child interpreter: an audit hook that refuses escapes, then main.py as __main__."""
    import runpy
    assert not {"ctypes", "_ctypes", "_posixsubprocess"} & set(sys.modules), "guard child imported an escape hatch"
    work, allowed, denied = cfg["work"], tuple(cfg["allowed"] + [f"/proc/{os.getpid()}"]), tuple(cfg["denied"])
    under = lambda path, roots: any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked_events = {"os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
                      "subprocess.Popen", "pty.spawn", "socket.__new__", "ctypes.dlopen", "os.killpg",
                      "gc.get_objects", "gc.get_referrers", "gc.get_referents"}  # gc would reach this hook's state
    blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess"}
    write_events = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate",
                    "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                    "os.mkfifo", "os.mknod", "shutil.copyfile", "shutil.copytree", "shutil.move", "sqlite3.connect"}
    read_events = {"os.listdir", "os.scandir", "os.chdir", "os.walk", "glob.glob", "os.getxattr", "os.listxattr"}

    def check(path, write):
        if path is None or isinstance(path, int):  # an fd was already checked when it was opened
            return
        real = os.path.realpath(os.fsdecode(path))
        ok = under(real, (work, "/dev/null")) if write else under(real, (work,) + allowed) or not under(real, denied)
        if not ok:
            raise PermissionError(f"sandbox: {'writing' if write else 'reading'} {real} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            check(path, bool(mode and set(mode) & set("wax+")) or bool(flags & write_flags))
        elif event in write_events:
            check(args[0], True)
            if event in ("os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree", "shutil.move"):
                check(args[1], True)
        elif event in read_events:
            check(args[0], False)
        elif event in blocked_events or event == "import" and args[0] in blocked_modules:
            raise PermissionError(f"sandbox: {'import ' + args[0] if event == 'import' else event} is not allowed")
        elif event == "os.kill" and args[0] != os.getpid():
            raise PermissionError("sandbox: signalling other processes is not allowed")
    sys.addaudithook(hook)
    sys.argv = ["main.py"]
    runpy.run_path("main.py", run_name="__main__")

if __name__ == "__main__":
    if sys.argv[1] == "--bootstrap":
        with open(sys.argv[2]) as f:
            _bootstrap(json.load(f))
    else:
        _guard(json.loads(sys.argv[2]))
