"""Outer-exchange codecs: identical results on every rank, accuracy, exact wire bytes against independent
formulas, error feedback that conserves the sum, exact resume. Distributed cases run on 4 gloo processes."""

import argparse
import math

import pytest
import torch
import torch.distributed as dist

from diloco.codecs import CODECS, add_codec_args, make_codec
from nanochat import comm
from tests.dist_utils import run_distributed

SIZES = [300, 45, 1000]  # P = 1345 in 3 pieces: shards and chunks that do not divide evenly
QUANTISED = ("bf16", "int8", "int4")


def codec_args(name, *argv):
    return add_codec_args(argparse.ArgumentParser()).parse_args(["--outer-compression", name, *argv])


def expected_wire_bytes(name, sizes, k, topk_fraction=0.02, dct_fraction=1 / 32, dct_chunk=64):
    """Bytes one rank sends per exchange, derived here from the transports rather than from the codecs."""
    P, n = sum(sizes), len(sizes)
    if name == "none":
        return 2 * (k - 1) * 4 * P // k  # fp32 ring all-reduce
    if name in QUANTISED:
        shard = math.ceil(P / k)
        if name == "int4":
            shard += shard % 2
        scales = 4 * math.ceil(shard / 256)
        shard_bytes = {"bf16": 2 * shard, "int8": shard + scales, "int4": shard // 2 + scales}[name]
        payload = k * shard_bytes
        return 2 * (k - 1) * payload // k  # reduce-scatter + all-gather: 2 (K-1)/K x payload
    if name == "topk":
        payload = 0
        for size in sizes:
            index_bytes = 1 if size <= 2 ** 8 else 2 if size <= 2 ** 16 else 3 if size <= 2 ** 24 else 4
            payload += 4 + math.ceil(topk_fraction * size) * (1 + index_bytes)
        return (k - 1) * payload  # all-gather
    per_chunk = math.ceil(dct_fraction * dct_chunk)
    return (k - 1) * (4 * n + 2 * per_chunk * sum(math.ceil(size / dct_chunk) for size in sizes))


def rank_input(rank, round_):
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(100 * rank + round_))


def _four_workers(rank, world_size):
    comm.label_group(dist.group.WORLD, "outer")
    out = {}
    for name in CODECS:
        codec = make_codec(codec_args(name), SIZES, "cpu", momentum=0.9)
        rounds = []
        for r in range(3):
            before = comm.comm_stats().get("outer", {"bytes": 0})["bytes"]
            result = codec.exchange(rank_input(rank, r), dist.group.WORLD)
            rounds.append((result.clone(), comm.comm_stats()["outer"]["bytes"] - before))
        out[name] = {"rounds": rounds, "wire_bytes": codec.wire_bytes(world_size)}
    # the ring model of each collective, one call each
    comm.reset_comm_stats()
    t = torch.ones(10)
    figures = {}
    for op, call in [("all_reduce", lambda: comm.all_reduce_mean(t.clone(), dist.group.WORLD)),
                     ("broadcast", lambda: comm.broadcast(t.clone(), 0, dist.group.WORLD)),
                     ("all_gather", lambda: comm.all_gather(t, dist.group.WORLD))]:
        before = comm.comm_stats().get("outer", {"bytes": 0})["bytes"]
        call()
        figures[op] = comm.comm_stats()["outer"]["bytes"] - before
    # the test delay: counted in the label's seconds, removed by 0
    comm.reset_comm_stats()
    comm.set_comm_delay("outer", 0.3)
    comm.all_reduce_mean(t.clone(), dist.group.WORLD)
    delayed = comm.comm_stats()["outer"]["seconds"]
    comm.set_comm_delay("outer", 0)
    comm.reset_comm_stats()
    comm.all_reduce_mean(t.clone(), dist.group.WORLD)
    return out, figures, delayed, comm.comm_stats()["outer"]["seconds"]


