"""Fast decoding on the GPU: one token per row per step with fixed shapes, captured as CUDA graphs.

A d20 decode step is a few hundred small kernels; at batch 1, launching them one by one from Python takes
longer than running them, so the plain KV-cache path is launch-bound. Here nothing in a step depends on the
position as a Python number: the keys and values live in a preallocated StaticKVCache, written at a position
held in a device tensor, and a step attends over the first `bucket` slots (the filled ones rounded up to a
multiple of Decoder's bucket size) with a mask hiding those not written yet. So a step is recorded once per
bucket (torch.cuda.CUDAGraph) and replayed for every later token in it. On CUDA the step is also compiled
(torch.compile, fusing the elementwise ops; the graph is captured around the compiled code, as gpt-fast does),
and q, k and v come from one matmul over weights concatenated at every prefill.

The prompt is prefilled by GPT.forward into an ordinary KVCache and copied in (batch 1 -> B), as Engine
did already. On CPU the same fixed-shape step runs eagerly, over the same buckets; tests/test_decode.py checks it
against the KV-cache path of GPT.forward. On CUDA, serve a model with bf16 weights (for_inference): half the
bytes read per token and no weight casts in the step.
"""

import contextlib
import warnings

import torch
import torch.nn.functional as F



def for_inference(model):
    """Eval mode; on CUDA also bf16 weights. Returns the model (converted in place)."""
    model.eval()
    if model.get_device().type == "cuda":
        model.to(torch.bfloat16)
    return model


class StaticKVCache:
    """Keys and values (B, H_kv, max_len, D) per layer, allocated up front; `pos` is a (1,) device tensor, so
    writing and attending never need its value on the host."""

    def __init__(self, batch_size, num_heads, max_len, head_dim, num_layers, device, dtype):
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.bucket = max_len  # slots a step attends over (a host int: one graph per value)
        self.visible = None  # (1, 1, 1, bucket): 0 on the slots written so far (this step's included), -inf after
        self.qkv_weights = None  # per layer [W_q; W_k; W_v] in `dtype` (Decoder fills them), one matmul for the three
        self.dtype = dtype
        self.prev_embedding = None  # (B, 1, C): the last position's input embedding (models with the smear gate)
        self.max_len, self.length = max_len, 0  # length: pos as the host knows it

    def prefill(self, cache):
        """Start from an ordinary KVCache holding a prompt (batch 1 broadcasts to B)."""
        n = cache.get_pos()
        if n >= self.max_len:
            raise ValueError(f"a prompt of {n} tokens leaves no room in a static cache of {self.max_len}")
        for mine, theirs in zip(self.k + self.v, cache.k + cache.v):
            mine[:, :, :n] = theirs[:, :, :n]
        if cache.prev_embedding is not None:  # a buffer updated in place: a graph replays reads and writes of it,
            if self.prev_embedding is None:   # so it is allocated once and later prefills copy into it
                last = cache.prev_embedding
                self.prev_embedding = torch.empty(self.k[0].size(0), 1, last.size(-1), dtype=last.dtype, device=last.device)
            self.prev_embedding.copy_(cache.prev_embedding)
        self.pos.fill_(n)
        self.length = n

    def snapshot(self):
        """What a decode step writes: pos, the k/v slot at pos, the previous embedding (see restore)."""
        kv = [t.index_select(2, self.pos) for t in self.k + self.v]
        prev = None if self.prev_embedding is None else self.prev_embedding.clone()
        return self.pos.clone(), kv, prev

    def restore(self, snapshot):
        """Put back a snapshot in place (the tensors a captured graph reads stay the same objects)."""
        pos, kv, prev = snapshot
        self.pos.copy_(pos)
        for mine, saved in zip(self.k + self.v, kv):
            mine.index_copy_(2, self.pos, saved)
        if prev is not None:
            self.prev_embedding.copy_(prev)

    def rotary(self, cos, sin, T):  # T = 1: one token per row (GPT.forward casts them once under autocast)
        return cos.index_select(1, self.pos), sin.index_select(1, self.pos)

    def swap_prev_embedding(self, x_last):
        last = self.prev_embedding.clone()
        self.prev_embedding.copy_(x_last)
        return last

    def advance(self, num_tokens):
        self.pos.add_(num_tokens)

    def attend(self, layer_idx, q, k, v, gqa):
        """The new token's k, v (B, H_kv, 1, D) into slot pos, then q over the visible ones of the first `bucket`
        slots (the slots past it are not read: their bandwidth is the point)."""
        keys, values = self.k[layer_idx], self.v[layer_idx]
        keys.index_copy_(2, self.pos, k.to(keys.dtype))
        values.index_copy_(2, self.pos, v.to(values.dtype))
        keys, values = keys[:, :, :self.bucket], values[:, :, :self.bucket]
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=self.visible,
                                              enable_gqa=gqa)


def decode_step(model, ids, cache):
    """GPT.forward for one token per row (ids (B, 1)) at cache.pos -> next-token logits (B, V) fp32, with no
    host sync and no position-dependent shape: the cache supplies the rotary rows, the attention over its first
    cache.bucket slots, the fused q/k/v weights, the smear gate's previous embedding and the position's advance,
    all on the device."""
    # additive (0 / -inf), in the dtype attention computes in: what SDPA would otherwise make of a bool mask in every
    # layer, made once per step
    unwritten = (cache.slots[:cache.bucket] > cache.pos).view(1, 1, 1, -1)
    mask = torch.zeros(unwritten.shape, dtype=cache.dtype, device=unwritten.device)
    cache.visible = mask.masked_fill_(unwritten, float("-inf"))
    return model(ids, kv_cache=cache)[:, -1]


