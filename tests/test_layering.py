"""nanochat is the library and diloco a wrapper over it: nanochat imports nothing from diloco/, scripts/, bench/ or
tests/, and its DDP training runs with diloco/ gone."""

import ast
import os
import subprocess
import sys

import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step, load_checkpoint
from tests.helpers_pipeline import ROOT, TINY_MODEL, make_tiny_corpus

OUTSIDE = ("diloco", "scripts", "bench", "tests")


def imported_modules(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_nanochat_imports_nothing_from_the_wrapper_scripts_benches_or_tests():
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "nanochat"))):
        if name.endswith(".py"):
            found += [(name, m) for m in imported_modules(os.path.join(ROOT, "nanochat", name))
                      if m.split(".")[0] in OUTSIDE]
    assert found == []


# runs base_train as `python -m scripts.base_train` would, with every import of diloco failing as if it were absent
BLOCKED = """
import runpy, sys
class NoDiloco:
    def find_spec(self, name, path=None, target=None):
        if name == "diloco" or name.startswith("diloco."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoDiloco())
sys.argv = ["base_train", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__")
"""


def train(tag, block):
    """base_train's DDP path for 2 steps: in a process where diloco cannot be imported, or in this one."""
    flags = TINY_MODEL + ["--num-iterations", "2", "--eval-every", "0", "--device-type", "cpu", "--model-tag", tag]
    if block:
        proc = subprocess.run([sys.executable, "-c", BLOCKED, *flags], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        from scripts import base_train
        base_train.main(flags)
    d = checkpoint_dir("base", tag)
    model, _, meta, _ = load_checkpoint(d, find_last_step(d), "cpu")
    return model, meta


def test_ddp_base_training_runs_without_diloco_and_trains_the_same(base_dir):
    make_tiny_corpus(base_dir, n=400)
    alone, alone_meta = train("alone", block=True)
    assert "diloco_h" not in alone_meta["user_config"]  # nanochat's own --sync flags were in use
    assert alone_meta["sync"] == "ddp"
    wrapped, wrapped_meta = train("wrapped", block=False)
    assert "diloco_h" in wrapped_meta["user_config"]
    assert alone.keys() == wrapped.keys() and all(torch.equal(alone[k], wrapped[k]) for k in alone)


def test_a_library_usage_error_reaches_the_command_line_as_one_line_naming_the_fix(base_dir):
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--device-type", "cpu"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no mid checkpoints under {base_dir}/checkpoints/mid: train one first (e.g. python -m scripts.mid_train)")


# a module's own command line (its main(), its `if __name__ == "__main__":` block) may parse flags and exit; so may
# usage_errors, the scripts' one-line exit (nanochat/common.py). Everything else is library code.
COMMAND_LINE = ("main", "usage_errors")


def command_line_escapes(tree):
    """(line, what) for each function other than COMMAND_LINE that takes an argparse Namespace (a parameter annotated
    Namespace, or named args/namespace and read as args.flag) and each SystemExit raised (raise SystemExit,
    sys.exit()) outside them."""
    found = []

    def visit(node, allowed):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            allowed = node.name in COMMAND_LINE
            a = node.args
            # read as a Namespace: annotated so, or args.flag_name in the body (an audit hook's or
            # __torch_function__'s `args` tuple is indexed, not read by attribute)
            read = {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
            read |= {n.args[0].id for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) in
                     ("vars", "getattr") and n.args and isinstance(n.args[0], ast.Name)}
            for p in a.posonlyargs + a.args + a.kwonlyargs:
                annotation = ast.unparse(p.annotation) if p.annotation else ""
                if not allowed and (annotation.endswith("Namespace") or p.arg in ("args", "namespace") and p.arg in read):
                    found.append((node.lineno, f"{node.name}({p.arg})"))
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            allowed = True
        elif not allowed and isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if ast.unparse(exc) == "SystemExit":
                found.append((node.lineno, "raise SystemExit"))
        elif not allowed and isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit"):
            found.append((node.lineno, ast.unparse(node.func) + "()"))
        for child in ast.iter_child_nodes(node):
            visit(child, allowed)

    visit(tree, False)
    return found


def test_library_functions_take_no_argparse_namespace_and_raise_no_systemexit():
    found = []
    for package in ("nanochat", "diloco"):
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, package, name)
                found += [(f"{package}/{name}:{line}", what)
                          for line, what in command_line_escapes(ast.parse(open(path).read(), path))]
    assert found == []
    # the check sees each kind of escape, and lets a command line be one
    bad = """
def config(args): return args.sync
def hook(event, args): return args[0]
def load(path):
    if not path: raise SystemExit(1)
def run(ns: argparse.Namespace): sys.exit(2)
def main(args): raise SystemExit(args.x)
if __name__ == "__main__": sys.exit(main())
"""
    assert command_line_escapes(ast.parse(bad)) == [(2, "config(args)"), (5, "raise SystemExit"),
                                                      (6, "run(ns)"), (6, "sys.exit()")]
