"""Compression of our tokenizer (bytes per token, higher is better) on held-out text and fixed snippets,
beside GPT-2's and GPT-4's tokenizers when tiktoken has them cached (they download on first use).

python -m scripts.tok_eval
"""

import argparse

import tiktoken

from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="Bytes per token of our tokenizer vs GPT-2 / GPT-4 on held-out text")
parser.add_argument("--val-chars", type=int, default=10_000_000, help="characters of the validation shard to encode")
args = parser.parse_args()

SNIPPETS = {
    "news": ("The city council voted 7-2 on Tuesday to extend the riverside tram line by 4.5 kilometres, "
             "a project officials say will cost about $310 million and open in late 2029. Opponents argued "
             "that the money would be better spent on buses, while local businesses welcomed the decision."),
    "code": ("def moving_average(values, window=3):\n"
             "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
             "    if window <= 0:\n"
             "        raise ValueError(f\"window must be positive, got {window}\")\n"
             "    sums = [0]\n"
             "    for v in values:\n"
             "        sums.append(sums[-1] + v)\n"
             "    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]\n"),
    "math": ("Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which vanishes at x = 2, and f(2) = -5. "
             "Since f''(x) = 6 > 0, this is a minimum. More generally, \\int_0^1 x^n \\, dx = \\frac{1}{n+1} "
             "for n \\geq 0, and 1 + 2 + \\cdots + 100 = 5050."),
    "korean": ("오늘 아침에는 비가 내렸지만 오후에는 날씨가 맑아졌습니다. 우리는 공원에서 산책을 하고 "
               "근처 카페에서 따뜻한 차를 마셨습니다. 내일은 도서관에 가서 새 책을 빌릴 계획입니다."),
}

# the held-out text: the validation shard, up to --val-chars
val_docs, nchars = [], 0
for docs in parquets_iter_batched("val"):
    for doc in docs:
        val_docs.append(doc)
        nchars += len(doc)
        if nchars >= args.val_chars:
            break
    if nchars >= args.val_chars:
        break

tokenizer = get_tokenizer()
encoders = {f"ours ({tokenizer.get_vocab_size()})": lambda texts: tokenizer.encode(texts)}
notes = []
for name in ["gpt2", "cl100k_base"]:
    try:
        enc = tiktoken.get_encoding(name)
        encoders[name] = lambda texts, enc=enc: enc.encode_ordinary_batch(texts)
    except Exception as e:  # no network and not in tiktoken's cache: compare without it
        notes.append(f"{name}: skipped: not cached ({type(e).__name__})")
        print(notes[-1])

texts = {"val shard": val_docs, **{k: [v] for k, v in SNIPPETS.items()}}
rows = []
for text_name, docs in texts.items():
    row = {"text": text_name, "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    for enc_name, encode in encoders.items():
        ntokens = sum(len(ids) for ids in encode(docs))
        row[f"{enc_name} tokens"] = ntokens
        row[f"{enc_name} bytes/token"] = row["bytes"] / ntokens
    rows.append(row)

header = f"{'text':<10} {'bytes':>12}" + "".join(f" {name:>18} {'b/tok':>6}" for name in encoders)
print(header)
print("-" * len(header))
for row in rows:
    print(f"{row['text']:<10} {row['bytes']:>12,}" + "".join(
        f" {row[f'{name} tokens']:>18,} {row[f'{name} bytes/token']:>6.2f}" for name in encoders))

get_report().log(section="Tokenizer evaluation", data=rows + notes)