BUCKET = 256  # a step attends over the filled slots rounded up to a multiple of this: one CUDA graph per bucket


def _no_compile(e):
    warnings.warn(f"torch.compile of the decode step failed, decoding without it: {type(e).__name__}: {e}")


class Decoder:
    """Fixed-shape decoding of batch_size rows for up to max_len positions (prompt included). A step attends over
    the filled slots rounded up to a multiple of `bucket`. With cuda_graph, the first step in a bucket records a
    graph and later ones replay it; with compile (default: on CUDA) the step runs through torch.compile, inside
    the graph. A Decoder can be reused (prefill again)."""

    def __init__(self, model, batch_size, max_len, cuda_graph=False, compile_step=None, bucket=BUCKET):
        c, device = model.config, model.get_device()
        if max_len > model.cos.size(1):
            raise ValueError(f"max_len {max_len} is beyond the model's rotary tables ({model.cos.size(1)})")
        if cuda_graph and device.type != "cuda":
            raise ValueError("a CUDA graph needs the model on a CUDA device")
        if bucket < 1:
            raise ValueError(f"bucket must be at least 1 slot, got {bucket}")
        on_cuda = device.type == "cuda"
        self.model, self.batch_size, self.cuda_graph, self.bucket = model, batch_size, cuda_graph, bucket
        self.compile_step = on_cuda if compile_step is None else compile_step
        # CUDA computes in bf16 (autocast, a no-op on bf16 weights); the weight-cast cache must be off, or a graph
        # would keep replaying casts of weights that have since been trained (chat_rl samples from a live policy)
        dtype = torch.bfloat16 if on_cuda else model.lm_head.weight.dtype
        head_dim = c.n_embd // c.n_head
        self.cache = StaticKVCache(batch_size, c.n_kv_head, max_len, head_dim, c.n_layer, device, dtype)
        # each layer's [W_q; W_k; W_v] for one matmul, in the dtype the step computes in. Copies, refreshed from the
        # model at every prefill: weights trained between generations (chat_rl) are picked up, a generation sees one
        # set throughout, and the model's own parameters stay as training made them (c_q, c_k, c_v as views into one
        # tensor could never go stale, but model.to(), load_state_dict(assign=True) or an optimizer replacing
        # .data would silently break the aliasing). A graph reads these buffers, so they are filled in place.
        rows = (c.n_head + 2 * c.n_kv_head) * head_dim
        self.cache.qkv_weights = [torch.empty(rows, c.n_embd, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.refresh_weights()
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if on_cuda \
            else contextlib.nullcontext
        # gpt-fast's recipe: compile the step (elementwise ops fused, fewer launches), capture the compiled code in
        # our own graph, so no cudagraph mode of torch.compile's. Dynamic shapes: one compile serves every bucket
        # and batch size above 1 (sizes are arguments of the kernels, fixed again by each graph)
        self.step_fn = decode_step
        if self.compile_step:
            try:
                self.step_fn = torch.compile(decode_step, fullgraph=True, dynamic=True)
            except Exception as e:  # e.g. a Python that dynamo does not support yet
                _no_compile(e)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the graphs' input
        self.graphs = {}  # bucket -> (CUDA graph, the logits tensor it writes)
        self.busy = False  # set by Engine while a generation uses this decoder

    @torch.inference_mode()
    def refresh_weights(self):
        """Copy the model's current q, k, v weights into the fused ones the step reads."""
        for fused, block in zip(self.cache.qkv_weights, self.model.transformer.h):
            a, i = block.attn, 0
            for w in (a.c_q.weight, a.c_k.weight, a.c_v.weight):
                fused[i:i + w.size(0)].copy_(w)
                i += w.size(0)

    @torch.inference_mode()
    def prefill(self, kv_cache):
        self.refresh_weights()
        self.cache.prefill(kv_cache)

    def _run(self, ids):
        with self.autocast():
            if self.step_fn is decode_step:
                return decode_step(self.model, ids, self.cache)
            try:
                return self.step_fn(self.model, ids, self.cache)
            except Exception as e:  # compilation failed here (no Triton, an unsupported op): serve uncompiled
                _no_compile(e)
                self.step_fn = decode_step
                return decode_step(self.model, ids, self.cache)

    def _capture(self):
        # warm-up off the default stream, as capture requires (lazy inits, kernel choice, compilation); it runs real
        # steps, so everything they write (pos, a k/v slot, the smear gate's previous embedding) is put back after each
        saved = self.cache.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self.ids)
                self.cache.restore(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # recorded, not run
            logits = self._run(self.ids)
        return graph, logits

    @torch.inference_mode()
    def step(self, ids):
        """ids (B, 1) -> logits (B, V) for the next position. With a graph the logits tensor is the graph's own
        output, overwritten by the next step: use it before stepping again."""
        n = self.cache.length
        if n >= self.cache.max_len:
            raise ValueError(f"Decoder full: all {self.cache.max_len} positions used")
        self.cache.bucket = min(self.cache.max_len, (n // self.bucket + 1) * self.bucket)  # slots 0..n, rounded up
        self.cache.length = n + 1
        if not self.cuda_graph:
            return self._run(ids)
        if self.cache.bucket not in self.graphs:
            self.graphs[self.cache.bucket] = self._capture()
        graph, logits = self.graphs[self.cache.bucket]
        self.ids.copy_(ids)
        graph.replay()
        return logits
