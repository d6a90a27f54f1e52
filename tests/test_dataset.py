"""Pretraining data: the shard downloader against a loopback HTTP server, the offline builder, the sharded iterator."""

import collections
import http.server
import json
import os
import re
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset

VAL = dataset.shard_name(dataset.MAX_SHARD)


def shard_bytes(index, n_docs=40, row_group_size=16):
    texts = [f"shard {index} document {j}: " + "lorem ipsum " * (5 + j % 7) for j in range(n_docs)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=row_group_size, compression="zstd")
    return sink.getvalue().to_pybytes()


class ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files by name; hangs up half-way through the first response for names in server.drop."""

    def do_GET(self):
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        with srv.lock:
            srv.hits[name] += 1
            first = srv.hits[name] == 1
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            time.sleep(srv.delay)  # long enough for parallel requests to overlap
            body = srv.files.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if first and name in srv.drop:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True  # the socket closes with half the promised body sent
                return
            self.wfile.write(body)
        finally:
            with srv.lock:
                srv.inflight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.files = {dataset.shard_name(i): shard_bytes(i) for i in (0, 1, 2, dataset.MAX_SHARD)}
    srv.drop, srv.hits, srv.lock = set(), collections.Counter(), threading.Lock()
    srv.inflight = srv.max_inflight = 0
    srv.delay = 0.0
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/datasets/shuffle/resolve/main"
    yield srv
    srv.shutdown()
    srv.server_close()


def assert_mirrors_server(srv, d):
    """data dir holds exactly the served shards, byte for byte, and no partial files."""
    assert sorted(os.listdir(d)) == sorted(srv.files)
    for name, body in srv.files.items():
        with open(os.path.join(d, name), "rb") as f:
            assert f.read() == body, name


def test_download_parallel_and_retries_dropped_connection(base_dir, server):
    server.delay = 0.3
    server.drop = {dataset.shard_name(1), VAL}
    summary = dataset.download(3, base_url=server.url, workers=4, backoff_s=0.01, timeout_s=10)
    assert summary["fetched"] == sorted(server.files) and not summary["failed"] and not summary["skipped"]
    assert summary["bytes"] == sum(map(len, server.files.values()))
    assert server.max_inflight >= 3  # the shards were requested concurrently
    assert server.hits == {dataset.shard_name(0): 1, dataset.shard_name(1): 2, dataset.shard_name(2): 1, VAL: 2}
    assert_mirrors_server(server, dataset.data_dir())
    # what the loader reads back is the served documents
    val = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
    assert val == pq.read_table(pa.BufferReader(server.files[VAL])).column("text").to_pylist()


def test_download_refetches_corrupt_and_truncated_files(base_dir, server, capsys):
    d = dataset.data_dir()
    os.makedirs(d)
    good, truncated = dataset.shard_name(0), dataset.shard_name(1)
    with open(os.path.join(d, good), "wb") as f:
        f.write(server.files[good])
    with open(os.path.join(d, truncated), "wb") as f:
        f.write(server.files[truncated][: len(server.files[truncated]) * 3 // 4])
    with open(os.path.join(d, VAL), "wb") as f:
        f.write(b"this is not parquet" * 100)
    summary = dataset.download(3, base_url=server.url, workers=2, backoff_s=0.01, timeout_s=10)
    assert summary["skipped"] == [good]
    assert summary["refetched"] == sorted([truncated, VAL])
    assert summary["fetched"] == [dataset.shard_name(2)]
    assert server.hits[good] == 0 and server.hits[truncated] == 1
    out = capsys.readouterr().out
    assert f"{truncated}: existing file is corrupt or truncated" in out and f"{VAL}: existing file is corrupt" in out
    assert_mirrors_server(server, d)


def test_download_resumes_interrupted_run(base_dir, server):
    d = dataset.data_dir()
    os.makedirs(d)
    for name in (dataset.shard_name(0), dataset.shard_name(1)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(server.files[name])
    partial = dataset.shard_name(2)
    with open(os.path.join(d, partial + ".tmp"), "wb") as f:  # killed mid-download
        f.write(server.files[partial][:100])
    assert dataset.list_parquet_files(d) == [os.path.join(d, dataset.shard_name(i)) for i in (0, 1)]
    summary = dataset.download(3, base_url=server.url, workers=3, backoff_s=0.01, timeout_s=10)
    assert summary["skipped"] == [dataset.shard_name(0), dataset.shard_name(1)]
    assert summary["fetched"] == [partial, VAL]
    assert server.hits == {partial: 1, VAL: 1}
    assert_mirrors_server(server, d)
    again = dataset.download(3, base_url=server.url, workers=3)  # nothing left to do
    assert len(again["skipped"]) == 4 and sum(server.hits.values()) == 2


def test_download_cli_env_url_and_missing_shard(base_dir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    rc = dataset.main(["download", "-n", "4", "--workers", "2", "--max-attempts", "3"])
    assert rc == 1  # shard_00003 is not served: a 404 fails at once instead of being retried
    assert server.hits[dataset.shard_name(3)] == 1
    assert "1 failed" in capsys.readouterr().out
    assert sorted(os.listdir(dataset.data_dir())) == sorted(server.files)


# -----------------------------------------------------------------------------
# offline builder

def synthetic_conversations(n=200):
    """n conversations, some cut into chunks <id>_0, <id>_1, ... as ShareGPT does; every text names its id."""
    convs = []
    for i in range(n):
        for c in range(1 + i % 3):
            turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": f"conv{i} chunk{c} turn{t} " + "word " * (i % 50)}
                     for t in range(2 + (i + c) % 4)]
            convs.append({"id": f"conv{i}_{c}", "conversations": turns})
    return convs


def conv_of(text):
    return int(re.match(r"conv(\d+) ", text).group(1))


def read_tree(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_offline_build_is_deterministic_and_splits_disjoint(base_dir, tmp_path):
    convs = synthetic_conversations()
    kw = dict(conversations=convs, chars_per_shard=4000, row_group_size=8)
    summary = dataset.build_offline(**kw)  # default locations under base_dir
    dataset.build_offline(out_dir=str(tmp_path / "b" / "base_data"), chat_dir=str(tmp_path / "b" / "chat"), **kw)
    a, chat_a = dataset.data_dir(), os.path.dirname(dataset.chat_data_path("train"))
    assert read_tree(a) == read_tree(tmp_path / "b" / "base_data")
    assert read_tree(chat_a) == read_tree(tmp_path / "b" / "chat")
    assert not [f for f in os.listdir(base_dir) if ".tmp" in f or ".old" in f]

    files = dataset.list_parquet_files()
    assert [os.path.basename(f) for f in files] == [dataset.shard_name(i) for i in range(len(files))]
    assert len(files) == summary["shards"] >= 4
    shard_texts = []
    for path in files:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        sizes = [pf.metadata.row_group(r).num_rows for r in range(pf.num_row_groups)]
        rows = 8 if path != files[-1] else max(1, min(8, pf.metadata.num_rows // 64))  # val: small row groups
        assert all(s == rows for s in sizes[:-1]) and 0 < sizes[-1] <= rows
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        shard_texts.append(pq.read_table(path).column("text").to_pylist())
    train = [t for s in shard_texts[:-1] for t in s]
    val = shard_texts[-1]
    assert len(train) == summary["docs"]["train"] and len(val) == summary["docs"]["val"] > 0
    chats = {s: [json.loads(line) for line in open(dataset.chat_data_path(s))] for s in ("train", "val")}
    assert all(len(chats[s]) == summary["chat_conversations"][s] > 0 for s in chats)

    # every conversation (with all its chunks) lands on exactly one side, the one its id hashes to
    ids = {"train": {conv_of(t) for t in train}, "val": {conv_of(t) for t in val},
           "chat_train": {conv_of(c["messages"][0]["content"]) for c in chats["train"]},
           "chat_val": {conv_of(c["messages"][0]["content"]) for c in chats["val"]}}
    sides = list(ids.values())
    assert all(not (x & y) for i, x in enumerate(sides) for y in sides[i + 1:])
    assert set().union(*sides) == set(range(200))
    for split, members in ids.items():
        assert all(dataset.split_of(f"conv{i}_0") == split for i in members)
    assert len(train) + len(val) == sum(1 + i % 3 for i in ids["train"] | ids["val"])  # one doc per chunk
    for c in chats["train"] + chats["val"]:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)

    # rank r of W reads global row groups r, r+W, ...: disjoint strides whose union is the whole split in order
    groups = list(dataset.parquets_iter_batched("train"))
    assert [t for g in groups for t in g] == train and len(groups) > 6
    for world in (2, 3):
        per_rank = [list(dataset.parquets_iter_batched("train", start=r, step=world)) for r in range(world)]
        assert per_rank == [groups[r::world] for r in range(world)]
    assert list(dataset.parquets_iter_batched("train", start=5, step=4)) == groups[5::4]  # a resumed stride
    assert [t for g in dataset.parquets_iter_batched("val") for t in g] == val


def test_sharegpt_conversion_and_truncated_json():
    conv = {"id": "abc_3", "conversations": [
        {"from": "gpt", "value": "...end of an answer begun in chunk 2"},
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "Q1"},
        {"from": "human", "value": " and more\n"},
        {"from": "gpt", "value": "  "},
        {"from": "chatgpt", "value": "A1"},
        {"from": "human", "value": "Q2 never answered"}]}
    assert dataset.sharegpt_to_chat(conv) == {"messages": [{"role": "user", "content": "Q1\n\nand more"},
                                                          {"role": "assistant", "content": "A1"}]}
    assert dataset.sharegpt_to_text(conv) == ("...end of an answer begun in chunk 2\n\nbe brief\n\nQ1\n\nand more"
                                              "\n\nA1\n\nQ2 never answered")
    assert dataset.sharegpt_to_chat({"id": "x_0", "conversations": [{"from": "gpt", "value": "hi"}]}) is None
    assert dataset.split_of("abc_0") == dataset.split_of("abc_17")  # chunks of one conversation stay together
    assert dataset.recover_json_array('[\n {"a": 1},\n {"b": [2, "]"]},\n {"c": "cut off') == [{"a": 1}, {"b": [2, "]"]}]
    assert dataset.recover_json_array('[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    assert dataset.recover_json_array("[ ]") == []


def test_real_sharegpt_wheel():
    convs = dataset.load_sharegpt()
    assert len(convs) == 17_671
    assert sum(len(c["conversations"]) for c in convs) == 129_071
    assert sum(len(m["value"]) for c in convs for m in c["conversations"]) == 113_818_067
    splits = collections.Counter(dataset.split_of(c["id"]) for c in convs)
    assert 0.12 < (splits["chat_train"] + splits["chat_val"]) / len(convs) < 0.18
    assert 0.01 < splits["val"] / (splits["train"] + splits["val"]) < 0.03


def test_missing_data_errors(base_dir):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset offline"):
        next(dataset.parquets_iter_batched("train"))
    d = dataset.data_dir()
    os.makedirs(d)
    for i in (0, 1):  # real layout without its validation shard
        with open(os.path.join(d, dataset.shard_name(i)), "wb") as f:
            f.write(shard_bytes(i))
    with pytest.raises(FileNotFoundError, match=f"validation shard {VAL} missing"):
        next(dataset.parquets_iter_batched("val"))
    with open(os.path.join(d, VAL), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(RuntimeError, match=f"corrupt shard .*{VAL}"):
        next(dataset.parquets_iter_batched("val"))


def test_ensure_data_picks_source(base_dir, tmp_path, monkeypatch, server, capsys):
    monkeypatch.setattr(dataset, "load_sharegpt", synthetic_conversations)
    # told to stay offline with nothing cached: build the offline corpus
    assert dataset.ensure_data(8) == "offline"
    assert "offline ShareGPT corpus (NANOCHAT_OFFLINE=1)" in capsys.readouterr().out
    built = read_tree(dataset.data_dir())
    assert dataset.is_offline_corpus() and os.path.exists(dataset.chat_data_path("val"))
    with pytest.raises(RuntimeError, match="holds the offline corpus"):
        dataset.download(1, base_url=server.url)  # never mix real shards into the offline corpus
    monkeypatch.setattr(dataset, "load_sharegpt", lambda: pytest.fail("rebuilt an existing corpus"))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
    assert dataset.ensure_data(8, base_url=server.url) == "offline" and read_tree(dataset.data_dir()) == built

    # network reachable, nothing cached: download the real shards
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "online"))
    assert dataset.ensure_data(2, base_url=server.url) == "real"
    assert sorted(os.listdir(dataset.data_dir())) == [dataset.shard_name(0), dataset.shard_name(1), VAL]
    # real shards cached but told to stay offline: keep them; offline chat data comes without touching them
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setattr(dataset, "load_sharegpt", synthetic_conversations)
    assert dataset.ensure_data(2) == "real"
    assert "real FineWeb-Edu shards cached" in capsys.readouterr().out
    dataset.ensure_offline_data()
    assert sorted(os.listdir(dataset.data_dir())) == [dataset.shard_name(0), dataset.shard_name(1), VAL]
    assert os.path.exists(dataset.chat_data_path("train"))
    with pytest.raises(RuntimeError, match="holds downloaded shards"):
        dataset.build_offline()

    # network absent: fall back to the offline corpus
    monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "unreachable"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert dataset.ensure_data(2, base_url=f"http://127.0.0.1:{closed_port}") == "offline"
    assert "unreachable" in capsys.readouterr().out and dataset.is_offline_corpus()


def test_data_seed_permutes_the_items_the_same_way_every_epoch():
    from nanochat.dataloader import item_order
    assert [item_order(10)(i) for i in range(25)] == [i % 10 for i in range(25)]  # 0: the dataset's own order
    order = item_order(10, data_seed=3)
    first = [order(i) for i in range(10)]
    assert sorted(first) == list(range(10)) and first != list(range(10))  # every item once, in another order
    assert [order(i) for i in range(10, 30)] == first * 2  # the same permutation in every epoch
    assert first == [item_order(10, data_seed=3)(i) for i in range(10)] != [item_order(10, data_seed=4)(i) for i in range(10)]
