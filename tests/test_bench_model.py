"""bench/bench_model.py's nanochat arms: the schedule nanochat's own base_train would run at the bench's shape and
batch, worked out by hand from its rules (karpathy/nanochat 92d63d4, scripts/base_train.py) for given parameter
counts. No nanochat checkout is needed: the counts come from a stand-in model."""

import math

import pytest

from bench.bench_model import nanochat_schedule
from nanochat.train_loop import lr_multiplier, muon_momentum


class Counts:
    def __init__(self, matrices, lm_head):
        self.counts = dict(transformer_matrices=matrices, lm_head=lm_head, wte=lm_head, value_embeds=7, scalars=3)

    def num_scaling_params(self):
        return self.counts


# depth 2 width 128 and its depth-12 reference (width 768), vocab 4096: the counts nanochat's GPT reports
MODELS = {2: Counts(393_240, 524_288), 12: Counts(84_935_520, 3_145_728)}
OURS = (lr_multiplier, muon_momentum)


def test_nanochat_arm_scales_lrs_and_weight_decay_with_batch_and_horizon_as_its_base_train():
    kwargs, at = nanochat_schedule("nanochat", MODELS.get, 2, 60, OURS)
    # 8,192 tokens per step against its 2^19 reference: every lr x sqrt(1/64) = 0.125
    assert kwargs["matrix_lr"] == pytest.approx(0.0025) and kwargs["embedding_lr"] == pytest.approx(0.0375)
    assert kwargs["unembedding_lr"] == pytest.approx(0.001) and kwargs["scalar_lr"] == pytest.approx(0.0625)
    # weight decay 0.28 x 0.125 x D_ref / D, D = 12 x (matrices + lm_head): 88,081,248 / 917,528 scaling params
    assert kwargs["weight_decay"] == pytest.approx(0.28 * 0.125 * (12 * 88_081_248) / (12 * 917_528))
    assert kwargs["weight_decay"] == pytest.approx(3.35995, abs=1e-5)
    # 40 warmup steps, then the warmdown of round(0.65 x 60) = 39 steps is already under way: step 40 is at
    # (60 - 40) / 39 of the way from 0.05 to 1
    assert [at(s)[0] for s in (0, 39)] == pytest.approx([1 / 40, 1.0])
    assert at(40)[0] == pytest.approx(20 / 39 + (1 - 20 / 39) * 0.05)
    assert at(59)[0] == pytest.approx(1 / 39 + (38 / 39) * 0.05)
    # momentum warms up over 400 steps and only then may fall: at 60 steps it never does
    assert [at(s)[1] for s in (0, 30, 59)] == pytest.approx([0.85, 0.85 + 0.12 * 30 / 400, 0.85 + 0.12 * 59 / 400])
    # weight decay: a cosine from the scaled value to zero
    assert at(30)[2] == pytest.approx(kwargs["weight_decay"] * 0.5)


def test_nanochat_tinylr_arm_is_the_benchs_previous_schedule():
    kwargs, at = nanochat_schedule("nanochat_tinylr", MODELS.get, 2, 60, OURS)
    assert kwargs == dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5, weight_decay=0.28)
    # no warmup; flat to step 21 = 60 - 39, then to 0.05; momentum jumps to 0.97 there and falls to 0.90
    assert [at(s)[0] for s in (0, 21)] == [1.0, 1.0] and at(22)[0] == pytest.approx(38 / 39 + 0.05 / 39)
    assert at(20)[1] == pytest.approx(0.85 + 0.12 * 20 / 400) and at(21)[1] == pytest.approx(0.97)
    assert at(59)[1] == pytest.approx(0.97 - 0.07 * 38 / 39)
    assert at(15)[2] == pytest.approx(0.28 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_nanochat_oursched_arm_runs_our_base_train_schedule():
    kwargs, at = nanochat_schedule("nanochat_oursched", MODELS.get, 2, 60, OURS)
    assert (kwargs["matrix_lr"], kwargs["weight_decay"]) == (0.02, 0.28)
    # ours: warmdown over the last 20 % to 0, momentum 0.85 -> 0.95 over 300 steps
    assert [at(s)[0] for s in (0, 48, 54)] == pytest.approx([1.0, 1.0, 0.5])
    assert at(30)[1] == pytest.approx(0.86)
    with pytest.raises(ValueError, match="unknown nanochat arm"):
        nanochat_schedule("nanochat_x", MODELS.get, 2, 60, OURS)
