"""Codecs for the outer exchange: how a worker's pseudo-gradient travels and is averaged across workers.

One table (CODECS) feeds argparse, the byte accounting and the bench. Every codec takes this worker's fp32
pseudo-gradient for some tensor pieces, packed flat, and returns the across-worker mean as decoded,
identical on every rank. Lossy codecs keep what they did not send (error feedback) and add it to the next
round, so over rounds what is transmitted sums to the truth.

  none   fp32 ring all-reduce: plain DiLoCo, bit-identical to a bare all_reduce_mean.
  bf16, int8, int4
         reduce-scatter + all-gather of quantised data. The flat vector is cut into K shards; an
            all_to_all sends shard j of every rank to rank j, which dequantises its K pieces, averages
            them in fp32, re-quantises and all-gathers the result. Error feedback on both stages: the
            sender keeps its rounding residual, the shard owner the residual of the re-quantised mean.
            int8/int4: symmetric, one fp32 absmax scale per QUANT_CHUNK elements of a shard; int4 packs two
            values per byte. So each rank sends 2(K-1)/K x the payload, as an fp32 ring all-reduce does,
            not the (K-1) x of an all-gather of everything (low-precision sums in a ring would overflow or
            compound rounding, hence dequantise-average-requantise at the owner).
  topk   per piece, the k = ceil(f n_i) entries of largest |pseudo-gradient + error|: int8 values with one
            fp32 scale per piece, piece-local indices in the fewest whole bytes that hold n_i - 1. Sparse
            payloads with different supports cannot be summed in a ring, so they are all-gathered and
            averaged in fp32 by every rank. Plain error feedback (undecayed): the outer optimizer, momentum
            included, still runs on the decoded mean.
  dct    after "Distributed Low-Communication Training with Decoupled Momentum Optimization" (arXiv
            2510.03371, read from its abstract) and DeMo: the outer momentum is decomposed by a DCT and
            only its fast-moving part is synchronised. Which momentum, where, and what the outer optimizer
            does: each worker keeps its own momentum m (in DCT coefficients), m = beta * m + DCT(delta) with
            beta = --outer-ef-decay; per chunk of --outer-dct-chunk elements of a piece (orthonormal DCT-II
            as a matmul, so it runs on GPU) the ceil(f c) coefficients of largest magnitude are sent (int8,
            one fp32 scale per piece, or fp32 with --outer-dct-bits 32; uint8 index within the chunk) and
            subtracted from m, which keeps the rest. That is SparseLoCo's decayed error feedback below, in
            the DCT basis: the worker's m is both the momentum and the error feedback, and there is no
            other momentum. "High-frequency" is read as DeMo's fast components: largest magnitude, not a
            fixed band. The result is the inverse DCT of the mean sent coefficients (= the mean of the
            inverse DCTs, by linearity), all-gathered, and the outer optimizer is plain SGD (lr --outer-lr,
            momentum 0, no Nesterov): theta -= lr * mean. With fraction 1, fp32 values and decay 0 nothing
            is left in m after a round: outer SGD without momentum on the mean pseudo-gradient. A piece
            whose size is not a multiple of the chunk is zero-padded: the part of a sent coefficient that
            falls on the padding is dropped on decode.
  sparseloco
         SparseLoCo (Sarfi et al., arXiv 2508.15706): the outer momentum is replaced by each worker's own
            error feedback e, decayed: e = beta * e + delta (beta = --outer-ef-decay, 0.95 as in the paper);
            each piece is cut into chunks of c = min(--outer-sparseloco-chunk, n_i) elements (4096 as the
            paper's 64 x 64 tiles; here runs of the flat piece, the last one zero-padded) and the
            k = ceil(f c) entries of largest |e| of every chunk are sent, f = --outer-sparseloco-density;
            e keeps everything else: e -= what was sent, as decoded. Values travel in 2 bits: the paper's
            reference code's statistical quantiser, per piece: code = clamp(round((v - mean) / s) + 2, 0, 3)
            with s = 6 sigma / 4 (sigma the values' standard deviation), each code decoded as the mean of
            the values that took it (4 fp32 levels per piece); --outer-sparseloco-bits 32 sends fp32.
            Indices within a chunk are bit-packed (12 bits at c = 4096). All-gathered; the mean is
            sum over workers / K (the paper's rule; its reference code averages each entry over only the
            workers that sent it), and the outer optimizer is plain SGD, no momentum, no Nesterov:
            theta -= lr * mean, lr = --outer-lr (1 in the paper). At density 1, fp32 values and decay 0
            this is DiLoCo with outer SGD without momentum, bit for bit.

Bytes this rank sends per exchange (what comm records), for P fp32 parameters in n pieces of n_i elements
at K workers; S = ceil(P / K) is the shard length (int4: rounded up to even), C = QUANT_CHUNK:

  none   2 (K-1) 4P // K
  bf16   2 (K-1) 2S
  int8   2 (K-1) (S + 4 ceil(S / C))
  int4   2 (K-1) (S/2 + 4 ceil(S / C))
  topk   (K-1) sum_i (4 + k_i (1 + w_i))       k_i = max(1, ceil(f n_i)), w_i = bytes to hold n_i - 1
  dct    (K-1) (4n + 2 kc sum_i ceil(n_i / c))  kc = max(1, ceil(f c)), c = --outer-dct-chunk
         (fp32 values: (K-1) 5 kc sum_i ceil(n_i / c))
  sparseloco
         (K-1) sum_i (16 + ceil(m_i / 4) + ceil(m_i b_i / 8))   c_i = min(c, n_i), k_i = max(1, ceil(f c_i)),
                                   m_i = k_i ceil(n_i / c_i) values, b_i = bits to hold c_i - 1 (at least 1)
         (fp32 values: (K-1) sum_i (4 m_i + ceil(m_i b_i / 8)))

K shards of B bytes make the quantised payload K B, so those send 2 (K-1)/K x payload. At K = 1 nothing
is sent, but quantisation and error feedback still apply.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat import comm
from nanochat.common import UsageError

QUANT_CHUNK = 256  # elements per fp32 scale for int8/int4: 1.6% overhead at int8, finer than per tensor


def _as_dtype(b, dtype):
    """Reinterpret rows of uint8 bytes as `dtype` (rows, m / itemsize), from a fresh aligned copy."""
    return b.reshape(-1).clone().view(dtype).view(b.shape[0], -1)


def _to_bytes(t):
    """Rows of any dtype as rows of uint8."""
    return t.reshape(t.shape[0], -1).contiguous().view(torch.uint8)


def _fraction_count(fraction, n):
    """ceil(fraction * n), at least 1; rounded first so that e.g. 0.07 * 100 counts 7, not 8."""
    return max(1, math.ceil(round(fraction * n, 6)))


def _int8_quantise(vals, scale_per_value):
    return torch.round(vals / torch.where(scale_per_value > 0, scale_per_value, 1.0)).clamp_(-127, 127).to(torch.int8)


def _pack_bits(v, bits):
    """Non-negative integers below 2**bits, `bits` each (least significant first), into ceil(len bits / 8) bytes."""
    b = ((v.long()[:, None] >> torch.arange(bits, device=v.device)) & 1).to(torch.uint8).reshape(-1)
    b = F.pad(b, (0, -b.numel() % 8)).view(-1, 8)
    return (b << torch.arange(8, device=v.device, dtype=torch.uint8)).sum(1).to(torch.uint8)


def _unpack_bits(p, count, bits):
    """Inverse of _pack_bits: `count` integers (int64) from the bytes p."""
    b = ((p[:, None] >> torch.arange(8, device=p.device, dtype=torch.uint8)) & 1).reshape(-1)[:count * bits]
    return (b.view(count, bits).long() << torch.arange(bits, device=p.device)).sum(1)


def _two_bit_quantise(vals):
    """2-bit codes and the 4 fp32 levels they decode to, for one piece's sent values (SparseLoCo's reference
    rule): 4 bins of width 6 sigma / 4 around the mean, the middle two astride it; each level is the mean of
    the values in its bin, so the decoded values keep the sum of each bin (empty bins: level 0, never used)."""
    mean = vals.mean()
    sigma = vals.std() if vals.numel() > 1 else vals.new_zeros(())
    step = 1.5 * sigma
    step = torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))
    codes = torch.round((vals - mean) / step).add_(2).clamp_(0, 3).long()
    sums = vals.new_zeros(4).index_add_(0, codes, vals)
    counts = vals.new_zeros(4).index_add_(0, codes, torch.ones_like(vals))
    return codes, torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)


class Codec:
    """What every codec shares. Each one also has
      exchange(flat, group) -> the across-worker fp32 mean of `flat` as decoded, identical on every rank of
          the group (None or one rank: K = 1). Blocking; touches only this codec's state and comm, so it
          may run on a background thread.
      wire_bytes(k) -> the exact bytes this rank sends per exchange with k workers (what comm records).
    """

    name = ""
    summary = ""
    transport = ""  # "all_reduce" | "reduce_scatter+all_gather" | "all_gather"
    owns_momentum = False  # True: the codec keeps the outer momentum, the outer SGD must have none
    buffers = ()  # names of the error-feedback tensors, saved by state_dict

    def __init__(self, sizes, device):
        self.sizes = [int(n) for n in sizes]  # numel of each tensor piece packed in the flat vector, in order
        self.numel = sum(self.sizes)
        self.device = torch.device(device)
        for b in self.buffers:
            setattr(self, b, None)  # created at the first exchange

    def _check(self, flat):
        if flat.dim() != 1 or flat.numel() != self.numel or flat.dtype != torch.float32:
            raise ValueError(f"{self.name} codec was built for a flat fp32 vector of {self.numel} elements, "
                             f"got {tuple(flat.shape)} {flat.dtype}")

    def state_dict(self):
        state = {"codec": self.name}
        for b in self.buffers:
            t = getattr(self, b)
            state[b] = None if t is None else t.to("cpu", copy=True)
        return state

    def load_state_dict(self, state):
        saved = state.get("codec", state.get("kind"))  # "kind": checkpoints of the former diloco/compress.py
        if saved != self.name:
            raise ValueError(f"checkpoint's outer codec is {saved!r}, this run's is {self.name!r}: "
                             f"resume with --outer-compression {saved}")
        for b in self.buffers:
            t = state.get(b)
            setattr(self, b, None if t is None else t.to(self.device, copy=True))


class NoneCodec(Codec):
    name = "none"
    summary = "fp32 all-reduce (plain DiLoCo)"
    transport = "all_reduce"

    def exchange(self, flat, group):
        return comm.all_reduce_mean(flat, group)

    def wire_bytes(self, k):
        return 2 * (k - 1) * 4 * self.numel // k


class QuantCodec(Codec):
    """bf16/int8/int4 through reduce-scatter (all_to_all) + all-gather, error feedback on both stages."""

    transport = "reduce_scatter+all_gather"
    bits = 0
    buffers = ("error", "shard_error")  # the sender's residual (P), the shard owner's residual (shard length)

    def shard_len(self, k):
        s = -(-self.numel // k)
        return s + s % 2 if self.bits == 4 else s  # int4: whole bytes per shard

    def shard_bytes(self, k):
        s = self.shard_len(k)
        if self.bits == 16:
            return 2 * s
        return s * self.bits // 8 + 4 * -(-s // QUANT_CHUNK)

    def wire_bytes(self, k):
        # all_to_all of K shards of B bytes: (K-1) B; all-gather of one shard: (K-1) B
        return 2 * (k - 1) * self.shard_bytes(k)

    def _encode(self, x):
        """(rows, s) fp32 -> (rows, shard bytes) uint8: the quantised values, then (int8/int4) the scales."""
        if self.bits == 16:
            return _to_bytes(x.to(torch.bfloat16))
        rows, s = x.shape
        qmax = 2 ** (self.bits - 1) - 1  # symmetric: 127 or 7
        nch = -(-s // QUANT_CHUNK)
        chunks = F.pad(x, (0, nch * QUANT_CHUNK - s)).view(rows, nch, QUANT_CHUNK)
        scale = chunks.abs().amax(-1, keepdim=True) / qmax
        q = torch.round(chunks / torch.where(scale > 0, scale, 1.0)).clamp_(-qmax, qmax).view(rows, -1)[:, :s]
        if self.bits == 8:
            qbytes = _to_bytes(q.to(torch.int8))
        else:
            u = (q + 8).to(torch.uint8)  # 1..15
            qbytes = u[:, 0::2] | (u[:, 1::2] << 4)
        return torch.cat([qbytes, _to_bytes(scale.reshape(rows, nch))], 1)

    def _decode(self, b, s):
        """Inverse of _encode: (rows, shard bytes) uint8 -> (rows, s) fp32."""
        if self.bits == 16:
            return _as_dtype(b, torch.bfloat16).float()
        rows = b.shape[0]
        nq = s * self.bits // 8
        scale = _as_dtype(b[:, nq:], torch.float32)  # (rows, chunks)
        if self.bits == 8:
            q = _as_dtype(b[:, :nq], torch.int8).float()
        else:
            qb = b[:, :nq]
            q = torch.stack([qb & 15, qb >> 4], -1).reshape(rows, s).float() - 8
        nch = scale.shape[1]
        x = F.pad(q, (0, nch * QUANT_CHUNK - s)).view(rows, nch, QUANT_CHUNK) * scale[..., None]
        return x.view(rows, -1)[:, :s]

    def exchange(self, flat, group):
        self._check(flat)
        k = comm.group_size(group)
        s = self.shard_len(k)
        if self.error is None:
            self.error = torch.zeros_like(flat)
        if self.shard_error is None:
            self.shard_error = flat.new_zeros(s)
        if self.shard_error.numel() != s:
            raise ValueError(f"{self.name} codec state holds a shard of {self.shard_error.numel()} elements, this "
                             f"group of {k} workers needs {s}: resume with the number of workers it was saved with")
        x = F.pad(flat + self.error, (0, k * s - self.numel)).view(k, s)
        sent = self._encode(x)  # row j: this rank's contribution to the shard rank j owns
        self.error = x.sub_(self._decode(sent, s)).view(-1)[:self.numel].clone()
        received = torch.empty_like(sent)  # row i: rank i's contribution to the shard this rank owns
        comm.all_to_all_single(received, sent, group)
        y = self._decode(received, s).mean(0) + self.shard_error
        mine = self._encode(y[None])
        self.shard_error = y - self._decode(mine, s)[0]
        gathered = mine.new_empty(k, mine.shape[1])
        comm.all_gather_into_tensor(gathered, mine, group)
        return self._decode(gathered, s).reshape(-1)[:self.numel]


class BF16Codec(QuantCodec):
    name = "bf16"
    summary = "bf16 reduce-scatter + all-gather, error feedback"
    bits = 16


class Int8Codec(QuantCodec):
    name = "int8"
    summary = f"int8 (one fp32 scale per {QUANT_CHUNK}) reduce-scatter + all-gather, error feedback"
    bits = 8


class Int4Codec(QuantCodec):
    name = "int4"
    summary = f"int4 (two per byte, one fp32 scale per {QUANT_CHUNK}) reduce-scatter + all-gather, error feedback"
    bits = 4


class TopKCodec(Codec):
    name = "topk"
    summary = "per tensor, the --outer-topk-fraction largest entries (int8 + indices), all-gathered, error feedback"
    transport = "all_gather"
    buffers = ("error",)

    def __init__(self, sizes, device, fraction):
        super().__init__(sizes, device)
        if not 0 < fraction <= 1:
            raise ValueError(f"--outer-topk-fraction must be in (0, 1], got {fraction}")
        self.ks = [_fraction_count(fraction, n) for n in self.sizes]
        widths = [max(1, -(-(n - 1).bit_length() // 8)) for n in self.sizes]  # bytes of a piece-local index
        self.payload_bytes = sum(4 + kk * (1 + w) for kk, w in zip(self.ks, widths))
        # payload: n fp32 scales | one int8 per sent value | each value's index, w_i bytes little-endian
        ks = torch.tensor(self.ks, dtype=torch.long)
        piece = torch.repeat_interleave(torch.arange(len(self.sizes)), ks)
        offsets = torch.tensor([0] + self.sizes, dtype=torch.long).cumsum(0)[:-1]
        value_width = torch.tensor(widths, dtype=torch.long)[piece]
        byte_value = torch.repeat_interleave(torch.arange(len(piece)), value_width)
        first_byte = value_width.cumsum(0) - value_width
        self.value_piece = piece.to(self.device)
        self.value_offset = offsets[piece].to(self.device)
        self.byte_value = byte_value.to(self.device)
        self.byte_shift = (8 * (torch.arange(len(byte_value)) - first_byte[byte_value])).to(self.device)

    def wire_bytes(self, k):
        return (k - 1) * self.payload_bytes

    def _decode(self, p):
        """(rows, payload) uint8 -> dequantised values and their flat indices, both (rows, sum k_i)."""
        n, total = len(self.sizes), len(self.value_piece)
        scale = _as_dtype(p[:, :4 * n], torch.float32)
        vals = _as_dtype(p[:, 4 * n:4 * n + total], torch.int8).float() * scale[:, self.value_piece]
        idx = torch.zeros(p.shape[0], total, dtype=torch.long, device=p.device)
        idx.index_add_(1, self.byte_value, p[:, 4 * n + total:].long() << self.byte_shift)
        return vals, idx + self.value_offset

    def exchange(self, flat, group):
        self._check(flat)
        x = flat + self.error if self.error is not None else flat.clone()
        local = torch.cat([piece.abs().topk(kk, sorted=False).indices for piece, kk in zip(x.split(self.sizes), self.ks)])
        vals = x[local + self.value_offset]
        absmax = x.new_zeros(len(self.sizes)).scatter_reduce_(0, self.value_piece, vals.abs(), "amax")
        scale = absmax / 127
        q = _int8_quantise(vals, scale[self.value_piece])
        index_bytes = ((local[self.byte_value] >> self.byte_shift) & 255).to(torch.uint8)
        payload = torch.cat([_to_bytes(scale[None])[0], _to_bytes(q[None])[0], index_bytes])
        sent, where = self._decode(payload[None])
        x[where[0]] -= sent[0]  # what was not sent (or lost to rounding) waits for the next round
        self.error = x
        k = comm.group_size(group)
        gathered = payload.new_empty(k, self.payload_bytes)
        comm.all_gather_into_tensor(gathered, payload, group)
        vals, where = self._decode(gathered)
        total = torch.zeros_like(flat)
        for r in range(k):  # rank by rank, unique indices per call: the same sum on every rank, GPU included
            total.index_add_(0, where[r], vals[r])
        return total.div_(k)


class DCTCodec(Codec):
    name = "dct"
    summary = ("DeMo-style: per-worker momentum decayed by --outer-ef-decay, chunked DCT, the --outer-dct-fraction "
               "largest coefficients per chunk sent (int8 + uint8 index), all-gathered, outer SGD without momentum")
    transport = "all_gather"
    owns_momentum = True
    buffers = ("momentum",)  # this worker's momentum minus what it sent, as (chunks, c) DCT coefficients

    def __init__(self, sizes, device, fraction, chunk, decay, bits=8):
        super().__init__(sizes, device)
        if not 0 < fraction <= 1:
            raise ValueError(f"--outer-dct-fraction must be in (0, 1], got {fraction}")
        if not 1 <= chunk <= 256:
            raise ValueError(f"--outer-dct-chunk must be in 1..256 (indices travel as one byte), got {chunk}")
        if not 0 <= decay < 1:
            raise ValueError(f"--outer-ef-decay must be in [0, 1), got {decay}")
        if bits not in (8, 32):
            raise ValueError(f"--outer-dct-bits must be 8 or 32, got {bits}")
        self.chunk, self.beta, self.bits = chunk, decay, bits
        self.kc = _fraction_count(fraction, chunk)
        sizes = torch.tensor(self.sizes, dtype=torch.long)
        per_piece = (sizes + chunk - 1) // chunk
        self.nchunks = int(per_piece.sum())
        # int8: n fp32 scales | one int8 per coefficient | uint8 indices; fp32: the coefficients | uint8 indices
        self.scale_bytes = 4 * len(self.sizes) if bits == 8 else 0
        self.value_bytes = (1 if bits == 8 else 4) * self.kc * self.nchunks
        self.payload_bytes = self.scale_bytes + self.value_bytes + self.kc * self.nchunks
        # every piece starts a fresh zero-padded chunk: (flat offset, chunked offset, numel) of each piece
        first_elem, first_chunk = sizes.cumsum(0) - sizes, per_piece.cumsum(0) - per_piece
        self.spans = [(int(a), int(b) * chunk, n) for a, b, n in zip(first_elem, first_chunk, self.sizes)]
        self.chunk_piece = torch.repeat_interleave(torch.arange(len(self.sizes)), per_piece).to(self.device)
        # orthonormal DCT-II: coefficients = x @ basis.T, x = coefficients @ basis
        j = torch.arange(chunk, dtype=torch.float64)
        basis = torch.cos(math.pi * (j[None, :] + 0.5) * j[:, None] / chunk) * math.sqrt(2 / chunk)
        basis[0] /= math.sqrt(2)
        self.basis = basis.float().to(self.device)

    def wire_bytes(self, k):
        return (k - 1) * self.payload_bytes

    def _decode(self, p):
        """(rows, payload) uint8 -> dequantised coefficients and their in-chunk indices, (rows, chunks, kc)."""
        a, b = self.scale_bytes, self.scale_bytes + self.value_bytes
        idx = p[:, b:].long().view(-1, self.nchunks, self.kc)
        if self.bits == 32:
            return _as_dtype(p[:, :b], torch.float32).view(-1, self.nchunks, self.kc), idx
        scale = _as_dtype(p[:, :a], torch.float32)
        q = _as_dtype(p[:, a:b], torch.int8).float().view(-1, self.nchunks, self.kc)
        return q * scale[:, self.chunk_piece, None], idx

    def exchange(self, flat, group):
        self._check(flat)
        padded = flat.new_zeros(self.nchunks * self.chunk)
        for a, b, n in self.spans:
            padded[b:b + n] = flat[a:a + n]
        m = padded.view(self.nchunks, self.chunk) @ self.basis.T
        if self.momentum is not None:
            m.add_(self.momentum, alpha=self.beta)
        sel = m.abs().topk(self.kc, dim=1, sorted=False).indices
        vals = m.gather(1, sel)
        if self.bits == 32:
            values = _to_bytes(vals.reshape(1, -1))[0]
        else:
            absmax = flat.new_zeros(len(self.sizes)).scatter_reduce_(0, self.chunk_piece, vals.abs().amax(1), "amax")
            scale = absmax / 127
            q = _int8_quantise(vals, scale[self.chunk_piece, None])
            values = torch.cat([_to_bytes(scale[None])[0], _to_bytes(q.view(1, -1))[0]])
        payload = torch.cat([values, sel.to(torch.uint8).view(-1)])
        sent, where = self._decode(payload[None])
        self.momentum = m.sub_(torch.zeros_like(m).scatter_(1, where[0], sent[0]))  # the slow part stays here
        k = comm.group_size(group)
        gathered = payload.new_empty(k, self.payload_bytes)
        comm.all_gather_into_tensor(gathered, payload, group)
        vals, where = self._decode(gathered)
        coeffs = torch.zeros_like(m)
        for r in range(k):  # rank by rank: the same sum on every rank
            coeffs += torch.zeros_like(m).scatter_(1, where[r], vals[r])
        mean = (coeffs.div_(k) @ self.basis).view(-1)
        return torch.cat([mean[b:b + n] for _, b, n in self.spans])


class SparseLoCoCodec(Codec):
    name = "sparseloco"
    summary = ("SparseLoCo: per-worker error feedback decayed by --outer-ef-decay (the outer momentum), top "
               "--outer-sparseloco-density of each --outer-sparseloco-chunk, 2-bit values, all-gathered, outer SGD "
               "without momentum")
    transport = "all_gather"
    owns_momentum = True
    buffers = ("error",)  # e: this worker's decayed accumulation of its pseudo-gradients, minus what it sent

    def __init__(self, sizes, device, density, chunk, decay, bits=2):
        super().__init__(sizes, device)
        if not 0 < density <= 1:
            raise ValueError(f"--outer-sparseloco-density must be in (0, 1], got {density}")
        if chunk < 1:
            raise ValueError(f"--outer-sparseloco-chunk must be >= 1, got {chunk}")
        if not 0 <= decay < 1:
            raise ValueError(f"--outer-ef-decay must be in [0, 1), got {decay}")
        if bits not in (2, 32):
            raise ValueError(f"--outer-sparseloco-bits must be 2 or 32, got {bits}")
        self.decay, self.bits = decay, bits
        # per piece: (flat offset, numel, chunk length, chunks, values sent per chunk, index bits, payload bytes)
        self.layout, offset = [], 0
        for n in self.sizes:
            c = min(chunk, n)
            nch, k, w = -(-n // c), _fraction_count(density, c), max(1, (c - 1).bit_length())
            m = k * nch
            nbytes = (16 + -(-m // 4) if bits == 2 else 4 * m) + -(-m * w // 8)
            self.layout.append((offset, n, c, nch, k, w, nbytes))
            offset += n
        self.payload_bytes = sum(piece[-1] for piece in self.layout)

    def wire_bytes(self, k):
        return (k - 1) * self.payload_bytes

    def _encode_piece(self, e, offset, n, c, nch, k, w):
        """The payload of one piece of e, and the values it decodes to at their piece-local indices."""
        chunks = F.pad(e[offset:offset + n], (0, nch * c - n)).view(nch, c)
        sel = chunks.abs().topk(k, dim=1, sorted=False).indices
        vals = chunks.gather(1, sel).reshape(-1)
        if self.bits == 2:
            codes, levels = _two_bit_quantise(vals)
            values, sent = torch.cat([_to_bytes(levels[None])[0], _pack_bits(codes, 2)]), levels[codes]
        else:
            values, sent = _to_bytes(vals[None])[0], vals
        where = (sel + torch.arange(nch, device=sel.device)[:, None] * c).reshape(-1)
        return torch.cat([values, _pack_bits(sel.reshape(-1), w)]), sent, where

    def _decode_piece(self, p, n, c, nch, k, w):
        """One piece's payload -> the decoded values and their piece-local indices, padding dropped."""
        m = k * nch
        if self.bits == 2:
            levels = _as_dtype(p[None, :16], torch.float32)[0]
            vals, rest = levels[_unpack_bits(p[16:16 + -(-m // 4)], m, 2)], p[16 + -(-m // 4):]
        else:
            vals, rest = _as_dtype(p[None, :4 * m], torch.float32)[0], p[4 * m:]
        where = (_unpack_bits(rest, m, w).view(nch, k) + torch.arange(nch, device=p.device)[:, None] * c).reshape(-1)
        real = where < n
        return vals[real], where[real]

    def exchange(self, flat, group):
        self._check(flat)
        e = self.error.mul_(self.decay).add_(flat) if self.error is not None else flat.clone()
        parts = []
        for offset, n, c, nch, k, w, _ in self.layout:
            part, sent, where = self._encode_piece(e, offset, n, c, nch, k, w)
            real = where < n  # a value picked on the padding of a last chunk is sent but never applied
            e[offset + where[real]] -= sent[real]
            parts.append(part)
        self.error = e
        payload = torch.cat(parts)
        k = comm.group_size(group)
        gathered = payload.new_empty(k, self.payload_bytes)
        comm.all_gather_into_tensor(gathered, payload, group)
        total = torch.zeros_like(flat)
        for r in range(k):  # rank by rank, pieces in order, unique indices per call: the same sum on every rank
            start = 0
            for offset, n, c, nch, kk, w, nbytes in self.layout:
                vals, where = self._decode_piece(gathered[r, start:start + nbytes], n, c, nch, kk, w)
                total[offset:offset + n].index_add_(0, where, vals)
                start += nbytes
        return total.div_(k)


CODECS = {c.name: c for c in (NoneCodec, BF16Codec, Int8Codec, Int4Codec, TopKCodec, DCTCodec, SparseLoCoCodec)}


@dataclass
class CodecConfig:
    """Which codec carries the outer exchange, and its parameters (scripts/flags.py builds it from the --outer-* flags).

    Args:
        name: one of CODECS.
        topk_fraction: topk: fraction of each tensor's entries sent per outer sync.
        dct_fraction: dct: fraction of the DCT coefficients of each chunk sent per outer sync.
        dct_chunk: dct: elements per DCT chunk (at most 256).
        dct_bits: dct: bits per sent coefficient (8: int8 with one fp32 scale per tensor; 32: fp32).
        sparseloco_density: sparseloco: fraction of each chunk's entries sent per outer sync.
        sparseloco_chunk: sparseloco: elements per top-k chunk.
        sparseloco_bits: sparseloco: bits per sent value (2 or 32).
        ef_decay: sparseloco, dct: decay of each worker's error feedback / momentum.
    """
    name: str = "none"
    topk_fraction: float = 0.02
    dct_fraction: float = 1 / 32
    dct_chunk: int = 64
    dct_bits: int = 8
    sparseloco_density: float = 1 / 64
    sparseloco_chunk: int = 4096
    sparseloco_bits: int = 2
    ef_decay: float = 0.95


def add_codec_args(group):
    """The codec flags, on an argparse parser or argument group (returned)."""
    d = CodecConfig()
    table = "; ".join(f"{name}: {c.summary}" for name, c in CODECS.items())
    group.add_argument("--outer-compression", choices=list(CODECS), default=d.name,
                       help=f"codec of the outer exchange across workers. {table}")
    group.add_argument("--outer-topk-fraction", type=float, default=d.topk_fraction,
                       help="topk: fraction of each tensor's entries sent per outer sync")
    group.add_argument("--outer-dct-fraction", type=float, default=d.dct_fraction,
                       help="dct: fraction of the DCT coefficients of each chunk sent per outer sync")
    group.add_argument("--outer-dct-chunk", type=int, default=d.dct_chunk,
                       help="dct: elements per DCT chunk (at most 256)")
    group.add_argument("--outer-dct-bits", type=int, choices=[8, 32], default=d.dct_bits,
                       help="dct: bits per sent coefficient (8: int8 with one fp32 scale per tensor; 32: fp32)")
    group.add_argument("--outer-sparseloco-density", type=float, default=d.sparseloco_density,
                       help="sparseloco: fraction of each chunk's entries sent per outer sync (1/64: 64 of 4096)")
    group.add_argument("--outer-sparseloco-chunk", type=int, default=d.sparseloco_chunk,
                       help="sparseloco: elements per top-k chunk (a tensor smaller than this is one chunk)")
    group.add_argument("--outer-sparseloco-bits", type=int, choices=[2, 32], default=d.sparseloco_bits,
                       help="sparseloco: bits per sent value (2: four levels per tensor; 32: fp32)")
    group.add_argument("--outer-ef-decay", type=float, default=d.ef_decay,
                       help="sparseloco, dct: decay of each worker's error feedback / momentum, e = decay * e + delta "
                            "(these codecs replace the outer momentum: the outer SGD runs without it)")
    return group


def make_codec(config, sizes, device):
    """The codec a CodecConfig names, for flat vectors of pieces of `sizes` elements."""
    name = config.name
    if name not in CODECS:
        raise UsageError(f"unknown --outer-compression {name!r}, expected one of {', '.join(CODECS)}")
    if name == "topk":
        return TopKCodec(sizes, device, config.topk_fraction)
    if name == "dct":
        return DCTCodec(sizes, device, config.dct_fraction, config.dct_chunk, config.ef_decay, config.dct_bits)
    if name == "sparseloco":
        return SparseLoCoCodec(sizes, device, config.sparseloco_density, config.sparseloco_chunk, config.ef_decay,
                               config.sparseloco_bits)
    return CODECS[name](sizes, device)
