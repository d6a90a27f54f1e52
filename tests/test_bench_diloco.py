"""bench/bench_diloco.py at micro scale: the bytes it reports are the exact DDP and DiLoCo figures."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from tests.helpers_pipeline import ROOT, TINY_MODEL, make_tiny_corpus


def test_bench_reports_exact_bytes_and_ratio(base_dir, tmp_path):
    make_tiny_corpus(base_dir)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench.bench_diloco", "--num-iterations", "4", "--hs", "2", "--compressions", "int8",
           "--overhead-rounds", "1", "--out", str(out), *TINY_MODEL]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "diloco.json").read_text())
    ddp, int8 = result["arms"]
    assert (ddp["arm"], int8["arm"]) == ("ddp", "diloco_h2_int8")

    vocab = get_tokenizer().get_vocab_size()
    with torch.device("meta"):  # the TINY_MODEL shape, counted independently of the bench
        params = list(GPT(config_from_depth(2, vocab, 64, aspect_ratio=32, head_dim=32)).parameters())
    P, n = sum(p.numel() for p in params), len(params)
    ddp_bytes = 4 * 2 * 4 * P  # 4 steps x 2 ranks x fp32 gradient all-reduce
    int8_bytes = 2 * 2 * (P + 4 * n)  # 2 syncs x 2 workers x (1 byte per parameter + one fp32 scale per tensor)
    assert ddp["bytes_across_workers"] == ddp["inner_bytes"] == ddp_bytes
    assert int8["bytes_across_workers"] == int8["outer_bytes"] == int8_bytes
    assert int8["inner_bytes"] == 0  # one rank per worker: nothing travels inside a worker
    assert int8["ratio_ddp_over_arm"] == int8["expected_ratio"] == ddp_bytes / int8_bytes
    assert 7.99 < int8["ratio_ddp_over_arm"] < 8  # just under 4H because of the scales
    assert (ddp["bytes_check"], int8["bytes_check"]) == ("PASS", "PASS")
    assert ddp["tokens"] == int8["tokens"] == 4 * 512
    assert int8["bytes_per_token"] == int8_bytes / (4 * 512)
    assert ddp["bpb_gap_pct"] == 0 and int8["bpb_gap_pct"] == pytest.approx(100 * (int8["val_bpb"] / ddp["val_bpb"] - 1))

    # overhead: warm-up + 1 round of H-step blocks, each with exactly one outer step
    assert result["overhead"]["h"] == 2 and result["overhead"]["outer_syncs"] == 2
    table = (out / "diloco.md").read_text()
    assert "| diloco_h2_int8 |" in table and "FAIL" not in table
