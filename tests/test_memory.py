"""--device-batch-size auto under a fake memory limit (the largest micro-batch that fits is chosen, the search
leaves the weights and optimizers as they were, accumulation keeps the total batch; ranks agree), and an
out-of-memory error in training ends the run with one line naming the flag and a value to try."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir
from nanochat.common import UsageError
from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import (batch_size_arg, candidate_batch_sizes, find_device_batch_size, out_of_memory_message,
                             training_step_trial)
from tests.dist_utils import run_distributed
from tests.helpers_pipeline import ROOT, TINY_MODEL, make_tiny_corpus

SEQ = 16


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=SEQ, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model, model.setup_optimizers()


def test_auto_batch_is_the_largest_that_fits_and_changes_nothing():
    torch.set_num_threads(1)
    model, optimizers = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tried = []

    def micro_step(x, y):  # fake memory: 24 rows fit, or 12 once the optimizer state takes its share
        stepped = any(opt.state for opt in optimizers)
        tried.append((x.size(0), stepped))
        if x.size(0) * (2 if stepped else 1) > 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has 79 GiB")
        return model(x, y)

    rows_per_rank = 64  # e.g. --total-batch-size 1024 = 64 rows of 16 tokens, one rank
    candidates = candidate_batch_sizes(rows_per_rank, 32)
    assert candidates == [32, 16, 8, 4, 2, 1]
    trial = training_step_trial(micro_step, model, optimizers, SEQ, torch.device("cpu"))
    b, too_big = find_device_batch_size(trial, candidates, torch.device("cpu"))
    # 32 fails at once; 16 fails after its optimizer step (which the search undoes); 8 fits both phases
    assert (b, too_big) == (8, [32, 16])
    assert tried == [(32, False), (16, False), (16, True), (8, False), (8, True)]
    assert rows_per_rank // b * b == rows_per_rank  # 8 micro-steps of 8 rows: the total batch is kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not opt.state for opt in optimizers) and all(p.grad is None for p in model.parameters())

    # training after the search equals training without it, step for step
    ref_model, ref_optimizers = tiny_model()
    x = torch.randint(0, 64, (rows_per_rank, SEQ), generator=torch.Generator().manual_seed(1))
    for m, opts in ((model, optimizers), (ref_model, ref_optimizers)):
        for chunk in x.split(b):
            (m(chunk, chunk.roll(-1, 1)) / (rows_per_rank // b)).backward()
        for opt in opts:
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))

    # fresh optimizers only; 1 must fit
    with pytest.raises(ValueError, match="before the first optimizer step"):
        training_step_trial(micro_step, model, optimizers, SEQ, torch.device("cpu"))
    with pytest.raises(UsageError, match="even at --device-batch-size 1"):
        find_device_batch_size(never_fits, [2, 1], torch.device("cpu"))


def never_fits(b):
    raise torch.OutOfMemoryError("CUDA out of memory")
    yield


def _ranks_disagree(rank, world_size):
    """Rank 1 has less memory than rank 0, and runs out only after the (collective) optimizer phase."""
    limit = 16 if rank == 0 else 4

    def trial(b):
        if b > 2 * limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield
        torch.distributed.all_reduce(torch.ones(1))  # an optimizer's gradient all-reduce: all ranks or none
        if b > limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield

    return find_device_batch_size(trial, [32, 16, 8, 4, 2, 1], torch.device("cpu"))


def test_ranks_agree_on_one_batch_size(tmp_path):
    assert run_distributed(_ranks_disagree, 2, tmp_path) == [(4, [32, 16, 8])] * 2


def test_out_of_memory_message_names_the_flag_and_a_value_to_try():
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacity of 79 GiB")
    assert out_of_memory_message(e, 32) == ("error: out of memory at --device-batch-size 32 (CUDA out of memory. Tried "
                                            "to allocate 8.00 GiB): try --device-batch-size 16 (gradient accumulation "
                                            "keeps the total batch), or --device-batch-size auto")
    assert "try --device-batch-size 3 " in out_of_memory_message(e, 6)  # a divisor: accumulation still adds up
    assert "does not fit this device" in out_of_memory_message(e, 1)
    assert batch_size_arg("auto") == "auto" and batch_size_arg("8") == 8
    for bad in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            batch_size_arg(bad)


INJECT = """
import runpy, sys, torch
from nanochat.gpt import GPT
forward, calls = GPT.forward, []
def failing(self, *args, **kwargs):  # the third training micro-step runs out of memory
    calls.append(self.training)
    if sum(calls) == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacity of 79 GiB")
    return forward(self, *args, **kwargs)
GPT.forward = failing
sys.argv = ["base_train"] + sys.argv[1:]
runpy.run_module("scripts.base_train", run_name="__main__")
"""


def test_out_of_memory_in_training_ends_with_one_line_not_a_traceback(base_dir):
    make_tiny_corpus(base_dir, n=600)
    proc = subprocess.run([sys.executable, "-c", INJECT, *TINY_MODEL, "--num-iterations", "4", "--eval-every", "0",
                           "--model-tag", "oom"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: out of memory at --device-batch-size 4 (CUDA out of memory. Tried to allocate 8.00 GiB): "
        "try --device-batch-size 2 (gradient accumulation keeps the total batch), or --device-batch-size auto")
    ckpt = checkpoint_dir("base", "oom")  # nothing but the metrics log was written
    assert not os.path.isdir(ckpt) or os.listdir(ckpt) == ["metrics.jsonl"]


def test_the_search_holds_aside_what_diloco_allocates_at_its_first_outer_step():
    from diloco.codecs import CODECS
    from diloco.sync import DDPSync, DiLoCoSync, SyncConfig, WorkerGroups
    torch.set_num_threads(1)
    model, optimizers = tiny_model()
    groups = WorkerGroups(1, 1, 0, 0, None, None)
    assert DDPSync(model, optimizers, groups).later_device_bytes() == 0
    for codec, momentum in (("none", 0.9), ("none", 0.0), ("int8", 0.9)):
        sync = DiLoCoSync(model, optimizers, groups, SyncConfig(mode="diloco", h=1),
                          codec_factory=lambda sizes, device: CODECS[codec](sizes, device),
                          outer_optimizer=lambda params: torch.optim.SGD(params, lr=0.7, momentum=momentum))
        expected = sync.later_device_bytes()
        model(*(torch.zeros(2, SEQ, dtype=torch.long),) * 2).backward()
        sync.step()  # H = 1: the outer step allocates the momentum and the codec's error feedback
        buffers = [s["momentum_buffer"] for s in sync.outer_optimizer.state.values() if s.get("momentum_buffer") is not None]
        buffers += [getattr(frag.codec, b) for frag in sync.fragments for b in frag.codec.buffers]
        assert expected == sum(t.numel() * t.element_size() for t in buffers)  # exact for one worker
        assert (expected > 0) == (momentum > 0 or codec != "none")
