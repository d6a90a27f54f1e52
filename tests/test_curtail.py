"""Curtailment-window replay: a 3-site micro schedule trains segment by segment with one DiLoCo worker per
available site, reads every document at most once across the worker-count changes, records each site's
participation, and leaves weights that a normal base_train --resume continues from."""

import json
import os

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step
from nanochat.dataloader import RowGroups
from nanochat.tokenizer import get_tokenizer
from scripts.curtail_run import ROOT, load_schedule, main, read_trace, segments
from tests.helpers_pipeline import TINY_MODEL, make_tiny_corpus, torchrun

# all three sites, b alone, nobody (skipped), a + c: 3, 1, 0, 2 workers
SCHEDULE = "site,start,end\na,0,1\nb,0,2\nc,0,1\na,3,4\nc,3,4\n"
H, SITE_BATCH, T = 2, 256, 64  # TINY_MODEL: 4 x 64 tokens per micro-step, so one micro-step per rank and step
_at = TINY_MODEL.index("--total-batch-size")  # the replay sets the batch per segment
TRAIN_FLAGS = TINY_MODEL[:_at] + TINY_MODEL[_at + 2:]


def test_segments_of_a_schedule(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(SCHEDULE)
    assert segments(load_schedule(str(path))) == [(0, 1, ("a", "b", "c")), (1, 2, ("b",)), (2, 3, ()),
                                                  (3, 4, ("a", "c"))]
    shipped = load_schedule(os.path.join(ROOT, "scripts", "schedules", "pvlib_3sites.json"))
    assert shipped["sites"] == ["sand_point_ak", "greensboro_nc", "miami_fl"] and shipped["seconds_per_round"] == 3600
    assert {len(sites) for _, _, sites in segments(shipped)} >= {0, 1, 2}


def done_rows(position, lengths):
    """(item, k) of every row a global loader position (row packing) has consumed."""
    open_items = dict(position["open"])
    return {(i, k) for i in range(position["next"]) for k in range(open_items.get(i, lengths[i]))}


def test_replay_trains_per_site_and_resumes(base_dir, tmp_path):
    make_tiny_corpus(base_dir)
    path = tmp_path / "micro.csv"
    path.write_text(SCHEDULE)
    try:
        read_trace("codecarbon", "codecarbon/data/private_infra/global_energy_mix.json")
    except RuntimeError as e:
        pytest.skip(f"codecarbon's wheel is neither cached nor downloadable: {e}")
    summary = main(["--schedule", str(path), "--diloco-h", str(H), "--site-batch-size", str(SITE_BATCH),
                    "--", *TRAIN_FLAGS, "--eval-every", "0"])
    d = checkpoint_dir("base", "curtail")
    trained = [r for r in summary["segments"] if r["workers"]]
    # one worker per available site in each segment, as the boundary checkpoints were saved
    assert [r["workers"] for r in summary["segments"]] == [3, 1, 0, 2]
    assert [r["layout"] for r in trained] == [{"world_size": k, "workers": k} for k in (3, 1, 2)]
    assert [r["last_step"] for r in trained] == [2, 4, 6] and find_last_step(d) == 6
    # participation per site: rounds available, tokens, bytes (a site alone sends nothing)
    sites = summary["sites"]
    assert {s: v["rounds_available"] for s, v in sites.items()} == {"a": 2, "b": 2, "c": 2}
    assert {s: v["tokens"] for s, v in sites.items()} == {s: 2 * H * SITE_BATCH for s in "abc"}
    assert [r["outer_bytes"] > 0 for r in trained] == [True, False, True]
    assert sites["a"]["outer_bytes_sent"] > 0 and summary["energy"]["always_on_kg"] > 0
    assert summary["energy"]["curtailed_kg"] == 0 and summary["val_bpb"] == summary["val_bpb"]  # finite, not NaN
    assert json.load(open(os.path.join(base_dir, "curtail", "curtail.json")))["tokens"] == 6 * H * SITE_BATCH
    # every document at most once: between boundaries the global data position grows by exactly the tokens read
    tokenizer, row_groups = get_tokenizer(), RowGroups("train")
    bos = tokenizer.get_bos_token_id()
    lengths = [(sum(len(t) for t in tokenizer.encode(row_groups.read(i), prepend=bos)) - 1) // T
               for i in range(row_groups.count)]  # rows of T + 1 tokens per item
    seen = set()
    for r in trained:
        position = torch.load(os.path.join(d, f"step_{r['last_step']:06d}", "shared.pt"))["extra"]["loader"]
        assert position["next"] <= row_groups.count  # still in the first epoch
        done = done_rows(position, lengths)
        assert seen <= done and len(done - seen) == r["steps"] * r["workers"] * SITE_BATCH // T
        seen = done
    # the replay's weights continue in a normal resume, here on one rank (the last segment had two workers)
    torchrun("scripts.base_train", [*TRAIN_FLAGS, "--total-batch-size", str(SITE_BATCH), "--sync", "diloco",
                                    "--diloco-h", str(H), "--num-iterations", "8", "--eval-every", "0",
                                    "--model-tag", "curtail", "--resume"], nproc=1)
    assert find_last_step(d) == 8
