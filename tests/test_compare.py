"""The DDP-vs-DiLoCo experiment at micro scale: every arm, every column, both plots; re-runs skip finished
stages; a corrupted stage output is detected and that stage (and what depends on it) is redone."""

import os
import re
import subprocess
import sys

from tests.helpers_pipeline import ROOT, make_tiny_corpus

COLUMNS = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE",
           "bytes_across_workers", "wall_seconds"]


def compare(*args):
    proc = subprocess.run([sys.executable, "-m", "scripts.compare", "--scale", "micro", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def stages_run(out):
    m = re.search(r"stages run this time: (.*)", out)
    return m.group(1)


def test_experiment_micro(base_dir):
    make_tiny_corpus(base_dir)
    out = compare()
    report = (base_dir / "compare" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| (")}
    assert set(rows) == {"(a) DDP -> DDP mid/SFT", "(b) DiLoCo -> DiLoCo mid/SFT", "(c) DiLoCo -> DDP mid/SFT"}
    header = next(line for line in report.splitlines() if line.startswith("| arm |"))
    assert [c.strip() for c in header.split("|")[2:-1]] == COLUMNS
    for cells in rows.values():
        assert len(cells) == len(COLUMNS)
        for cell in cells:
            float(cell.replace(",", ""))  # every column holds a number
    # arms (b) and (c) share the DiLoCo base model: same pretraining bpb and CORE
    assert rows["(b) DiLoCo -> DiLoCo mid/SFT"][:2] == rows["(c) DiLoCo -> DDP mid/SFT"][:2]
    # DiLoCo (H=2 here) sends fewer bytes across workers than DDP over the same pretraining
    ddp_bytes = float(rows["(a) DDP -> DDP mid/SFT"][8].replace(",", ""))
    diloco_bytes = float(rows["(b) DiLoCo -> DiLoCo mid/SFT"][8].replace(",", ""))
    assert diloco_bytes < ddp_bytes
    for png in ("val_bpb_vs_tokens.png", "val_bpb_vs_bytes.png"):
        data = (base_dir / "compare" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.image
        image = matplotlib.image.imread(str(base_dir / "compare" / png))
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert "Hyper-parameters that differ" in report and "| base | sync |" in report

    # a re-run does nothing
    assert stages_run(compare()) == "none"

    # a corrupted checkpoint is caught: that stage and its dependents are redone, nothing else
    model_pt = next((base_dir / "checkpoints" / "mid" / "ddp").glob("step_*/model.pt"))
    model_pt.write_bytes(model_pt.read_bytes()[:100])
    out = compare()
    assert stages_run(out) == str(sorted(["mid_train-ddp", "chat_sft-ddp", "chat_eval-ddp"]))
    assert "is missing or corrupted" in out
