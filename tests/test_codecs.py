"""Outer-exchange codecs: identical results on every rank, accuracy, exact wire bytes against independent
formulas, error feedback that conserves the sum, exact resume; the sparse codecs (topk, dct, sparseloco)
against plain references of what each worker selects, sends and keeps. Distributed cases run on 2 or 4
gloo processes."""

import argparse
import math

import pytest
import torch
import torch.distributed as dist

from diloco.codecs import CODECS, add_codec_args, make_codec
from nanochat import comm
from scripts.flags import codec_config
from tests.dist_utils import run_distributed

SIZES = [300, 45, 1000]  # P = 1345 in 3 pieces: shards and chunks that do not divide evenly
QUANTISED = ("bf16", "int8", "int4")


def codec_args(name, *argv):
    return codec_config(add_codec_args(argparse.ArgumentParser()).parse_args(["--outer-compression", name, *argv]))


def expected_wire_bytes(name, sizes, k, topk_fraction=0.02, dct_fraction=1 / 32, dct_chunk=64, dct_bits=8,
                        sl_density=1 / 64, sl_chunk=4096, sl_bits=2):
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
            payload += 4 + math.ceil(round(topk_fraction * size, 6)) * (1 + index_bytes)
        return (k - 1) * payload  # all-gather
    if name == "sparseloco":  # per tensor: 4 fp32 levels, 2-bit codes, indices within a chunk in just enough bits
        payload = 0
        for size in sizes:
            chunk = min(sl_chunk, size)
            values = math.ceil(round(sl_density * chunk, 6)) * math.ceil(size / chunk)
            index_bits = max(1, math.ceil(math.log2(chunk)))
            payload += (16 + math.ceil(values * 2 / 8) if sl_bits == 2 else 4 * values) + math.ceil(values * index_bits / 8)
        return (k - 1) * payload
    coefficients = math.ceil(dct_fraction * dct_chunk) * sum(math.ceil(size / dct_chunk) for size in sizes)
    if dct_bits == 32:
        return (k - 1) * 5 * coefficients  # fp32 value + uint8 index
    return (k - 1) * (4 * n + 2 * coefficients)


def rank_input(rank, round_):
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(100 * rank + round_))


def _four_workers(rank, world_size):
    comm.label_group(dist.group.WORLD, "outer")
    out = {}
    for name in CODECS:
        codec = make_codec(codec_args(name), SIZES, "cpu")
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
    codec = make_codec(codec_args("dct", "--outer-dct-fraction", str(fraction), "--outer-dct-chunk", str(chunk),
                                  "--outer-ef-decay", str(momentum)), sizes, "cpu")
    assert codec.owns_momentum and codec.transport == "all_gather"
    acc = torch.zeros(192, dtype=torch.float64)
    for _ in range(50):
        x = torch.randn(192)
        acc = momentum * acc + (x - codec.exchange(x.clone(), None)).double()
    held = (codec.state_dict()["momentum"].double() @ dct_basis(chunk)).reshape(-1)
    assert (acc - held).abs().max().item() < 1e-4
    if fraction == 1.0:  # everything sent: only int8 rounding of the coefficients stays behind
        assert held.abs().max().item() < 0.05


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "topk", "dct", "sparseloco"])
def test_state_dict_round_trip_is_exact(name):
    torch.manual_seed(0)
    a = make_codec(codec_args(name), SIZES, "cpu")
    for _ in range(3):
        a.exchange(torch.randn(sum(SIZES)), None)
    state = a.state_dict()
    assert state["codec"] == name and all(t.device.type == "cpu" for t in state.values() if torch.is_tensor(t))
    b = make_codec(codec_args(name), SIZES, "cpu")
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


# --- the sparse codecs against plain references of what each worker selects, sends and keeps --------------

SPARSE_FLAGS = {  # small chunks, so that pieces span several chunks, one is padded and one is smaller than a chunk
    "topk": ["--outer-topk-fraction", "0.05"],
    "dct": ["--outer-dct-fraction", "0.0625", "--outer-dct-chunk", "64", "--outer-ef-decay", "0.9"],
    "sparseloco": ["--outer-sparseloco-density", "0.1", "--outer-sparseloco-chunk", "64", "--outer-ef-decay", "0.9"],
}


def largest(values, k):
    """Positions of the k entries of largest magnitude of a list of floats."""
    return sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k]


