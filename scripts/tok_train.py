"""Train the BPE tokenizer on the pretraining shards; writes base_dir/tokenizer/{tokenizer.pkl,token_bytes.pt}.

python -m scripts.tok_train --vocab-size 65536          # the real thing (nanochat's d20 vocabulary)
python -m scripts.tok_train --vocab-size 8192 --max-chars 2000000000 --doc-cap 10000   # CPU preset
"""

import argparse
import os
import time

from nanochat.common import get_base_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

parser = argparse.ArgumentParser(description="Train a BPE tokenizer (rustbpe) on the pretraining text")
parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size, special tokens included")
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
parser.add_argument("--doc-cap", type=int, default=10_000, help="truncate each document to this many characters")
args = parser.parse_args()
print(f"vocab size {args.vocab_size:,}, max chars {args.max_chars:,}, doc cap {args.doc_cap:,}", flush=True)

seen = {"chars": 0, "bytes": 0, "docs": 0}


def text_iterator():
    for docs in parquets_iter_batched("train"):
        for doc in docs:
            doc = doc[:args.doc_cap]  # a few huge documents would otherwise dominate the pair counts
            seen["chars"] += len(doc)
            seen["bytes"] += len(doc.encode("utf-8"))
            seen["docs"] += 1
            yield doc
            if seen["chars"] >= args.max_chars:
                return


# reading the shards happens inside training (streamed), so the time covers both
t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
train_time = time.time() - t0
throughput = seen["bytes"] / train_time / 1e6
print(f"trained on {seen['docs']:,} docs, {seen['chars']:,} chars ({seen['bytes'] / 1e6:.1f} MB) "
      f"in {train_time:.1f}s: {throughput:.2f} MB/s", flush=True)

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(tokenizer_dir)
print(f"saved tokenizer.pkl and token_bytes.pt to {tokenizer_dir}")

# sanity: lossless on text with specials, numbers and non-ASCII
sample = "Hello world! 12345 <|bos|> naïve café 你好 👋\n\tdef f(x): return x**2"
assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer round trip failed"

token_bytes = tokenizer.token_bytes()
ordinary = token_bytes[token_bytes > 0].float()
print(f"vocab size {tokenizer.get_vocab_size():,}; token lengths in bytes: min {int(ordinary.min())}, "
      f"max {int(ordinary.max())}, mean {ordinary.mean():.2f}")

get_report().log(section="Tokenizer training", data=[
    vars(args),
    {"train_docs": seen["docs"], "train_chars": seen["chars"], "train_MB": seen["bytes"] / 1e6,
     "train_time_s": train_time, "throughput_MB_per_s": throughput},
    {"vocab_size": tokenizer.get_vocab_size(), "num_special_tokens": len(SPECIAL_TOKENS),
     "token_bytes_min": int(ordinary.min()), "token_bytes_max": int(ordinary.max()),
     "token_bytes_mean": float(ordinary.mean())},
])
