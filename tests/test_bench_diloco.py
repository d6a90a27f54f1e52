"""bench/bench_diloco.py at micro scale: the bytes it reports are the exact DDP and DiLoCo figures."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from diloco.fragments import split_into_fragments
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from tests.test_codecs import expected_wire_bytes
from tests.helpers_pipeline import ROOT, TINY_MODEL, make_tiny_corpus


def test_bench_reports_exact_bytes_and_ratio(base_dir, tmp_path):
    make_tiny_corpus(base_dir)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench.bench_diloco", "--num-iterations", "4", "--hs", "2", "--compressions", "int8",
           "--streaming", "2:0", "--overlap-delay-ms", "0", "--overhead-rounds", "1", "--out", str(out), *TINY_MODEL]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "diloco.json").read_text())
    ddp, int8, stream = result["arms"]
    assert (ddp["arm"], int8["arm"], stream["arm"]) == ("ddp", "diloco_h2_int8", "diloco_h2_f2_tau0")

    vocab = get_tokenizer().get_vocab_size()
    with torch.device("meta"):  # the TINY_MODEL shape, counted independently of the bench
        params = list(GPT(config_from_depth(2, vocab, 64, aspect_ratio=32, head_dim=32)).parameters())
    P = sum(p.numel() for p in params)
    ddp_bytes = 4 * 2 * 4 * P  # 4 steps x 2 ranks x fp32 gradient all-reduce
    shard = math.ceil(P / 2)  # int8 at 2 workers: all_to_all then all-gather of one shard, one fp32 scale per 256
    int8_bytes = 2 * 2 * 2 * (shard + 4 * math.ceil(shard / 256))  # 2 syncs x 2 workers x 2 collectives
    assert ddp["bytes_across_workers"] == ddp["inner_bytes"] == ddp_bytes
    assert int8["bytes_across_workers"] == int8["outer_bytes"] == int8_bytes
    assert int8["inner_bytes"] == 0  # one rank per worker: nothing travels inside a worker
    assert int8["ratio_ddp_over_arm"] == int8["expected_ratio"] == ddp_bytes / int8_bytes
    assert 7.85 < int8["ratio_ddp_over_arm"] < 8  # just under 4H because of the scales (4 bytes per 256)
    assert (ddp["bytes_check"], int8["bytes_check"]) == ("PASS", "PASS")
    assert ddp["tokens"] == int8["tokens"] == 4 * 512
    assert int8["bytes_per_token"] == int8_bytes / (4 * 512)
    assert ddp["bpb_gap_pct"] == 0 and int8["bpb_gap_pct"] == pytest.approx(100 * (int8["val_bpb"] / ddp["val_bpb"] - 1))

    # streaming, 2 fragments at H=2: fragment 0 syncs at steps 1 and 3, fragment 1 at 2 and 4, and fragment 0
    # once more at the end of training (it took a step since its last sync); each sync event is half the model
    n0 = sum(p.numel() for p in split_into_fragments(params, 2)[0])
    assert abs(n0 - P / 2) <= 128  # the cut falls at the nearest row (rows of at most 256 numbers here)
    assert stream["bytes_across_workers"] == 2 * 4 * (2 * P + n0) and stream["bytes_check"] == "PASS"
    assert stream["peak_bytes_per_sync_event"] == 4 * max(n0, P - n0)
    assert stream["bpb_gap_vs_plain_pct"] is None  # no plain arm in this run to compare with

    # overhead: warm-up + 1 round of H-step blocks, each with exactly one outer step
    assert result["overhead"]["h"] == 2 and result["overhead"]["outer_syncs"] == 2
    table = (out / "diloco.md").read_text()
    assert "| diloco_h2_int8 |" in table and "FAIL" not in table

    # --reuse continues an interrupted bench: finished arms with the same flags are read, not run again
    proc = subprocess.run(cmd[:-len(TINY_MODEL)] + ["--reuse", "--overhead-rounds", "0", *TINY_MODEL], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reusing the finished run") == 3
    again = json.loads((out / "diloco.json").read_text())["arms"]
    assert [(a["arm"], a["val_bpb"], a["bytes_across_workers"]) for a in again] == \
        [(a["arm"], a["val_bpb"], a["bytes_across_workers"]) for a in result["arms"]]

    # --sweep: DDP (reused), two grid points (the second the default DiLoCo every gap is also measured against),
    # one point of SparseLoCo's grid and a recipe, ranked with their bytes; the grid point at H=2 sends 2 fp32 syncs
    # of the model where DDP sends 4 gradient all-reduces, the default and the recipe at H=50 only the final sync,
    # SparseLoCo at H=2 two sparse 2-bit payloads
    sparse = ["--sweep-sparse-hs", "2", "--sweep-sparse-densities", "0.02", "--sweep-sparse-decays", "0.95",
              "--sweep-sparse-lrs", "1.0"]
    proc = subprocess.run([sys.executable, "-m", "bench.bench_diloco", "--num-iterations", "4", "--sweep", "--sweep-hs", "2,50",
                           "--sweep-lrs", "0.7", "--sweep-momenta", "0.9", "--sweep-workers", "2", *sparse,
                           "--recipes", "final_average,h10_int4_average", "--out", str(out), *TINY_MODEL], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reusing the finished run") == 1  # the DDP arm above
    rows = {r["arm"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert list(rows) == ["ddp", "sweep_h2_lr0.7_m0.9_w2", "sweep_h50_lr0.7_m0.9_w2", "sparse_h2_d0.02_b0.95_lr1.0",
                          "recipe_final_average", "recipe_h10_int4_average"]
    assert rows["ddp"]["val_bpb"] == ddp["val_bpb"]
    assert rows["sweep_h2_lr0.7_m0.9_w2"]["bytes_across_workers"] == 2 * 2 * 4 * P
    assert rows["sweep_h50_lr0.7_m0.9_w2"]["bytes_across_workers"] == 1 * 2 * 4 * P
    sizes = [p.numel() for p in params]
    assert rows["sparse_h2_d0.02_b0.95_lr1.0"]["bytes_across_workers"] == \
        2 * 2 * expected_wire_bytes("sparseloco", sizes, 2, sl_density=0.02)  # 2 syncs x 2 ranks
    # the Pareto front: no run on it has another with no more bytes and no worse val bpb; DDP (gap 0) and the
    # run with the fewest bytes of those ending best are on it
    for r in rows.values():
        dominated = any(o is not r and o["bytes_across_workers"] <= r["bytes_across_workers"] and o["val_bpb"] <= r["val_bpb"]
                        and (o["bytes_across_workers"], o["val_bpb"]) != (r["bytes_across_workers"], r["val_bpb"])
                        for o in rows.values())
        assert r["front"] == (not dominated), r["arm"]
    fewest = min(rows.values(), key=lambda r: (r["bytes_across_workers"], r["val_bpb"]))
    assert fewest["front"] and (rows["ddp"]["front"] or any(r["val_bpb"] <= ddp["val_bpb"] for r in rows.values() if r is not rows["ddp"]))
    assert (out / "sweep.png").stat().st_size > 0
    default_gap = rows["sweep_h50_lr0.7_m0.9_w2"]["gap_vs_ddp"]
    for r in rows.values():  # also for the row ranked before the default's
        assert r["gap_vs_default"] == (r["gap_vs_ddp"] / default_gap if default_gap > 0 else None)
    assert rows["recipe_final_average"]["bytes_across_workers"] == 1 * 2 * 4 * P
    assert rows["recipe_final_average"]["ddp_bytes_over_arm"] == 4.0
    assert "| recipe_final_average |" in (out / "sweep.md").read_text()

    # --sweep-finished: the table of what has finished so far, training nothing; the rest is named. A run is found
    # by its flags' values: h10_int4_average's `--outer-momentum 0` was saved as 0.0 and is the same run
    sweep = [sys.executable, "-m", "bench.bench_diloco", "--num-iterations", "4", "--sweep", "--sweep-hs", "2,50,3",
             "--sweep-lrs", "0.7", "--sweep-momenta", "0.9", "--sweep-workers", "2", *sparse,
             "--recipes", "final_average,h10_int4_average", "--sweep-finished", "--out", str(out), *TINY_MODEL]
    proc = subprocess.run(sweep, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps on" not in proc.stdout and not os.path.exists(out / "logs" / "sweep_h3_lr0.7_m0.9_w2.log")
    partial = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["arm"], r["val_bpb"]) for r in partial] == [(a, rows[a]["val_bpb"]) for a in rows]
    assert "6 of 7 runs finished, not yet run: sweep_h3_lr0.7_m0.9_w2" in (out / "sweep.md").read_text()
    # without a finished DDP run (another seed) there is nothing to compare with: a clear error
    proc = subprocess.run(sweep + ["--seed", "7"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no finished DDP run" in proc.stderr
