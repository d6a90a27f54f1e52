"""Test helpers around the tiny chat model (nanochat/tiny.py): a real uvicorn server in a thread, and a scripted
stand-in model whose next tokens the test chooses."""

import contextlib
import threading
import time

import torch

from nanochat.tiny import ANIMALS, GREETINGS, PLACES, ROOT, SOURCE, STEP, TAG, build_tiny, load_tiny, synthetic_conversations

__all__ = ["ANIMALS", "GREETINGS", "PLACES", "ROOT", "SOURCE", "STEP", "TAG", "ScriptedModel", "build_tiny", "load_tiny",
           "serve_in_thread", "synthetic_conversations"]


@contextlib.contextmanager
def serve_in_thread(app, timeout=20.0):
    """Run a real uvicorn server for `app` on an ephemeral loopback port; yields its base URL."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


class ScriptedModel(torch.nn.Module):
    """A model-free stand-in for GPT: after the prompt it emits `script` in order, whatever it is fed, so tests
    control exactly what the engine sees. It honours the KVCache protocol (advances the position)."""

    def __init__(self, script, vocab_size, sequence_len=128):
        super().__init__()
        from nanochat.gpt import GPTConfig
        self.script, self.prompt_len = list(script), None
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        if pos == 0:
            self.prompt_len = T
        step = pos + T - self.prompt_len  # tokens generated so far
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 100.0  # certain at any temperature
        if kv_cache is not None:  # write (empty) keys so KVCache.prefill carries the position over
            kv_cache.insert_kv(0, torch.zeros(B, 1, T, 8), torch.zeros(B, 1, T, 8))
            kv_cache.advance(T)
        return logits
