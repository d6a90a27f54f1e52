"""Tokenizer: BPE training, rustbpe == tiktoken ids, lossless round trips, special-token safety, chat masks."""

import glob
import os
import random
import re

import pytest
import rustbpe
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_token_bytes, get_tokenizer

VOCAB_SIZE = 1024

# text no test trained on: scripts, emoji (with ZWJ sequences and skin tones), combining marks, whitespace runs
UNICODE_CASES = [
    "", " ", "\n", "\r\n\r\n", "   \t\t  \n\n\n    x", "trailing spaces   ", "\u00a0\u3000\u2028 nbsp",
    "Hello, world! It's 12345 o'clock; we'll see.",
    "日本語のテキストと中文文本", "안녕하세요, 세계!", "Ελληνικά και русский текст", "مرحبا بالعالم", "שלום עולם",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇰🇷", "e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 \u1100\u1161\u11a8", "\x00\x01\x7f\ufffd\U0010ffff",
    "<|bos|> is just text here <|assistant_end|>", "def f(x):\n\treturn x**2  # ∑ ≤ ∞\n",
]


def stdlib_corpus(max_bytes=400_000):
    """A few hundred KB of real text that exists wherever Python does: the stdlib's own source files."""
    docs, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = f.read()
        docs.append(doc)
        total += len(doc.encode("utf-8"))
        if total >= max_bytes:
            break
    return docs