def spans(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def topk_reference(delta, error, fraction=0.05):
    """One worker's round: per tensor the ceil(f n) largest entries of delta + error, int8 with one absmax scale.
    Returns (what it sent, what it keeps), as float64 vectors."""
    x = (delta.double() + error).tolist()
    sent = [0.0] * len(x)
    for start, n in spans(SIZES):
        piece = x[start:start + n]
        chosen = largest(piece, math.ceil(round(fraction * n, 6)))
        scale = max(abs(piece[i]) for i in chosen) / 127
        for i in chosen:
            sent[start + i] = max(-127, min(127, round(piece[i] / scale))) * scale
    sent = torch.tensor(sent, dtype=torch.float64)
    return sent, torch.tensor(x, dtype=torch.float64) - sent


def dct_reference(delta, momentum, fraction=0.0625, c=64, beta=0.9):
    """One worker's round: m = beta m + DCT(delta) per chunk of c (each tensor zero-padded to whole chunks), the
    ceil(f c) largest coefficients of each chunk sent in int8 (one absmax scale per tensor), m keeps the rest.
    momentum: (chunks, c) float64. Returns (sent coefficients, new momentum)."""
    basis = dct_basis(c)
    rows = []
    for start, n in spans(SIZES):
        piece = torch.cat([delta[start:start + n].double(), torch.zeros(-n % c, dtype=torch.float64)])
        rows += list(piece.view(-1, c))
    m = beta * momentum + torch.stack(rows) @ basis.T
    sent = torch.zeros_like(m)
    row = 0
    for _, n in spans(SIZES):
        chunks = range(row, row + math.ceil(n / c))
        chosen = {j: largest(m[j].tolist(), math.ceil(fraction * c)) for j in chunks}
        scale = max(abs(m[j, i].item()) for j in chunks for i in chosen[j]) / 127
        for j in chunks:
            for i in chosen[j]:
                sent[j, i] = round(m[j, i].item() / scale) * scale
        row += len(chunks)
    return sent, m - sent


def dct_decode(coefficients, c=64):
    x = (coefficients @ dct_basis(c)).reshape(-1)
    out, row = [], 0
    for _, n in spans(SIZES):
        out.append(x[row * c:row * c + n])
        row += math.ceil(n / c)
    return torch.cat(out)


def two_bits(values):
    """SparseLoCo's 2-bit quantiser of one tensor's sent values, from its description: codes round((v - mean) / s)
    + 2 clamped to 0..3, s = 6 sigma / 4 (sigma the unbiased standard deviation); each code decodes to the mean
    of the values that took it."""
    mean = sum(values) / len(values)
    sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    codes = [max(0, min(3, round((v - mean) / (1.5 * sigma)) + 2)) for v in values]
    levels = {b: sum(v for v, q in zip(values, codes) if q == b) / codes.count(b) for b in set(codes)}
    return [levels[q] for q in codes]


def sparseloco_reference(delta, error, density=0.1, chunk=64, beta=0.9):
    """One worker's round: e = beta e + delta; per run of min(chunk, n) entries of a tensor the ceil(f c)
    largest of e are sent in 2 bits (one quantiser per tensor), e keeps the rest. Returns (sent, new e)."""
    e = (beta * error + delta.double()).tolist()
    sent = [0.0] * len(e)
    for start, n in spans(SIZES):
        c = min(chunk, n)
        chosen = []
        for lo in range(0, n, c):
            block = e[start + lo:start + min(lo + c, n)]
            chosen += [start + lo + i for i in largest(block, math.ceil(round(density * c, 6)))]
        for i, v in zip(chosen, two_bits([e[i] for i in chosen])):
            sent[i] = v
    sent = torch.tensor(sent, dtype=torch.float64)
    return sent, torch.tensor(e, dtype=torch.float64) - sent


def _sparse_rounds(rank, world_size):
    comm.label_group(dist.group.WORLD, "outer")
    out = {}
    for name, flags in SPARSE_FLAGS.items():
        codec = make_codec(codec_args(name, *flags), SIZES, "cpu")
        rounds = []
        for r in range(3):
            before = comm.comm_stats().get("outer", {"bytes": 0})["bytes"]
            mean = codec.exchange(rank_input(rank, r), dist.group.WORLD)
            state = codec.state_dict()
            kept = state["momentum"] if name == "dct" else state["error"]
            rounds.append((mean, kept, comm.comm_stats()["outer"]["bytes"] - before))
        out[name] = rounds
    return out


@pytest.mark.parametrize("k", [2, 4])
def test_sparse_codecs_decode_the_mean_of_what_each_worker_selected(tmp_path, k):
    """Each worker sends the largest entries of its own buffer (per tensor, per chunk) and keeps exactly the
    rest; every rank decodes the mean over the K workers of what each one sent; the bytes are the formula's."""
    got = run_distributed(_sparse_rounds, k, tmp_path)
    for name, flags in SPARSE_FLAGS.items():
        if name == "dct":
            kept = [torch.zeros(sum(math.ceil(n / 64) for n in SIZES), 64, dtype=torch.float64) for _ in range(k)]
        else:
            kept = [torch.zeros(sum(SIZES), dtype=torch.float64) for _ in range(k)]
        values = dict(zip(flags[::2], flags[1::2]))
        expected_bytes = expected_wire_bytes(
            name, SIZES, k, topk_fraction=float(values.get("--outer-topk-fraction", 0.02)),
            dct_fraction=float(values.get("--outer-dct-fraction", 1 / 32)),
            sl_density=float(values.get("--outer-sparseloco-density", 1 / 64)), sl_chunk=64)
        for r in range(3):
            sent = []
            for w in range(k):
                reference = {"topk": topk_reference, "dct": dct_reference, "sparseloco": sparseloco_reference}[name]
                s, kept[w] = reference(rank_input(w, r), kept[w])
                sent.append(s)
            mean = sum(sent) / k
            if name == "dct":
                mean = dct_decode(mean)
            for w in range(k):
                result, held, nbytes = got[w][name][r]
                assert torch.equal(result, got[0][name][r][0]), f"{name}: rank {w} decoded another mean, round {r}"
                assert (result.double() - mean).abs().max().item() < 1e-5, (name, r)
                assert (held.double() - kept[w]).abs().max().item() < 1e-5, (name, r, w)
                assert nbytes == expected_bytes, (name, nbytes, expected_bytes)
            if name != "dct":  # entries a worker did not send are kept exactly, untouched by the codec
                unsent = sent[0] == 0
                x = rank_input(0, r) + (0 if r == 0 else (0.9 if name == "sparseloco" else 1.0) * got[0][name][r - 1][1])
                assert torch.equal(got[0][name][r][1][unsent], x[unsent]), name
                assert 0 < (~unsent).sum() < sum(SIZES) // 5  # a sparse exchange: something, and little, sent


def test_topk_indices_of_one_to_four_bytes_reach_their_entries():
    """Tensors of 200, 300, 70,000 and 2^24 + 3 entries need 1, 2, 3 and 4 bytes per index. The biggest is
    mostly zeros, with entries planted at positions whose every index byte matters; int8 holds them exactly."""
    big = 2 ** 24 + 3
    sizes = [200, 300, 70_000, big]
    flat = torch.zeros(sum(sizes))
    planted = {199: 127.0, 200 + 299: -127.0, 500 + 69_999: 127.0, 500 + 65_536: 3.0}  # the 3rd byte of 65,536
    last = 70_500 + big - 1  # the 4th byte of 2^24 + 2, and positions across the other bytes
    for i, pos in enumerate([last, last - 1, 70_500 + 2 ** 24, 70_500 + 2 ** 16 + 5, 70_500 + 257, 70_500]):
        planted[pos] = 127.0 - 2 * i
    for pos, value in planted.items():
        flat[pos] = value
    codec = make_codec(codec_args("topk", "--outer-topk-fraction", str(6 / big)), sizes, "cpu")
    assert codec.ks == [1, 1, 1, 6]
    assert codec.wire_bytes(2) == expected_wire_bytes("topk", sizes, 2, topk_fraction=6 / big) == \
        (4 + 1 * 2) + (4 + 1 * 3) + (4 + 1 * 4) + (4 + 6 * 5)
    mean = codec.exchange(flat.clone(), None)
    sent = mean.nonzero().view(-1).tolist()
    assert sent == sorted(set(planted) - {500 + 65_536})  # one per small tensor: its largest, not the 3.0
    assert all(mean[pos].item() == planted[pos] for pos in sent)
    assert codec.state_dict()["error"].nonzero().view(-1).tolist() == [500 + 65_536]  # kept: what was not sent


def test_the_sparseloco_recipe_sends_64_of_each_4096_entries_in_2_bits_and_outer_sgd_lr_1():
    from diloco import add_sync_args
    from diloco.recipes import recipe_flags
    args = add_sync_args(argparse.ArgumentParser()).parse_args(["--diloco-h", "50", *recipe_flags("sparseloco")])
    assert (args.diloco_h, args.outer_lr, args.outer_ef_decay) == (15, 1.0, 0.95)
    assert CODECS[args.outer_compression].owns_momentum  # make_sync then gives the outer SGD no momentum
    codec = make_codec(codec_config(args), [3 * 4096, 100], "cpu")
    # 3 chunks x 64 values: 4 levels (16 B) + 192 2-bit codes (48 B) + 192 12-bit indices (288 B); a tensor of 100
    # is one chunk of 2 values (ceil(100 / 64)): 16 + 1 + 2 B (7-bit indices)
    assert codec.wire_bytes(2) == 352 + 19 == expected_wire_bytes("sparseloco", [3 * 4096, 100], 2)
    assert 146 < 4 * 3 * 4096 / (352 - 16) < 147  # an fp32 copy over what travels for it, levels aside: 32 / (14 / 64)
