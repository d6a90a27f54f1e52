"""bench/bench_wan.py at micro scale: the links really are shaped, every arm's bytes on the wire match the
project's accounting, and nothing is left behind (also after Ctrl-C). Needs root, like CI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from tests.helpers_pipeline import ROOT, make_tiny_corpus

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                                reason="creates network namespaces: needs root and iproute2 (CI runs as root)")


def namespaces(pid):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"nwan{pid}-")]


def start_bench(args, tmp_path):
    # a 2 s probe: at 1 s the fixed cost of a transfer (threads, slow start) read as 0.79 of the cap once
    cmd = [sys.executable, "-m", "bench.bench_wan", "--quick", "--rates", "10mbit", "--probe-seconds", "2",
           "--out", str(tmp_path / "wan"), *args]
    # Ctrl-C must reach the bench even when the suite itself runs in the background, where the shell starts
    # every process with SIGINT ignored (and Python then installs no KeyboardInterrupt handler)
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(proc):
    """Ctrl-C the bench (it cleans up), kill it if that hangs, remove whatever it left; returns its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out = proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    for name in namespaces(proc.pid):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return out


def finish(proc, timeout):
    """Output of the bench once it exits; past `timeout` it is stopped and the test fails."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench_wan ran over {timeout} s:\n{stop(proc)[-3000:]}")


def test_wan_link_is_shaped_and_wire_bytes_match_accounting(base_dir, tmp_path):
    make_tiny_corpus(base_dir)
    proc = start_bench(["--arms", "ddp,diloco", "--num-iterations", "4", "--diloco-h", "2", "--eval-every", "2"], tmp_path)
    try:
        out = finish(proc, timeout=240)
        assert namespaces(proc.pid) == [], "the bench left namespaces behind"
    finally:
        stop(proc)
    assert proc.returncode == 0, out[-4000:]
    result = json.loads((tmp_path / "wan" / "wan.json").read_text())

    probe = result["probes"]["10000000"]  # a timed bulk TCP transfer between the two sites
    assert 0.85 <= probe["ratio_to_cap"] <= 1.15, probe
    assert probe["wire_bps"] < 11.5e6  # the cap holds: an unshaped veth carries Gbit/s

    vocab = get_tokenizer().get_vocab_size()
    with torch.device("meta"):  # the micro model's size, counted independently of the bench
        P = sum(p.numel() for p in GPT(config_from_depth(2, vocab, 64, aspect_ratio=32, head_dim=32)).parameters())
    # bytes every rank sends (comm's ring model, K = 2): all-reduce n, broadcast n/2 per rank
    start = 2 * (4 * P // 2)  # rank 0's weights broadcast to the other site
    expected = {"ddp": start + 4 * 2 * 4 * P,  # 4 steps x 2 ranks x fp32 gradients
                "diloco": start + 2 * 2 * 4 * P}  # 2 outer syncs (H=2) x 2 workers x fp32 pseudo-gradient
    ddp, diloco = result["results"]
    assert (ddp["arm"], diloco["arm"]) == ("ddp", "diloco")
    for arm in (ddp, diloco):
        assert arm["accounted_bytes"] == expected[arm["arm"]]
        # every byte the ranks count crossed wan0, plus headers and a little control traffic (rendezvous, evals)
        assert arm["bytes_check"] == "PASS" and abs(arm["bytes_error"]) <= 0.05, arm
        assert arm["accounted_bytes"] < arm["tx_bytes"] < 1.10 * arm["accounted_bytes"]
        assert arm["tokens"] == 4 * 512 and len(arm["evals"]) == 3
        assert arm["evals"][-1]["wire_bytes"] <= arm["tx_bytes"]
    assert diloco["inner_bytes"] == 0  # one rank per site: nothing travels inside a worker
    # the shaped link is the bottleneck: DDP's 4 fp32 all-reduces take about 4 x 4P x 8 / 10 Mbit/s of blocking
    assert ddp["wait_seconds"] > 0.8 * 4 * 4 * P * 8 / 1e7
    assert (tmp_path / "wan" / "wan_bpb_vs_time.png").stat().st_size > 0
    assert "| 10 Mbit/s | DDP |" in (tmp_path / "wan" / "wan.md").read_text()


def test_wan_removes_namespaces_on_ctrl_c_and_stale_ones(base_dir, tmp_path):
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                             "bench.bench_wan", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert nobody.returncode != 0 and "needs root" in nobody.stderr

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"nwan{dead.pid}-s0"  # what a killed run leaves: its owner pid is gone
    subprocess.run(["ip", "netns", "add", stale], check=True)
    make_tiny_corpus(base_dir)
    proc = start_bench(["--arms", "ddp", "--num-iterations", "50"], tmp_path)
    try:
        deadline = time.time() + 240  # generous: a loaded machine starts torchrun slowly
        log = tmp_path / "wan" / "logs" / "wan_10000000_ddp_site1.log"
        while not log.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # wait until both sites train
        assert log.exists() and len(namespaces(proc.pid)) == 3, "the bench never started training"
        assert stale not in namespaces(dead.pid)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out = finish(proc, timeout=60)
        assert proc.returncode != 0, out[-3000:]
        assert namespaces(proc.pid) == [], out[-3000:]  # sites, hub, their veths and qdiscs
    finally:
        stop(proc)
        if stale in namespaces(dead.pid):
            subprocess.run(["ip", "netns", "del", stale])
