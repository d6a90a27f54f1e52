"""The GPT Transformer, for training and for KV-cache inference.

nanochat-style: rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP, no biases,
untied token embedding and lm_head, grouped-query attention (n_kv_head <= n_head), logits soft-capped
at 15 and computed in fp32. Matrices in the blocks train with Muon, embedding and lm_head with AdamW.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanochat.optim import AdamW, Muon

SOFTCAP = 15.0
LOSS_CHUNK_ROWS = 8192  # tokens whose logits are materialised at once by the training loss


def _softcapped_logits(x, weight):
    logits = F.linear(x, weight).float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def _chunk_loss_sum(x, weight, targets):
    return F.cross_entropy(_softcapped_logits(x, weight), targets, ignore_index=-1, reduction="none")


def softcapped_cross_entropy(x, weight, targets, chunk_rows=LOSS_CHUNK_ROWS):
    """Per-token cross-entropy (0 where the target is -1) of softcapped fp32 logits x @ weight.T, computed
    chunk_rows tokens at a time and recomputed in the backward pass, so the full (tokens, vocab) fp32 logits,
    the largest tensor of a training step (17 GB at d20, batch 32 x 2048, vocab 65,536), never exist at once."""
    if x.size(0) <= chunk_rows:
        return _chunk_loss_sum(x, weight, targets)
    return torch.cat([torch.utils.checkpoint.checkpoint(_chunk_loss_sum, x[i:i + chunk_rows], weight,
                                                        targets[i:i + chunk_rows], use_reentrant=False)
                      for i in range(0, x.size(0), chunk_rows)])
ROTARY_BASE = 10000.0
ROTARY_LEN_MULT = 10  # rotary tables cover 10x sequence_len so generation can run past the training length


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, n_kv_head=None):
    """Size a model from its depth alone, as nanochat does: width = depth * aspect_ratio, rounded up to whole heads."""
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


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
        self.pos = 0

    def reset(self):
        self.pos = 0

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

    def forward(self, x, cos, sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
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
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # non-persistent: rebuilt by init_weights, so build on meta + to_empty + init_weights is safe
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(self.config.sequence_len * ROTARY_LEN_MULT, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2) broadcasts over batch and heads
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self):
        """Embedding N(0, 1); lm_head small; projections into the residual stream zero so each block starts
        as the identity; other matrices N(0, std) with std = fan_in^-0.5 * min(1, sqrt(fan_out/fan_in))."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                nn.init.normal_(lin.weight, mean=0.0, std=fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5))
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for forward + backward: 6 per non-embedding weight (lookups are free) plus attention
        scores and values (12 * layers * heads * head_dim * seq_len, counting the full square as nanochat does)."""
        c = self.config
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * nparams + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         process_group=None):
        """[AdamW for lm_head and embedding, Muon for the block matrices], both over `process_group`."""
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(list(self.parameters())) == len(matrix_params) + len(embedding_params) + len(lm_head_params)
        assert all(p.ndim == 2 for p in matrix_params), "Muon takes matrices only"
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        adamw = AdamW([dict(params=lm_head_params, lr=unembedding_lr * scale),
                       dict(params=embedding_params, lr=embedding_lr * scale)],
                      betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, process_group=process_group)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, process_group=process_group)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) -> logits (B, T, V) fp32; with targets -> loss ("mean" over targets != -1, "none" -> (B, T))."""
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        if t0 + T > self.cos.size(1):
            raise ValueError(f"position {t0 + T} beyond the rotary tables ({self.cos.size(1)}); raise sequence_len")
        cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:
            return _softcapped_logits(x, self.lm_head.weight)
        losses = softcapped_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.view(-1))
        if loss_reduction == "none":
            return losses.view(B, T)
        return losses.sum() / (targets != -1).sum()  # mean over the targets, as F.cross_entropy's "mean"

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


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> ids (B, 1): greedy at temperature 0, else sampled (optionally from the top k)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(vals / temperature, dim=-1), 1, generator=rng)
        return idx.gather(-1, choice)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)
