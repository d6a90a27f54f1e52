"""base_train under torchrun (2 gloo processes): it learns; stop + --resume reproduces the uninterrupted run
exactly, for DDP and for DiLoCo (whose checkpoint carries theta_global, outer momentum, inner state and the
workers' own weights), stopped in the middle of a round; and evals, samples and saves (DiLoCo: mid-round)
change nothing."""

import os

import pytest

from nanochat.checkpoint import checkpoint_dir, load_checkpoint
from tests.helpers_pipeline import TINY_MODEL, make_tiny_corpus, read_metrics, torchrun

SYNC = {"ddp": ["--sync", "ddp"], "diloco": ["--sync", "diloco", "--diloco-h", "5"]}


def final(tag):
    d = checkpoint_dir("base", tag)
    weights, _, meta, _ = load_checkpoint(d, 10, "cpu")
    records = read_metrics(os.path.join(d, "metrics.jsonl"))
    # each step's record has the optimizer step's time (sync.step(): a DiLoCo outer step included), within the step's
    assert all(0 < r["opt_seconds"] < r["dt"] for r in records if "loss" in r)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    bpbs = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    return weights, meta, losses, bpbs


@pytest.mark.parametrize("mode", ["ddp", "diloco"])
def test_resume_reproduces_uninterrupted_run(base_dir, mode):
    make_tiny_corpus(base_dir)
    # DiLoCo H = 5: the evals at 3, 6, 9, the samples at 4, 8, the saves at 4, 8 and the stop at 7 are mid-round.
    # The uninterrupted run never evaluates, samples or saves before its end: the stopped-and-resumed run with all
    # of them must equal it, so both resume and the mid-round evals, samples and saves are shown to change nothing
    common = TINY_MODEL + SYNC[mode] + ["--num-iterations", "10"]
    schedule = ["--eval-every", "3", "--sample-every", "4", "--save-every", "4"]
    torchrun("scripts.base_train", common + ["--eval-every", "0", "--sample-every", "0", "--model-tag", "full"])
    torchrun("scripts.base_train", common + schedule + ["--model-tag", "split", "--stop-after", "7"])
    torchrun("scripts.base_train", common + schedule + ["--model-tag", "split", "--resume"])

    full_weights, full_meta, full_losses, full_bpbs = final("full")
    split_weights, split_meta, split_losses, split_bpbs = final("split")
    assert [s for s, _ in full_losses] == list(range(1, 11))
    assert [s for s, _ in split_bpbs] == [0, 3, 6, 9, 10] and [s for s, _ in full_bpbs] == [10]
    assert split_losses == full_losses  # bit-for-bit on CPU
    assert split_bpbs[-1] == full_bpbs[-1]
    assert all((full_weights[k] == split_weights[k]).all() for k in full_weights)
    # it learns: val bpb falls from init to the end
    assert split_bpbs[-1][1] < split_bpbs[0][1] - 0.5
    # communication: DDP all-reduces gradients every step; DiLoCo only at its outer steps (2 in 10 steps)
    if mode == "ddp":
        assert full_meta["outer_bytes"] == 0 and full_meta["inner_bytes"] > 0
    else:
        assert full_meta["inner_bytes"] == 0 and full_meta["outer_bytes"] > 0
    assert full_meta["outer_bytes"] == split_meta["outer_bytes"] and full_meta["inner_bytes"] == split_meta["inner_bytes"]
