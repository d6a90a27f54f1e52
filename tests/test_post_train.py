"""mid_train and chat_sft from a tiny base checkpoint, in both sync modes, and across them: a DiLoCo
checkpoint feeds a DDP stage and the reverse, with no conversion step."""

import os

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step, load_checkpoint
from tests.helpers_pipeline import TINY_MODEL, make_tiny_corpus, read_metrics, torchrun

SYNC = {"ddp": ["--sync", "ddp"], "diloco": ["--sync", "diloco", "--diloco-h", "2"]}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("post_train_base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        make_tiny_corpus(base)
        torchrun("scripts.base_train", TINY_MODEL + ["--num-iterations", "20", "--eval-every", "0", "--model-tag", "tiny"])
    return base


def final(stage, tag):
    d = checkpoint_dir(stage, tag)
    model, _, meta, _ = load_checkpoint(d, find_last_step(d), "cpu")
    return model, meta, read_metrics(os.path.join(d, "metrics.jsonl"))


# DDP mid -> DiLoCo SFT; the other handoff (a DiLoCo checkpoint into DDP stages) is arm (c) of test_compare
@pytest.mark.parametrize("mid_mode,sft_mode", [("ddp", "diloco")])
def test_mid_then_sft_in_both_sync_modes(base_checkpoint, monkeypatch, mid_mode, sft_mode):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_checkpoint))
    tag = f"{mid_mode}_{sft_mode}"
    torchrun("scripts.mid_train", ["--model-tag", "tiny", "--output-tag", tag, "--num-iterations", "8",
                                   "--device-batch-size", "4", "--max-seq-len", "128", "--eval-every", "4",
                                   "--eval-batches", "4", *SYNC[mid_mode]])
    base_model, _, _ = final("base", "tiny")
    mid_model, mid_meta, mid_metrics = final("mid", tag)
    assert mid_meta["sync"] == mid_mode and mid_meta["source_tag"] == "tiny"
    assert set(mid_model) == set(base_model)
    assert any(not torch.equal(mid_model[k], base_model[k]) for k in base_model)
    bpbs = [m["val_bpb"] for m in mid_metrics if "val_bpb" in m]
    assert len(bpbs) == 3 and all(b == b and b < 10 for b in bpbs)  # finite
    losses = [m["loss"] for m in mid_metrics if "loss" in m]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5  # the new format (special tokens, tasks) is being learned
    assert mid_meta["inner_bytes"] > 0 and mid_meta["outer_bytes"] == 0  # DDP: gradients every step, no outer sync

    torchrun("scripts.chat_sft", ["--model-tag", tag, "--num-iterations", "4", "--device-batch-size", "2",
                                  "--examples-per-step", "8", "--max-seq-len", "256", "--eval-every", "2",
                                  "--eval-batches", "2", *SYNC[sft_mode]])
    sft_model, sft_meta, sft_metrics = final("sft", tag)
    assert sft_meta["sync"] == sft_mode and sft_meta["source"] == "mid" and sft_meta["source_tag"] == tag
    assert any(not torch.equal(sft_model[k], mid_model[k]) for k in mid_model)
    losses = [m["loss"] for m in sft_metrics if "loss" in m]
    assert len(losses) == 4 and all(0 <= l < 20 for l in losses)


def test_mid_resume_and_mid_round_evals_change_nothing(base_checkpoint, monkeypatch):
    """DiLoCo midtraining (H = 2) with mid-round evals (step 3) and save (step 5), stopped after step 3, in the
    middle of a round, and resumed, equals the run that never stopped and evaluates only at the end (CPU, bit
    for bit): same weights, losses and final val bpb."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_checkpoint))
    common = ["--model-tag", "tiny", "--num-iterations", "7", "--device-batch-size", "4", "--max-seq-len", "128",
              "--eval-batches", "2", *SYNC["diloco"]]
    schedule = ["--eval-every", "3", "--save-every", "5"]
    torchrun("scripts.mid_train", common + ["--eval-every", "0", "--output-tag", "quiet"])
    torchrun("scripts.mid_train", common + schedule + ["--output-tag", "parts", "--stop-after", "3"])
    torchrun("scripts.mid_train", common + schedule + ["--output-tag", "parts", "--resume"])
    losses = lambda metrics: [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    bpbs = lambda metrics: [(m["step"], m["val_bpb"]) for m in metrics if "val_bpb" in m]
    quiet_model, quiet_meta, quiet = final("mid", "quiet")
    model, meta, metrics = final("mid", "parts")
    assert [s for s, _ in losses(quiet)] == list(range(1, 8)) and [s for s, _ in bpbs(metrics)] == [0, 3, 6, 7]
    assert losses(metrics) == losses(quiet) and bpbs(metrics)[-1:] == bpbs(quiet)
    assert all(torch.equal(quiet_model[k], model[k]) for k in quiet_model)
    assert meta["outer_bytes"] == quiet_meta["outer_bytes"] > 0
