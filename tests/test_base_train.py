"""base_train under torchrun (2 gloo processes): it learns, and stop + --resume reproduces the uninterrupted
run exactly, for DDP and for DiLoCo (whose checkpoint carries theta_global, outer momentum, inner state)."""

import os

import pytest

from nanochat.checkpoint import checkpoint_dir, load_checkpoint
from tests.helpers_pipeline import TINY_MODEL, make_tiny_corpus, read_metrics, torchrun

SYNC = {"ddp": ["--sync", "ddp"], "diloco": ["--sync", "diloco", "--diloco-h", "3"]}


@pytest.mark.parametrize("mode", ["ddp", "diloco"])
def test_resume_reproduces_uninterrupted_run(base_dir, mode):
    make_tiny_corpus(base_dir)
    common = TINY_MODEL + SYNC[mode] + ["--num-iterations", "10", "--eval-every", "5", "--save-every", "4"]
    torchrun("scripts.base_train", common + ["--model-tag", "full"])
    torchrun("scripts.base_train", common + ["--model-tag", "split", "--stop-after", "4"])
    torchrun("scripts.base_train", common + ["--model-tag", "split", "--resume"])

    full = read_metrics(os.path.join(checkpoint_dir("base", "full"), "metrics.jsonl"))
    split = read_metrics(os.path.join(checkpoint_dir("base", "split"), "metrics.jsonl"))
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]
    bpbs = lambda recs: [(r["step"], r["val_bpb"]) for r in recs if "val_bpb" in r]
    assert [s for s, _ in losses(full)] == list(range(1, 11))
    assert losses(split) == losses(full)  # bit-for-bit on CPU
    assert bpbs(split) == bpbs(full)
    # it learns: val bpb falls from init to the end
    assert bpbs(full)[-1][1] < bpbs(full)[0][1] - 0.5
    # the final checkpoints are the same weights
    a, _, meta_a, _ = load_checkpoint(checkpoint_dir("base", "full"), 10, "cpu")
    b, _, meta_b, _ = load_checkpoint(checkpoint_dir("base", "split"), 10, "cpu")
    assert all((a[k] == b[k]).all() for k in a)
    # communication: DDP all-reduces gradients every step; DiLoCo only every H steps (+ forced syncs at evals/saves)
    if mode == "ddp":
        assert meta_a["outer_bytes"] == 0 and meta_a["inner_bytes"] > 0
    else:
        assert meta_a["inner_bytes"] == 0 and meta_a["outer_bytes"] > 0
    assert meta_a["outer_bytes"] == meta_b["outer_bytes"] and meta_a["inner_bytes"] == meta_b["inner_bytes"]
