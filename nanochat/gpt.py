"""The GPT Transformer, for training and for KV-cache inference.

nanochat-style: rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP, no biases,
untied token embedding and lm_head, grouped-query attention (n_kv_head <= n_head), logits soft-capped
at 15 and computed in fp32. Matrices in the blocks train with Muon, embeddings, lm_head and scalars with
AdamW. The later additions (value embeddings, per-layer scalars, the previous-token gate, ...) are config
switches, each measured on its own by bench/bench_model.py; a checkpoint saved before a switch existed
loads with it off (GPTConfig.from_saved).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanochat.optim import AdamW, Muon

SOFTCAP = 15.0
# fp32 logits materialised at once by the training loss: 512 tokens at vocab 65,536. A chunk's recompute and
# backward hold about four logits-shaped tensors, so a step's transient stays under 1 GiB at any batch
# (bench/bench_loss.py); a small vocab (the CPU presets) keeps a whole micro-batch in one chunk
LOSS_CHUNK_BYTES = 128 * 2 ** 20


def _softcapped_logits(x, weight):
    logits = F.linear(x, weight).float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def _chunk_loss_sum(x, weight, targets):
    return F.cross_entropy(_softcapped_logits(x, weight), targets, ignore_index=-1, reduction="none")


def softcapped_cross_entropy(x, weight, targets, chunk_rows=None):
    """Per-token cross-entropy (0 where the target is -1) of softcapped fp32 logits x @ weight.T, computed
    chunk_rows tokens at a time (default: LOSS_CHUNK_BYTES of logits) and recomputed in the backward pass, so
    the full (tokens, vocab) fp32 logits, the largest tensor of a training step (17 GB at d20, batch 32 x 2048,
    vocab 65,536), never exist at once."""
    chunk_rows = chunk_rows or max(1, LOSS_CHUNK_BYTES // (4 * weight.size(0)))
    if x.size(0) <= chunk_rows:
        return _chunk_loss_sum(x, weight, targets)
    return torch.cat([torch.utils.checkpoint.checkpoint(_chunk_loss_sum, x[i:i + chunk_rows], weight,
                                                        targets[i:i + chunk_rows], use_reentrant=False)
                      for i in range(0, x.size(0), chunk_rows)])
ROTARY_LEN_MULT = 10  # rotary tables cover 10x sequence_len so generation can run past the training length


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    value_embeds: bool = False  # ResFormer value embeddings added to v on alternate layers (the last included), gated per head
    lambdas: bool = False  # learnable per-layer scale of the residual stream and blend-in of the input embedding x0
    smear: bool = False  # a gated share of the previous token's embedding added to each position (cheap bigram)
    backout: bool = False  # subtract a learned share of the mid-depth residual stream before the final norm
    qk_scale: float = 1.2  # queries and keys multiplied by this after QK-norm (> 1: sharper attention)
    rotary_base: float = 10000.0
    init: str = "uniform"  # "normal": N(0, fan-in scaled); "uniform": same std from U(-s, s), c_fc x0.4, wte std 0.8

    @classmethod
    def from_saved(cls, saved):
        """The config of a checkpoint: fields it predates take the values of the model it was saved from."""
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"checkpoint model config has fields {sorted(unknown)} this code does not know: it was "
                             "saved by a newer nanochat-diloco; update the code to load it")
        return cls(**{**LEGACY_FIELDS, **saved})


# What a config saved before these fields existed meant (the first release's model).
LEGACY_FIELDS = dict(value_embeds=False, lambdas=False, smear=False, backout=False, qk_scale=1.0,
                     rotary_base=10000.0, init="normal")
SMEAR_CHANNELS, VE_GATE_CHANNELS = 24, 12  # leading channels of the input that drive the two gates


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, n_kv_head=None):
    """Size a model from its depth alone, as nanochat does: width = depth * aspect_ratio, rounded up to whole heads."""
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=n_embd)


def norm(x, scale=1.0):
    """RMS norm over the last dimension (no weight), times scale. Under autocast (CUDA training) _RMSNorm, which
    keeps less for backward; without (CPU, fp32) plain F.rms_norm, so CPU results are what they were."""
    if torch.is_autocast_enabled(x.device.type):
        return _RMSNorm.apply(x, scale, torch.get_autocast_dtype(x.device.type))
    x = F.rms_norm(x, (x.size(-1),))
    return x * scale if scale != 1.0 else x


class _RMSNorm(torch.autograd.Function):
    """rms_norm(x) * scale computed in fp32 and returned in `dtype` (bf16). Backward needs only that output and
    the per-row 1/rms (x * rstd = out / scale), and the output is kept anyway by what reads it next (q/k/v, c_fc,
    attention), so the input, the residual stream, is not kept at all. Under autocast F.rms_norm kept an fp32
    copy of its input (CUDA autocast runs rms_norm in fp32), its fp32 output was cast to bf16 once per reader
    (three copies for q, k, v), and the q/k scale kept one more."""

    @staticmethod
    def forward(ctx, x, scale, dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        out = (xf * (rstd * scale)).to(dtype)
        ctx.save_for_backward(out, rstd)
        ctx.scale, ctx.x_dtype = scale, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        out, rstd = ctx.saved_tensors
        y = out.float() / ctx.scale  # x * rstd
        g = grad.float() * ctx.scale
        return (rstd * (g - y * (g * y).mean(-1, keepdim=True))).to(ctx.x_dtype), None, None


class _ReluSquaredLinear(torch.autograd.Function):
    """relu(h)^2 @ weight.T keeping only h for backward, where relu(h)^2 is recomputed (one elementwise op, no
    matmul). Autocast kept relu's output, an fp32 copy of it (CUDA runs pow in fp32) and the bf16 square for the
    linear: 4x h's bytes, the largest activation of the model. Called with h in bf16 (under autocast)."""

    @staticmethod
    def forward(ctx, h, weight):
        r = F.relu(h)
        ctx.save_for_backward(h, weight)
        return F.linear(r * r, weight.to(h.dtype))

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad = grad.to(h.dtype)
        r = F.relu(h)
        a = r * r
        grad_weight = grad.reshape(-1, grad.size(-1)).t() @ a.reshape(-1, a.size(-1))
        grad_h = (grad @ weight.to(h.dtype)) * (2 * r)
        return grad_h, grad_weight.to(weight.dtype)


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by position-dependent angles. x: (B, T, H, D)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of past positions, per layer (B, H_kv, T_max, D); the forward pass fills it in place.

    Tensors are allocated on first use with the given device/dtype (default: those of the first keys
    inserted), so a cache needs no knowledge of autocast. `pos` advances once per forward pass.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        self.batch_size, self.num_heads, self.seq_len = batch_size, num_heads, seq_len
        self.head_dim, self.num_layers = head_dim, num_layers
        self.device, self.dtype = device, dtype
        self.k = self.v = None
        self.prev_embedding = None  # (B, 1, C): the last position's input embedding, for the smear gate
        self.pos = 0

    qkv_weights = None  # per layer [W_q; W_k; W_v] for one fused projection (nanochat.decode's cache has them)

    def reset(self):
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def _allocate(self, like):
        shape = (self.batch_size, self.num_heads, self.seq_len, self.head_dim)
        kw = dict(device=self.device or like.device, dtype=self.dtype or like.dtype)
        self.k = [torch.zeros(shape, **kw) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, **kw) for _ in range(self.num_layers)]

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (B, H_kv, T, D) at the current position; return all keys/values so far."""
        if self.k is None:
            self._allocate(k)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.seq_len:
            raise ValueError(f"KVCache full: {t1} positions needed, cache holds {self.seq_len} (make a bigger KVCache)")
        self.k[layer_idx][:, :, t0:t1] = k
        self.v[layer_idx][:, :, t0:t1] = v
        return self.k[layer_idx][:, :, :t1], self.v[layer_idx][:, :, :t1]

    def attend(self, layer_idx, q, k, v, gqa):
        """Attention of the new queries q (B, H, T, D) over the cache after writing the new k, v into it.
        (nanochat.decode.StaticKVCache attends differently: fixed shapes, for CUDA graphs.)"""
        k, v = self.insert_kv(layer_idx, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in another dtype than this pass computes in
        T, Tk = q.size(2), k.size(2)
        if Tk == T:  # prefill from position 0: plain causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1:  # one new token sees everything cached
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # a chunk after a prefix: the prefix is fully visible, causal within the chunk
        # (is_causal would align the triangle top-left, i.e. hide the prefix)
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def advance(self, num_tokens):
        self.pos += num_tokens

    def rotary(self, cos, sin, T):
        """The rotary tables' rows for the T positions this forward pass adds."""
        t0 = self.pos
        if t0 + T > cos.size(1):
            raise ValueError(f"position {t0 + T} beyond the rotary tables ({cos.size(1)}); raise sequence_len")
        return cos[:, t0:t0 + T], sin[:, t0:t0 + T]

    def swap_prev_embedding(self, x_last):
        """Keep the last position's input embedding for the next pass's smear gate; return the one kept before."""
        last, self.prev_embedding = self.prev_embedding, x_last
        return last

    def prefill(self, other):
        """Start this fresh cache from another one's contents, broadcasting batch 1 -> B (a shared prompt prefill)."""
        assert self.pos == 0, "prefill into a fresh (or reset) cache"
        assert (other.num_layers, other.num_heads, other.head_dim) == (self.num_layers, self.num_heads, self.head_dim)
        assert other.batch_size in (1, self.batch_size), f"cannot broadcast batch {other.batch_size} to {self.batch_size}"
        assert other.pos <= self.seq_len, f"other cache has {other.pos} positions, this one holds {self.seq_len}"
        if other.k is None:
            return
        if self.k is None:
            self._allocate(other.k[0])
        n = other.pos
        for layer in range(self.num_layers):
            self.k[layer][:, :, :n] = other.k[layer][:, :, :n]
            self.v[layer][:, :, :n] = other.v[layer][:, :, :n]
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()
        self.pos = n


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_scale = config.qk_scale
        self.ve_gate = None
        if has_value_embeds(config, layer_idx):
            self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, kv_cache, ve=None):
        B, T, C = x.size()
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        fused = None if kv_cache is None else kv_cache.qkv_weights
        if fused is None:  # training and GPT.forward's KV cache
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, H_kv, D)
            v = self.c_v(x).view(B, T, H_kv, D)
        else:  # nanochat.decode: the three projections as one matmul over the weights it concatenated
            qk, v = F.linear(x, fused[self.layer_idx]).view(B, T, H + 2 * H_kv, D).split([H + H_kv, H_kv], dim=2)
        if ve is not None:  # per-head gate in (0, 3), driven by the input's leading channels
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.to(v.dtype).view(B, T, H_kv, D)  # bf16 under autocast: v's dtype
        if fused is None:
            q, k = norm(apply_rotary_emb(q, cos, sin), self.qk_scale), norm(apply_rotary_emb(k, cos, sin), self.qk_scale)
        else:  # rotary, QK-norm and the scale act per head: on q and k together, the same values in fewer kernels
            q, k = norm(apply_rotary_emb(qk, cos, sin), self.qk_scale).split([H, H_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        if torch.is_autocast_enabled(h.device.type):
            return _ReluSquaredLinear.apply(h, self.c_proj.weight)
        return self.c_proj(F.relu(h).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, ve=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, ve)
        return x + self.mlp(norm(x))


def has_value_embeds(config, layer_idx):
    """Value embeddings on every other layer, counted back from the last (which always has one)."""
    return config.value_embeds and (config.n_layer - 1 - layer_idx) % 2 == 0


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.init not in ("normal", "uniform"):
            raise ValueError(f"GPTConfig.init must be 'normal' or 'uniform', not {config.init!r}")
        C, L = config.n_embd, config.n_layer
        if config.lambdas:  # registered first: the model's own parameters come before its submodules'
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if config.smear:
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(L) if has_value_embeds(config, i)})
        self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, C), 1, bias=False) if config.smear else None
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        # non-persistent: rebuilt by init_weights, so build on meta + to_empty + init_weights is safe (on meta only
        # their shape is made: computing them there would run Python reference ops, see gpt_on_meta)
        if torch.get_default_device().type == "meta":
            cos = sin = torch.empty(1, config.sequence_len * ROTARY_LEN_MULT, 1, C // config.n_head // 2)
        else:
            cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = self.config.rotary_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(self.config.sequence_len * ROTARY_LEN_MULT, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2) broadcasts over batch and heads
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self):
        """Projections into the residual stream zero, so each block starts as the identity; lm_head small.
        "normal": embedding N(0, 1), other matrices N(0, std), std = fan_in^-0.5 * min(1, sqrt(fan_out/fan_in)).
        "uniform" (nanochat's later init): the same std 1/sqrt(width) from a uniform (no outliers), c_fc at 0.4x
        of it, embedding N(0, 0.8). Value embeddings start like c_v, gates slightly open, scalars as below."""
        c = self.config
        bound = (3 / c.n_embd) ** 0.5  # U(-bound, bound) has std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if c.init == "uniform" else 1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                if c.init == "uniform":
                    b = bound * (0.4 if lin is block.mlp.c_fc else 1.0)
                    nn.init.uniform_(lin.weight, -b, b)
                else:
                    fan_out, fan_in = lin.weight.shape
                    nn.init.normal_(lin.weight, mean=0.0, std=fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5))
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        if c.lambdas:  # early layers: a stronger residual and more of the input embedding blended back in
            depth = torch.arange(c.n_layer, dtype=torch.float32, device=self.resid_lambdas.device) / max(c.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        if c.smear:
            nn.init.zeros_(self.smear_lambda)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        cos, sin = self._rotary_tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for forward + backward: 6 per non-embedding weight (lookups are free) plus attention
        scores and values (12 * layers * heads * head_dim * seq_len, counting the full square as nanochat does).
        The per-layer scalars count as weights here: a few dozen, below rounding."""
        c = self.config
        lookups = self.transformer.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        nparams = self.num_params() - lookups
        return 6 * nparams + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         scalar_lr=0.5, adamw_betas="flat", muon_ortho="ns5", muon_beta2=0.9,
                         muon_weight_decay=0.0, process_group=None):
        """[AdamW for lm_head, embeddings and scalars; Muon for the block matrices], both over `process_group`.
        weight_decay: AdamW's on lm_head and the embeddings (with adamw_betas="flat": one beta pair for all
        groups; "nanochat": per-group betas and decays as nanochat tunes them). muon_*: see optim.Muon."""
        if adamw_betas not in ("flat", "nanochat"):
            raise ValueError(f"adamw_betas must be 'flat' or 'nanochat', not {adamw_betas!r}")
        matrix_params = list(self.transformer.h.parameters())
        assert all(p.ndim == 2 for p in matrix_params), "Muon takes matrices only"
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        tuned = adamw_betas == "nanochat"
        flat = dict(betas=(0.8, 0.95), weight_decay=weight_decay)
        groups = [dict(params=list(self.lm_head.parameters()), lr=unembedding_lr * scale,
                       **(dict(betas=(0.8, 0.96), weight_decay=0.01) if tuned else flat)),
                  dict(params=list(self.transformer.wte.parameters()), lr=embedding_lr * scale,
                       **(dict(betas=(0.8, 0.995), weight_decay=0.001) if tuned else flat))]
        if self.value_embeds:
            groups.append(dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale * 0.5,
                               **(dict(betas=(0.8, 0.995), weight_decay=0.01) if tuned else flat)))
        if self.config.lambdas:  # the residual scales move slowly; x0's blend with a longer memory
            groups.append(dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01,
                               **(dict(betas=(0.8, 0.95), weight_decay=0.05) if tuned else flat)))
            groups.append(dict(params=[self.x0_lambdas], lr=scalar_lr,
                               **(dict(betas=(0.96, 0.95), weight_decay=0.0) if tuned else flat)))
        gates = [p for p in (self.smear_gate.weight if self.smear_gate is not None else None,
                             getattr(self, "smear_lambda", None), getattr(self, "backout_lambda", None)) if p is not None]
        if gates:
            groups.append(dict(params=gates, lr=0.2, betas=(0.8, 0.95), weight_decay=0.0))
        grouped = sum(len(g["params"]) for g in groups) + len(matrix_params)
        assert grouped == len(list(self.parameters())), "a parameter is in no optimizer group"
        adamw = AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, process_group=process_group)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, ortho=muon_ortho, beta2=muon_beta2,
                    weight_decay=muon_weight_decay, process_group=process_group)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
                group["initial_weight_decay"] = group["weight_decay"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) -> logits (B, T, V) fp32; with targets -> loss ("mean" over targets != -1, "none" -> (B, T))."""
        B, T = idx.size()
        if kv_cache is None:
            if T > self.cos.size(1):
                raise ValueError(f"position {T} beyond the rotary tables ({self.cos.size(1)}); raise sequence_len")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:  # the cache knows where its positions are (nanochat.decode's keeps them on the device)
            cos, sin = kv_cache.rotary(self.cos, self.sin, T)
        c = self.config
        x = norm(self.transformer.wte(idx))
        if c.smear:
            x = self._smear(x, kv_cache)
        if torch.is_autocast_enabled(x.device.type):  # the residual stream in bf16 (CUDA), as nanochat: half the
            x = x.to(torch.get_autocast_dtype(x.device.type))  # activation memory; CPU (no autocast) stays fp32
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once, not once per layer, q and k
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, ve)
            if i == c.n_layer // 2:
                x_mid = x
        if c.backout:
            x = x - self.backout_lambda * x_mid
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:
            return _softcapped_logits(x, self.lm_head.weight)
        losses = softcapped_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.view(-1))
        if loss_reduction == "none":
            return losses.view(B, T)
        return losses.sum() / (targets != -1).sum()  # mean over the targets, as F.cross_entropy's "mean"

    def _smear(self, x, kv_cache):
        """x[t] += smear_lambda * sigmoid(gate(x[t])) * x[t-1] over the input embeddings; with a KV cache the
        previous position may be the last one of an earlier forward pass (decoding one token at a time)."""
        prev = x[:, :-1]
        if kv_cache is not None:
            last = kv_cache.swap_prev_embedding(x[:, -1:])
            if last is not None:
                prev = torch.cat([last.to(x.dtype), prev], dim=1)
        if prev.size(1) == 0:
            return x
        head = x[:, x.size(1) - prev.size(1):]  # the positions that have a predecessor
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(head[..., :self.smear_gate.in_features]))
        return torch.cat([x[:, :x.size(1) - prev.size(1)], head + gate * prev], dim=1)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Yield up to max_tokens ids continuing `tokens` (batch 1, KV cache). temperature 0 is greedy."""
        assert isinstance(tokens, list) and tokens, "tokens: a non-empty list of ids"
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        c = self.config
        kv_cache = KVCache(1, c.n_kv_head, len(tokens) + max_tokens, c.n_embd // c.n_head, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=kv_cache)[:, -1, :]
            ids = sample_next_token(logits, rng, temperature, top_k)
            yield ids.item()


class _SkipModuleInit(torch.overrides.TorchFunctionMode):
    """Makes the torch.nn.init functions no-ops (the tensor is returned untouched)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def gpt_on_meta(config):
    """GPT(config) on the meta device: shapes only, for to_empty() + init_weights(), or for counting. The nn
    modules' own initialisation is skipped (init_weights sets every weight): on meta, nn.Embedding's normal_
    runs a Python reference op whose first call imports torch._dynamo, 2.4 s (CPU) at the start of every process
    that loads a model to evaluate or serve it (training processes pay it anyway, in torch.optim)."""
    with torch.device("meta"), _SkipModuleInit():
        return GPT(config)


MIN_TEMPERATURE = 1e-5  # below it sampling is greedy: fp32 logits / T overflow near T = 1e-38, softmax gives NaN


def check_sampling(temperature, top_k=None):
    """(temperature, top_k) as sample_next_token takes them, or a ValueError naming the bad one. Every sampling
    path (Engine, GPT.generate, chat_cli, chat_eval, chat_web) goes through here."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 1 (0 or None: no limit), got {top_k!r}")
    return float(temperature), (top_k or None)


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> ids (B, 1): greedy at temperature 0 (or below MIN_TEMPERATURE), else sampled (optionally
    from the top k)."""
    temperature, top_k = check_sampling(temperature, top_k)
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(vals.float() / temperature, dim=-1), 1, generator=rng)
        return idx.gather(-1, choice)
    return torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1, generator=rng)
