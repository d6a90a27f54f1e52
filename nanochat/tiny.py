"""A tiny tokenizer + chat model checkpoint, for tests and benchmarks that need a real model in seconds.

The model (2 layers, width 64, GQA 2:1) is trained for a few seconds on synthetic conversations, so it
speaks the chat format (answers, then <|assistant_end|>) and its greedy output depends on the prompt.
Built once per machine (cached under ~/.cache/nanochat/test_tiny/, keyed by the code that makes it),
then copied into the base dir that asks for it (build_tiny).
"""

import dataclasses
import hashlib
import os
import random
import shutil
import tempfile

import torch

TAG = "tiny"
SOURCE = "sft"
STEP = 0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bear", "whale", "eagle"]
PLACES = ["forest", "ocean", "desert", "mountains", "city", "river"]
GREETINGS = ["hello", "hi", "hey there", "good morning"]


def _exchange(rng):
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
        return f"tell me about the {animal}", f"The {animal} is an animal that lives in the {place}. It is friendly and curious."
    return rng.choice(GREETINGS), "Hello! I am a tiny model. How can I help you today?"


def synthetic_conversations(n, seed=0):
    """Conversations of one or two exchanges: additions, animals, greetings."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice([1, 1, 2])):
            user, reply = _exchange(rng)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        convs.append({"messages": messages})
    return convs


def _build(out_dir, vocab_size=400, steps=150, seq_len=128):
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    convs = synthetic_conversations(2000)
    texts = [m["content"] for c in convs for m in c["messages"]] + ["Café, naïve, 日本語, emoji ☕🙂."]
    tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size)
    tokenizer.save(os.path.join(out_dir, "tokenizer"))

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights()
    stream = [t for c in convs for t in tokenizer.render_conversation(c)[0]]
    data = torch.tensor(stream, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (16,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    meta = {"model_config": dataclasses.asdict(config), "final_loss": loss.item()}
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = out_dir
    try:
        save_checkpoint(checkpoint_dir(SOURCE, TAG), STEP, model.state_dict(), None, meta)
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def _cache_dir():
    h = hashlib.sha256(torch.__version__.encode())
    for f in ("nanochat/tiny.py", "nanochat/gpt.py", "nanochat/tokenizer.py", "nanochat/checkpoint.py"):
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    return os.path.join(os.path.expanduser("~"), ".cache", "nanochat", "test_tiny", h.hexdigest()[:16])


def build_tiny(base_dir):
    """Put the tiny tokenizer and the sft/tiny checkpoint into base_dir (which must be NANOCHAT_BASE_DIR)."""
    cached = _cache_dir()
    if not os.path.isdir(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="building_", dir=os.path.dirname(cached))
        _build(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cached, base_dir, dirs_exist_ok=True)
    return base_dir


def load_tiny(base_dir):
    """(model, tokenizer, meta) of the tiny checkpoint, on CPU."""
    from nanochat.checkpoint import load_model
    build_tiny(base_dir)
    return load_model(SOURCE, torch.device("cpu"), phase="eval", model_tag=TAG)
