"""Inference: batched sampling with a KV cache, several samples per prompt, and calculator tool use.

The prompt is prefilled once at batch size 1, its cache is copied into num_samples rows, then every step
feeds one token per row: on CUDA through nanochat.decode's fixed-shape step, replayed as a CUDA graph, elsewhere
through GPT.forward's KV cache. A row that closes a python block (python_start ... python_end) gets the value of
the expression forced in as output_start <result> output_end before the model continues.

The sampled tokens stay on the device and feed the next step directly; their copy to the host (for the caller,
the stop tokens and the tool's state machine) is queued before that step is launched and waited for after, so on
CUDA the device computes the next token while the host reads this one (HostCopy). A forced token needs the host
only when there is one.
"""

from collections import deque

import torch

from nanochat.common import autocast_context
from nanochat.decode import Decoder
from nanochat.calculator import use_calculator
from nanochat.gpt import KVCache, check_sampling, sample_next_token


class RowState:
    """Per-sample bookkeeping: pending forced tokens and the python block being written."""

    def __init__(self):
        self.forced = deque()
        self.python_tokens = None  # list while inside a python block
        self.done = False


class HostCopy:
    """A step's small results (tokens, log-probabilities) to the host. On CUDA: non-blocking copies into pinned
    buffers and an event, queued before the next step is launched, so wait() waits for the copies, not for that
    step. Elsewhere (CPU: no queue to overlap with) a plain read."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.buffers, self.pending = {}, []
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, tensors):
        if not self.cuda:
            self.pending = tensors
            return
        self.pending = []
        for i, t in enumerate(tensors):
            buf = self.buffers.get(i)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:  # reused: wait() ran before this start
                buf = self.buffers[i] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            self.pending.append(buf)
        self.event.record()

    def wait(self):
        """-> the tensors given to start, as lists."""
        if self.cuda:
            self.event.synchronize()
        return [t.tolist() for t in self.pending]


class Engine:

    MAX_DECODERS = 4  # (batch, length) shapes whose static cache and CUDA graph are kept for reuse

    def __init__(self, model, tokenizer, static_cache=None):
        """static_cache: decode with nanochat.decode (as a CUDA graph on CUDA, eagerly elsewhere); default: on CUDA."""
        self.model = model
        self.tokenizer = tokenizer
        device = model.get_device()
        self.static_cache = device.type == "cuda" if static_cache is None else static_cache
        self.cuda_graph = self.static_cache and device.type == "cuda"
        self.decoders = {}
        enc = tokenizer.encode_special
        self.python_start, self.python_end = enc("<|python_start|>"), enc("<|python_end|>")
        self.output_start, self.output_end = enc("<|output_start|>"), enc("<|output_end|>")
        self.stop_tokens = {enc("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def _new_cache(self, batch_size, seq_len):
        c = self.model.config  # device and dtype follow the first keys written (bf16 under CUDA autocast)
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)

    def _forward(self, ids, kv_cache, device):
        with autocast_context(device.type):
            return self.model(ids, kv_cache=kv_cache)[:, -1, :]

    def _decoder(self, batch_size, length):
        """A Decoder for this many rows and at least `length` positions; lengths are rounded up to a power of two
        (at least 256, at most the context) so a few graphs serve every request."""
        max_len = min(self.model.config.sequence_len, max(256, 1 << (length - 1).bit_length()))
        key = (batch_size, max_len)
        decoder = self.decoders.get(key)
        if decoder is not None and decoder.busy:  # another generation of this Engine is still under way
            return Decoder(self.model, batch_size, max_len, cuda_graph=self.cuda_graph)
        if decoder is None:
            if len(self.decoders) >= self.MAX_DECODERS:
                self.decoders.clear()  # frees their caches and graphs
            decoder = self.decoders[key] = Decoder(self.model, batch_size, max_len, cuda_graph=self.cuda_graph)
        return decoder

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, logprobs=None):
        """Yields (token_column, token_masks) per step: one token per sample; mask 0 marks forced tool output.
        logprobs=k (0 or more): yields (token_column, token_masks, rows) instead, where rows[i] is (logprob of row i's
        token, [(id, logprob)] of its k likeliest), log-probabilities of the model's own distribution (before
        temperature and top-k)."""
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int), "tokens must be a non-empty list of ids"
        temperature, top_k = check_sampling(temperature, top_k)  # a bad value fails here, before any work
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        # The cache must hold the prompt plus every generated token; the model's context bounds the total.
        room = self.model.config.sequence_len - len(tokens)
        assert room > 0, f"prompt of {len(tokens)} tokens leaves no room in a context of {self.model.config.sequence_len}"
        max_tokens = room if max_tokens is None else min(max_tokens, room)

        kv_prefill = self._new_cache(1, len(tokens))
        logits = self._forward(torch.tensor([tokens], dtype=torch.long, device=device), kv_prefill, device)
        decoder = None
        if self.static_cache:
            decoder = self._decoder(num_samples, len(tokens) + max_tokens)
            decoder.busy = True  # until this generation ends: an interleaved one gets a decoder of its own
            decoder.prefill(kv_prefill)
            step = decoder.step
        else:
            kv_cache = self._new_cache(num_samples, len(tokens) + max_tokens)
            kv_cache.prefill(kv_prefill)
            step = lambda ids: self._forward(ids, kv_cache, device)
        del kv_prefill
        logits = logits.expand(num_samples, -1)
        rows = [RowState() for _ in range(num_samples)]
        host = HostCopy(device)

        try:
            for i in range(max_tokens):
                column = sample_next_token(logits, rng, temperature, top_k)[:, 0]  # (B,) on the device
                forced = [row.forced.popleft() if row.forced else None for row in rows]
                masks = [1 if token is None else 0 for token in forced]
                if 0 in masks:  # a tool's output replaces what was sampled (a copy to the device, only then)
                    force = torch.tensor([token is not None for token in forced], device=device)
                    column = torch.where(force, torch.tensor([token or 0 for token in forced], device=device), column)
                results = [column]
                if logprobs is not None:  # this step's logits, read before the next step overwrites them (CUDA graph)
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    top_lp, top_ids = lp.topk(min(logprobs, lp.size(-1)), dim=-1)
                    results += [lp.gather(-1, column[:, None])[:, 0], top_ids, top_lp]
                host.start(results)
                if i + 1 < max_tokens:  # queued behind the copies: the device decodes on while the host reads
                    logits = step(column[:, None])
                column, *lp_rows = host.wait()
                for row, token in zip(rows, column):
                    self._track(row, token)
                if logprobs is None:
                    yield column, masks
                else:
                    chosen, top_ids, top_lp = lp_rows
                    yield column, masks, [(c, list(zip(ids, lps))) for c, ids, lps in zip(chosen, top_ids, top_lp)]
                if all(row.done for row in rows):
                    break
        finally:  # finished, or closed by a consumer that stopped early (a client that left)
            if decoder is not None:
                decoder.busy = False

    def _track(self, row, token):
        """Advance one row's state machine with the token it just emitted."""
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            # the safe calculator (arithmetic, str.count); anything else gets no output and the model goes on
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            row.python_tokens = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Generated ids (without the prompt or the stop token) and their masks, one list per sample."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


class StreamDecoder:
    """Turns a stream of token ids into text pieces without ever splitting a UTF-8 character.

    A character can span several byte-level tokens; ids are held back while their decoding ends in the
    replacement character, then released together (after 8 ids the bytes are taken as genuinely invalid).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token):
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
