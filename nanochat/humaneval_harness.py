"""HumanEval's harness: a candidate completion scored by the problem's tests, the two in separate processes of
the sandbox (nanochat/execution.py).

A program can print anything and read its own source, so nothing it prints counts. The candidate's code runs
in one process and the tests in another, the harness: forked from the sandbox's bootstrap (never exec'd, so it
runs only the problem's prompt and tests), non-dumpable (it cannot be traced or read) and, in root mode, a
different uid. Each call of the entry point goes to the candidate's process
over a pipe and comes back as plain data (None, bool, int, float, complex, str, bytes, list, tuple, set,
frozenset, dict), rebuilt by the harness, so only equal values satisfy the tests; the verdict reaches the
bootstrap over a pipe the candidate never holds. In guard mode as a non-root user the candidate runs as the
caller, so there the verdict is only as strong as the hook.

Entry points: check_humaneval(problem, completion), run_humaneval(...) for the whole ExecutionResult. This
module is stdlib only: the sandbox's bootstrap (python -I -S execution.py, no package on its path) imports it
beside itself to run the tests.
"""

import builtins


def run_humaneval(problem, completion, timeout=10.0, memory_limit_mb=256, isolation=None):
    """prompt + completion against the problem's tests (see the module docstring); success = they all passed."""
    from nanochat.execution import run_sandboxed
    program = f"{problem['prompt']}{completion}\n\n{RPC_SOURCE}\n__nanochat_serve({problem['entry_point']!r})\n"
    check = {"prompt": problem["prompt"], "test": problem["test"], "entry_point": problem["entry_point"]}
    return run_sandboxed(program, timeout, memory_limit_mb, isolation, check)


def check_humaneval(problem, completion, timeout=10.0):
    """True when prompt + completion passes the problem's unit tests in the sandbox."""
    return run_humaneval(problem, completion, timeout).success


# HumanEval's two processes talk over pipes in plain data. The same source runs in the harness (exec'd) and,
# appended to the program, in the candidate's process, which serves calls of the entry point on fds 3 and 4.

RPC_SOURCE = r'''
def __nanochat_rpc():
    import json, os
    kinds = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}

    def pack(v):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return ["int", format(v, "x")]  # hex: no digit limit
        if isinstance(v, float):
            return ["float", float.hex(v)]  # exact, inf and nan included
        if isinstance(v, complex):
            return ["complex", float.hex(v.real), float.hex(v.imag)]
        if isinstance(v, (bytes, bytearray)):
            return ["bytes", bytes(v).hex()]
        if isinstance(v, dict):
            return ["dict", [[pack(k), pack(x)] for k, x in v.items()]]
        for name, kind in kinds.items():
            if isinstance(v, kind):
                return [name, [pack(x) for x in v]]
        raise TypeError(f"a {type(v).__name__} cannot cross the sandbox (plain data only)")

    def unpack(x):
        if x is None or isinstance(x, (bool, str)):
            return x
        tag, *rest = x
        if tag == "int":
            return int(rest[0], 16)
        if tag == "float":
            return float.fromhex(rest[0])
        if tag == "complex":
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag == "bytes":
            return bytes.fromhex(rest[0])
        if tag == "dict":
            return {unpack(k): unpack(v) for k, v in rest[0]}
        return kinds[tag](unpack(y) for y in rest[0])

    def send(fd, obj):
        data = json.dumps(obj).encode()
        view = memoryview(len(data).to_bytes(8, "big") + data)
        while view:
            view = view[os.write(fd, view):]

    def recv(fd):
        def exactly(n):
            chunks = []
            while n:
                chunk = os.read(fd, min(n, 1 << 20))
                if not chunk:
                    raise EOFError("the other process closed its pipe")
                chunks.append(chunk)
                n -= len(chunk)
            return b"".join(chunks)
        return json.loads(exactly(int.from_bytes(exactly(8), "big")))

    return pack, unpack, send, recv


def __nanochat_serve(name):
    pack, unpack, send, recv = __nanochat_rpc()
    function = globals().get(name)
    while True:
        try:
            args, kwargs = recv(3)
        except EOFError:
            return
        try:
            reply = ["ok", pack(function(*unpack(args), **unpack(kwargs)))]
        except Exception as e:
            reply = ["raise", type(e).__name__, str(e)[:1000]]
        send(4, reply)
'''


def run_tests(check, req_w, resp_r):
    """The harness: the prompt and the tests, with `candidate` a stub that calls into the candidate's process."""
    rpc = {}
    exec(RPC_SOURCE, rpc)
    pack, unpack, send, recv = rpc["__nanochat_rpc"]()

    def candidate(*args, **kwargs):
        send(req_w, [pack(args), pack(kwargs)])
        reply = recv(resp_r)
        if reply[0] == "ok":
            return unpack(reply[1])
        name, message = str(reply[1]), str(reply[2])
        kind = getattr(builtins, name, None)  # the candidate's exception, as a builtin type where it is one
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(message)
        raise RuntimeError(f"{name}: {message}")

    env = {"__name__": "__check__"}
    try:
        exec(compile(check["prompt"], "prompt", "exec"), env)
        env[check["entry_point"]] = candidate  # some tests call the entry point by name (HumanEval/33)
        exec(compile(check["test"], "test", "exec"), env)
        env["check"](candidate)
    except EOFError:
        return {"passed": False, "reason": "the program ended before the tests finished"}
    except BaseException as e:
        text = str(e).strip().splitlines()[:1]
        return {"passed": False, "reason": f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__}
    return {"passed": True, "reason": None}
