"""bench/gpu_check.sh picks its python out loud: a .venv carried from another machine (its python a link to that
machine's interpreter) is named and skipped, never silently replaced."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_carried_venv_whose_python_does_not_run_here_is_reported_not_used(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(os.path.join(ROOT, "bench", "gpu_check.sh"), tmp_path / "bench" / "gpu_check.sh")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink("/nonexistent/bin/python3.99", tmp_path / ".venv" / "bin" / "python")
    fake = tmp_path / "path"  # python3 and python that have no torch (fast: no real import)
    fake.mkdir()
    for name in ("python3", "python"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = str(fake) + os.pathsep + env.get("PATH", "")
    env["GPU_CHECK_DATA"] = str(tmp_path / "no_data")
    proc = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "note: .venv/bin/python (-> /nonexistent/bin/python3.99) does not run here, or has no torch with CUDA: " \
           "not used" in proc.stderr
    assert "error: no python with torch (none found): set PYTHON=" in proc.stderr


def test_ranks_take_one_gpu_each_over_nccl_and_share_gpus_over_gloo_when_there_are_more_ranks():
    from nanochat.common import cuda_placement
    assert [cuda_placement(r, 8, 8) for r in (0, 7)] == [(0, "nccl"), (7, "nccl")]
    assert [cuda_placement(r, 2, 1) for r in (0, 1)] == [(0, "gloo"), (0, "gloo")]  # two DiLoCo workers, one GPU
    assert [cuda_placement(r, 4, 2) for r in range(4)] == [(0, "gloo"), (1, "gloo"), (0, "gloo"), (1, "gloo")]


def test_every_flag_gpu_check_gives_bench_inference_exists():
    """The decode section runs once, on a lent GPU: a renamed flag must fail here, not there (argparse exit 2)."""
    import re
    with open(os.path.join(ROOT, "bench", "bench_inference.py")) as f:
        known = set(re.findall(r'"(--?[a-z][a-z-]*)"', "".join(re.findall(r"add_argument\(([^)]*)\)", f.read()))))
    with open(os.path.join(ROOT, "bench", "gpu_check.sh")) as f:
        script = f.read().replace("\\\n", " ")
    calls = [line.split("bench.bench_inference", 1)[1].split(">")[0] for line in script.splitlines()
             if "-m bench.bench_inference" in line]
    assert len(calls) == 2 and {"--depth", "--require-greedy", "--bucket", "--no-compile"} <= known
    for args in calls:
        flags = re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", args)
        assert flags and set(flags) <= known, set(flags) - known