def random_texts(n=300, seed=0):
    """Random strings over many unicode ranges (no surrogates: not encodable), plus random bytes as utf-8."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7e), (0x00, 0x1f), (0xa0, 0x24f), (0x300, 0x36f), (0x400, 0x4ff), (0x600, 0x6ff),
              (0x3040, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xe000, 0xf8ff), (0x1f300, 0x1faff),
              (0x10000, 0x10ffff)]
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 60)):
            lo, hi = rng.choice(ranges)
            chars.append(" " * rng.randint(1, 4) if rng.random() < 0.15 else chr(rng.randint(lo, hi)))
        texts.append("".join(chars))
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).decode("utf-8", errors="replace"))
    return texts


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train_from_iterator(iter(corpus), VOCAB_SIZE)


def test_vocab_layout(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    # every byte has its own token (nothing is ever out of vocabulary) ...
    assert {tok.mergeable_ranks[bytes([b])] for b in range(256)} == set(range(256))
    # ... and the specials take the last ids, in order
    num_ordinary = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(num_ordinary, VOCAB_SIZE))
    assert tok.get_bos_token_id() == num_ordinary
    assert tok.id_to_token(tok.encode_special("<|python_end|>")) == "<|python_end|>"
    assert tok.pattern == SPLIT_PATTERN
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_from_iterator(iter(["abc"]), 256)


def test_rustbpe_and_tiktoken_give_identical_ids(tok, corpus):
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(corpus), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    # training is deterministic: the same merges as the tokenizer under test
    assert {bytes(t): r for t, r in bpe.get_mergeable_ranks()} == tok.mergeable_ranks
    ours = tok.encode(corpus)
    assert ours == bpe.batch_encode(corpus)
    assert sum(map(len, ours)) < 0.5 * sum(len(d.encode("utf-8")) for d in corpus)  # it did learn merges
    assert [tok.decode(ids) for ids in ours] == corpus


def test_round_trip_arbitrary_unicode(tok):
    texts = UNICODE_CASES + random_texts()
    batch = tok.encode(texts, num_threads=2)
    for text, ids in zip(texts, batch):
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text


def test_special_token_strings_are_ordinary_text(tok):
    special_ids = set(tok.special_tokens.values())
    for name in SPECIAL_TOKENS:
        text = f"say {name} and{name}{name}"
        ids = tok.encode(text)
        assert not special_ids & set(ids)
        assert tok.decode(ids) == text
    ids = tok.encode("hi", prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert ids == [tok.get_bos_token_id()] + tok.encode("hi") + [tok.encode_special("<|assistant_end|>")]
    assert tok.encode(["a", "b"], prepend=tok.get_bos_token_id()) == [[tok.get_bos_token_id()] + tok.encode(t) for t in "ab"]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_token_bytes_count_utf8_bytes(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.shape == (VOCAB_SIZE,) and token_bytes.dtype == torch.long
    assert token_bytes[[tok.encode_special(s) for s in SPECIAL_TOKENS]].tolist() == [0] * len(SPECIAL_TOKENS)
    assert token_bytes[:256].tolist() == [1] * 256 and token_bytes[256:VOCAB_SIZE - len(SPECIAL_TOKENS)].min() >= 2
    for text in UNICODE_CASES + random_texts(50, seed=1):
        assert token_bytes[tok.encode(text)].sum().item() == len(text.encode("utf-8"))


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is 12*34?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "It is 408."},
    ]},
    {"role": "user", "content": "Thanks <|assistant_end|>"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_known_mask(tok):
    s = tok.encode_special
    expected = [
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")], 0), (tok.encode("Be terse.\n\nWhat is 12*34?"), 0), ([s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0), (tok.encode("Let me compute."), 1),
        ([s("<|python_start|>")], 1), (tok.encode("12*34"), 1), ([s("<|python_end|>")], 1),
        ([s("<|output_start|>")], 0), (tok.encode("408"), 0), ([s("<|output_end|>")], 0),
        (tok.encode("It is 408."), 1), ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")], 0), (tok.encode("Thanks <|assistant_end|>"), 0), ([s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0), (tok.encode("You're welcome."), 1), ([s("<|assistant_end|>")], 1),
    ]
    ids, mask = tok.render_conversation(CONVERSATION)
    assert ids == [i for tokens, _ in expected for i in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]
    # read back: exactly the assistant's words, its tool call and its end markers are trained
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == \
        "Let me compute.<|python_start|>12*34<|python_end|>It is 408.<|assistant_end|>You're welcome.<|assistant_end|>"
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be terse.\n\nWhat is 12*34?<|user_end|><|assistant_start|>"
                               "Let me compute.<|python_start|>12*34<|python_end|><|output_start|>408<|output_end|>"
                               "It is 408.<|assistant_end|><|user_start|>Thanks <|assistant_end|><|user_end|>"
                               "<|assistant_start|>You're welcome.<|assistant_end|>")
    assert tok.render_conversation(CONVERSATION, max_tokens=7) == (ids[:7], mask[:7])
    shown = re.sub(r"\033\[\d+m", "", tok.visualize_tokenization(ids, mask))
    assert shown == "|".join(tok.id_to_token(i) for i in ids)


def test_render_for_completion(tok):
    ids, _ = tok.render_conversation({"messages": CONVERSATION["messages"][:-1]})
    prompt = tok.render_for_completion(CONVERSATION)
    assert prompt == ids + [tok.encode_special("<|assistant_start|>")]
    # a conversation that already ends with the user (serving) is prompted as is
    assert tok.render_for_completion({"messages": CONVERSATION["messages"][:-1]}) == prompt


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "message 1 has role 'tool'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "system message must be followed"),
    ([{"role": "user", "content": ["x"]}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "bad assistant part"),
])
def test_render_rejects_malformed_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_save_load_round_trip(tok, corpus, base_dir):
    tok.save(os.path.join(base_dir, "tokenizer"))
    assert sorted(os.listdir(base_dir / "tokenizer")) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left
    loaded = get_tokenizer()
    texts = corpus[:20] + UNICODE_CASES
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.special_tokens == tok.special_tokens and loaded.get_vocab_size() == VOCAB_SIZE
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)
    assert torch.equal(get_token_bytes("cpu"), tok.token_bytes())


def test_missing_or_corrupt_files_name_the_fix(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes()
    os.makedirs(base_dir / "tokenizer")
    (base_dir / "tokenizer" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="corrupt tokenizer file .*tokenizer.pkl"):
        get_tokenizer()