def test_codecs_on_four_workers(tmp_path):
    results = run_distributed(_four_workers, 4, tmp_path)
    truth = [torch.stack([rank_input(rank, r) for rank in range(4)]).mean(0) for r in range(3)]
    for name in CODECS:
        per_rank = [res[0][name] for res in results]
        expected = expected_wire_bytes(name, SIZES, 4)
        for r in range(3):
            first = per_rank[0]["rounds"][r][0]
            for rank in range(1, 4):
                assert torch.equal(per_rank[rank]["rounds"][r][0], first), f"{name}: rank {rank} differs, round {r}"
            for rank in range(4):
                assert per_rank[rank]["rounds"][r][1] == per_rank[rank]["wire_bytes"] == expected, name
        if name == "none":
            assert (per_rank[0]["rounds"][0][0] - truth[0]).abs().max().item() < 1e-6
        if name in QUANTISED:  # first round, no carried error yet: one rounding per stage
            step = {"bf16": 2 ** -8, "int8": 1 / 127, "int4": 1 / 7}[name]
            bound = step * torch.stack([rank_input(rank, 0) for rank in range(4)]).abs().max().item()
            assert (per_rank[0]["rounds"][0][0] - truth[0]).abs().max().item() < bound, name
    # quantised codecs at K = 4 send 2 * 3/4 of the payload (4 shards of B bytes): 6 B per rank
    assert expected_wire_bytes("int8", SIZES, 4) == 6 * (337 + 4 * 2)
    assert expected_wire_bytes("int4", SIZES, 4) == 6 * (338 // 2 + 4 * 2)
    assert expected_wire_bytes("bf16", SIZES, 4) == 6 * 2 * 337
    _, figures, delayed, undelayed = results[0]
    assert figures == {"all_reduce": 2 * 3 * 40 // 4, "broadcast": 3 * 40 // 4, "all_gather": 3 * 40}
    assert delayed >= 0.3 and undelayed < 0.3


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "topk"])
def test_error_feedback_keeps_the_sum(name):
    """Over many rounds a codec transmits the true total, up to what its error buffers still hold."""
    torch.manual_seed(0)
    sizes = [100, 37]
    codec = make_codec(codec_args(name), sizes, "cpu")
    total_true, total_sent = torch.zeros(137), torch.zeros(137)
    for _ in range(50):
        x = torch.randn(137)
        total_true += x
        total_sent += codec.exchange(x.clone(), None)
    state = codec.state_dict()
    held = state["error"] + (state["shard_error"][:137] if "shard_error" in state else 0)
    assert (total_true - total_sent - held).abs().max().item() < 1e-4
    if name != "topk":  # one quantisation step at most, not an accumulation
        assert state["error"].abs().max().item() < {"bf16": 0.02, "int8": 0.05, "int4": 0.5}[name]


def dct_basis(c):
    """Orthonormal DCT-II basis, row k = frequency k, built from its definition."""
    b = torch.zeros(c, c, dtype=torch.float64)
    for k in range(c):
        for j in range(c):
            b[k, j] = math.cos(math.pi * (j + 0.5) * k / c) * math.sqrt((1 if k == 0 else 2) / c)
    return b


@pytest.mark.parametrize("fraction,momentum", [(1 / 16, 0.9), (1.0, 0.0)])
def test_dct_momentum_keeps_the_decayed_sum(fraction, momentum):
    """m_t = mu m_{t-1} + delta_t - sent_t, so sum_t mu^(T-t) (delta_t - sent_t) is exactly the momentum the
    worker still holds (pieces of whole chunks: nothing falls on padding)."""
    torch.manual_seed(0)
    sizes, chunk = [128, 64], 64
    codec = make_codec(codec_args("dct", "--outer-dct-fraction", str(fraction), "--outer-dct-chunk", str(chunk)),
                       sizes, "cpu", momentum=momentum)
    assert codec.owns_momentum and codec.transport == "all_gather"
    acc = torch.zeros(192, dtype=torch.float64)
    for _ in range(50):
        x = torch.randn(192)
        acc = momentum * acc + (x - codec.exchange(x.clone(), None)).double()
    held = (codec.state_dict()["momentum"].double() @ dct_basis(chunk)).reshape(-1)
    assert (acc - held).abs().max().item() < 1e-4
    if fraction == 1.0:  # everything sent: only int8 rounding of the coefficients stays behind
        assert held.abs().max().item() < 0.05


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "topk", "dct"])
def test_state_dict_round_trip_is_exact(name):
    torch.manual_seed(0)
    a = make_codec(codec_args(name), SIZES, "cpu", momentum=0.9)
    for _ in range(3):
        a.exchange(torch.randn(sum(SIZES)), None)
    state = a.state_dict()
    assert state["codec"] == name and all(t.device.type == "cpu" for t in state.values() if torch.is_tensor(t))
    b = make_codec(codec_args(name), SIZES, "cpu", momentum=0.9)
    b.load_state_dict(state)
    x = torch.randn(sum(SIZES))
    assert torch.equal(a.exchange(x.clone(), None), b.exchange(x.clone(), None))
    other = make_codec(codec_args("int8" if name != "int8" else "bf16"), SIZES, "cpu")
    with pytest.raises(ValueError, match=f"{name}.*{other.name}"):
        other.load_state_dict(state)


def test_none_is_a_plain_mean_and_bad_flags_are_named():
    x = torch.randn(sum(SIZES))
    assert torch.equal(make_codec(codec_args("none"), SIZES, "cpu").exchange(x.clone(), None), x)
    with pytest.raises(ValueError, match="--outer-topk-fraction"):
        make_codec(codec_args("topk", "--outer-topk-fraction", "0"), SIZES, "cpu")
    with pytest.raises(ValueError, match="--outer-dct-chunk"):
        make_codec(codec_args("dct", "--outer-dct-chunk", "300"), SIZES, "cpu")
    with pytest.raises(ValueError, match="comm delay"):
        comm.set_comm_delay("outer", -1)
