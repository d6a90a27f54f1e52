"""BPE tokenizer: trained with rustbpe, encoded with tiktoken; special tokens and chat rendering with loss masks.

rustbpe learns the merges (fast, parallel); tiktoken runs them at inference and in the data loader (faster
than rustbpe's own encoder). Both apply the same split pattern and ranks, so they give identical ids.
"""

import os
import pickle

import rustbpe
import tiktoken
import torch

from nanochat.common import get_base_dir, write_atomic

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's answer, forced in at inference
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits instead of 3: with our small
# vocabularies (4K-64K) the ~1,100 tokens for every 1- to 3-digit number would take a large share of the
# vocabulary, and shorter digit groups make arithmetic (GSM8K) tokenize more uniformly.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class Tokenizer:
    def __init__(self, pattern, mergeable_ranks, special_tokens=None):
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        # special tokens take the ids right after the ordinary ones
        offset = len(mergeable_ranks)
        self.special_tokens = special_tokens or {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.encode_special("<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Learn BPE merges over the texts; vocab_size counts the special tokens too."""
        num_ordinary = vocab_size - len(SPECIAL_TOKENS)
        if num_ordinary < 256:
            raise ValueError(f"vocab_size {vocab_size} too small: need 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, num_ordinary, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe ranks are not contiguous"
        if len(ranks) < num_ordinary:
            print(f"warning: the text allowed only {len(ranks)} of {num_ordinary} ordinary tokens; "
                  f"vocab size is {len(ranks) + len(SPECIAL_TOKENS)}", flush=True)
        return cls(bpe.get_pattern(), ranks)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train`")
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
            return cls(state["pattern"], state["mergeable_ranks"], state["special_tokens"])
        except Exception as e:
            raise RuntimeError(f"corrupt tokenizer file {path} ({e}): "
                               f"retrain with `python -m scripts.tok_train`") from e

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl and its token_bytes.pt together, so the two always match."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        state = {"name": self.enc.name, "pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks,
                 "special_tokens": self.special_tokens}
        write_atomic(os.path.join(tokenizer_dir, "tokenizer.pkl"), lambda f: pickle.dump(state, f))
        write_atomic(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(self.token_bytes(), f))

    def token_bytes(self):
        """LongTensor[vocab]: UTF-8 bytes each id stands for, 0 for special tokens (they are not text)."""
        nbytes = torch.zeros(self.get_vocab_size(), dtype=torch.long)
        for token, rank in self.mergeable_ranks.items():
            nbytes[rank] = len(token)
        return nbytes

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_id

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {list(self.special_tokens)}")
        return self.special_tokens[name]

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else token

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Ids of a string, or a list of id lists for a list of strings. Special-token strings inside the text
        are encoded as ordinary text (a user typing "<|bos|>" must not inject a control token)."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

    def id_to_token(self, id):
        return self.enc.decode([id])

    # ---- chat ------------------------------------------------------------------------------------------

    @staticmethod
    def _messages(conversation):
        """The conversation's messages, a leading system message merged into the first user message, checked
        to alternate user/assistant starting with user."""
        messages = list(conversation["messages"])
        for m in messages:
            if m.get("role") != "assistant" and not isinstance(m.get("content"), str):
                raise ValueError(f"{m.get('role')} message content must be a string, "
                                 f"got {type(m.get('content')).__name__}")
        if messages and messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": merged}] + messages[2:]
        if not messages:
            raise ValueError("conversation has no messages")
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != expected:
                raise ValueError(f"message {i} has role {m.get('role')!r} where {expected!r} is expected: "
                                 f"messages must alternate user/assistant starting with user "
                                 f"(after an optional system message)")
        return messages

    @staticmethod
    def _parts(content):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"assistant content must be a string or a list of parts, got {type(content).__name__}")
        for part in content:
            if part.get("type") not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
                raise ValueError(f"bad assistant part {part!r}: "
                                 f"want {{'type': 'text'|'python'|'python_output', 'text': str}}")
        return content

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask) of a conversation; mask 1 on what the model is trained to say: assistant text, python
        tool calls and assistant_end. Tool outputs are 0: at inference the tool supplies them."""
        ids, mask = [], []

        def add(tokens, trained):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        special = self.special_tokens
        add(self.bos_id, 0)
        for message in self._messages(conversation):
            if message["role"] == "user":
                add(special["<|user_start|>"], 0)
                add(self.encode(message["content"]), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            for part in self._parts(message["content"]):
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add([special["<|python_start|>"], *tokens, special["<|python_end|>"]], 1)
                else:
                    add([special["<|output_start|>"], *tokens, special["<|output_end|>"]], 0)
            add(special["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the assistant's reply: the conversation without its final assistant message
        (if any, e.g. an eval's reference answer), ending with <|assistant_start|>."""
        messages = list(conversation["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def visualize_tokenization(self, ids, mask):
        """Tokens separated by '|', trained ones (mask 1) green, the rest red: for eyeballing a rendering."""
        color = {0: "\033[91m", 1: "\033[92m"}
        return "|".join(f"{color[m]}{self.id_to_token(i)}\033[0m" for i, m in zip(ids, mask))


def get_tokenizer():
    return Tokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: train the tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device)
