"""The DDP-vs-DiLoCo experiment at micro scale: every arm, every column, the plots, the per-stage measures and
the drift between arms; re-runs skip finished stages; a corrupted stage output is detected and that stage (and
what depends on it) is redone, and --dry-run says so beforehand; a second seed plans only its own runs, and the
statistics over seeds hold on known shifts."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers_pipeline import ROOT, make_tiny_corpus

COLUMNS = ["val_bpb", "chat_bpb_base", "mid_val_bpb", "sft_val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU",
           "GSM8K", "HumanEval", "ChatCORE", "bytes_across_workers", "wall_seconds"]


def compare(*args):
    proc = subprocess.run([sys.executable, "-m", "scripts.compare", "--scale", "micro", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def stages_run(out):
    m = re.search(r"stages run this time: (.*)", out)
    return m.group(1)


def planned(out):
    """--dry-run's stages: {name: command}."""
    return dict(re.findall(r"^\[(\S+)\] would run: (.*)$", out, re.M))


def test_experiment_micro(base_dir):
    make_tiny_corpus(base_dir)
    out = compare()
    finished = re.findall(r"^\[(\S+)\] finished in", out, re.M)
    assert sorted(finished) == sorted(set(finished)), finished  # arms (b) and (c) share their base stages: run once
    report = (base_dir / "compare" / "report.md").read_text()
    main_table = report.split("| arm |", 1)[1].split("\n\n", 1)[0]  # the first table: one row per arm
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in main_table.splitlines() if line.startswith("| (")}
    assert set(rows) == {"(a) DDP -> DDP mid/SFT", "(b) DiLoCo -> DiLoCo mid/SFT", "(c) DiLoCo -> DDP mid/SFT"}
    header = next(line for line in report.splitlines() if line.startswith("| arm |"))
    assert [c.strip() for c in header.split("|")[2:-1]] == COLUMNS
    for cells in rows.values():
        assert len(cells) == len(COLUMNS)
        for cell in cells:
            float(cell.replace(",", ""))  # every column holds a number
    # arms (b) and (c) share the DiLoCo base model: same pretraining bpb, base chat bpb and CORE
    b, c = rows["(b) DiLoCo -> DiLoCo mid/SFT"], rows["(c) DiLoCo -> DDP mid/SFT"]
    assert b[:2] == c[:2] and b[4] == c[4]
    # DiLoCo (H=2 here) sends fewer bytes across workers than DDP over the same pretraining
    ddp_bytes = float(rows["(a) DDP -> DDP mid/SFT"][11].replace(",", ""))
    diloco_bytes = float(b[11].replace(",", ""))
    assert diloco_bytes < ddp_bytes
    # the bytes across workers compare sums (checkpoints) and plots (metrics) are the traffic the stage's sync mode
    # sends between workers: DDP's gradient all-reduce, DiLoCo's outer exchange
    metas = {p.parent.parent: json.loads(p.read_text()) for stage in ("base", "mid", "sft")
             for p in (base_dir / "checkpoints" / stage).glob("*/step_*/meta.json")}
    assert {d.parent.name for d in metas} == {"base", "mid", "sft"}
    assert {m["sync"] for m in metas.values()} == {"ddp", "diloco"}
    for tag_dir, meta in metas.items():
        label = "outer_bytes" if meta["sync"] == "diloco" else "inner_bytes"
        assert meta["bytes_across_workers"] == meta[label], (tag_dir, meta)
        for r in map(json.loads, (tag_dir / "metrics.jsonl").read_text().splitlines()):
            if "val_bpb" in r:
                assert r["bytes_across_workers"] == r[label], (tag_dir, r)
    results = json.loads((base_dir / "compare" / "results.json").read_text())
    for arm, r in results.items():
        run = r["runs"][0]
        # the SFT model's chat bpb, measured by chat_eval, is the same measure as SFT's own final val bpb
        sft_meta = json.loads(next((base_dir / "checkpoints" / "sft" / arm).glob("step_*/meta.json")).read_text())
        assert abs(run["sft_val_bpb"] - sft_meta["val_bpb"]) < 1e-6, (arm, run["sft_val_bpb"], sft_meta["val_bpb"])
        for stage in ("base", "mid", "sft"):
            for task in ("ARC-Easy", "ARC-Challenge", "MMLU"):
                assert -20 < r["by_stage"][0][stage][f"{task} log p"] < 0
    drift = json.loads((base_dir / "compare" / "drift.json").read_text())
    assert {(d["pair"], d["stage"]) for d in drift} == {(p, s) for p in ("(b) vs (a)", "(c) vs (a)")
                                                        for s in ("base", "mid", "sft")}
    by = {(d["pair"], d["stage"]): d for d in drift}
    assert by[("(b) vs (a)", "base")] == dict(by[("(c) vs (a)", "base")], pair="(b) vs (a)", arm="diloco")  # shared base
    for d in drift:
        assert len(d["cka"]) == 3 and all(0 < v <= 1 + 1e-9 for v in d["cka"]) and d["relative_l2"] > 0
    assert "## What each stage brings" in report and "## Drift between arms" in report
    for png in ("val_bpb_vs_tokens.png", "val_bpb_vs_bytes.png", "post_training.png", "drift_cka_per_layer.png"):
        data = (base_dir / "compare" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.image
        image = matplotlib.image.imread(str(base_dir / "compare" / png))
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert "Hyper-parameters that differ" in report and "| base | sync |" in report

    # a re-run would do nothing
    assert "dry run: 0 stage(s) would run" in compare("--dry-run")

    # a corrupted checkpoint is caught: --dry-run names that stage and its dependents and touches nothing, then a
    # run redoes exactly those
    model_pt = next((base_dir / "checkpoints" / "sft" / "ddp").glob("step_*/model.pt"))
    model_pt.write_bytes(model_pt.read_bytes()[:100])
    out = compare("--dry-run")
    assert set(planned(out)) == {"chat_sft-ddp", "chat_eval-ddp"} and "is missing or corrupted" in out
    assert len(model_pt.read_bytes()) == 100
    out = compare()
    assert stages_run(out) == str(sorted(["chat_sft-ddp", "chat_eval-ddp"]))

    # a second seed: only its own 7 stages would run (seed 0's are reused), with its own init and data order
    out = compare("--arms", "ddp", "--seeds", "2", "--dry-run")
    cmds = planned(out)
    assert set(cmds) == {f"{stage}-ddp-s1" for stage in ("base_train", "base_eval", "chat_eval_base", "mid_train",
                                                          "chat_eval_mid", "chat_sft", "chat_eval")}
    for stage in ("base_train", "mid_train", "chat_sft"):
        assert " --seed 1338 --data-seed 1 " in cmds[f"{stage}-ddp-s1"] + " "
    assert "--model-tag base_ddp-s1" in cmds["base_train-ddp-s1"] and "--output-tag ddp-s1" in cmds["mid_train-ddp-s1"]
    assert not (base_dir / "runs" / "base_train-ddp-s1.json").exists()

    # a recipe against the paper's: only the recipe's DiLoCo stages would run, the paper's and arm (a) are reused
    out = compare("--arms", "ddp,diloco", "--diloco-recipe", "final_average", "--baseline-recipe", "paper", "--dry-run")
    assert set(planned(out)) == {f"{stage}-diloco_final_average" for stage in (
        "base_train", "base_eval", "chat_eval_base", "mid_train", "chat_eval_mid", "chat_sft", "chat_eval")}
    # with --force every stage of both recipes once: arm (a), shared between them, is not redone for the baseline
    out = compare("--arms", "ddp,diloco", "--diloco-recipe", "final_average", "--baseline-recipe", "paper", "--force",
                  "--dry-run")
    would = re.findall(r"^\[(\S+)\] would run", out, re.M)
    assert len(would) == len(set(would)) == 21 and "dry run: 21 stage(s) would run" in out
    assert {"base_train-ddp", "base_train-diloco", "base_train-diloco_final_average"} <= set(would)

    # the statistics over seeds, on seed 0's real results read back (nothing runs) and a copy of them as seed 1
    # with a known shift: means, standard deviations, and the drift between two identical models (zero, CKA 1)
    from scripts.compare import measure_drift, run_experiment, write_report
    results, runner = run_experiment(["ddp"], "micro")
    assert runner.redone == set()
    r0 = results["ddp"][0]
    r1 = json.loads(json.dumps(r0))
    r1["seed"], r1["row"]["val_bpb"] = 1338, r0["row"]["val_bpb"] + 0.5
    drift = measure_drift({"ddp": [r0, r1]})
    assert {(d["pair"], d["stage"]) for d in drift} == {("(a) seed 1 vs seed 0", s) for s in ("base", "mid", "sft")}
    for d in drift:
        assert d["relative_l2"] == 0 and all(abs(v - 1) < 1e-5 for v in d["cka"])
    write_report({"ddp": [r0, r1]}, runner, str(base_dir / "seeds"), "micro", 0.0, drift)
    results = json.loads((base_dir / "seeds" / "results.json").read_text())
    assert results["ddp"]["seeds"] == [1337, 1338]
    assert results["ddp"]["mean"]["val_bpb"] == pytest.approx(r0["row"]["val_bpb"] + 0.25)
    report = (base_dir / "seeds" / "report.md").read_text()
    assert "## Seeds: spread and differences from (a)" in report and "| (a) seed 1 vs seed 0 | base |" in report
    assert f"| {0.5 / 2 ** 0.5:.4f} |" in report.split("## Seeds", 1)[1]  # the std of val_bpb over the two seeds

    # against a baseline recipe, known gaps to (a) per seed (recipe, baseline): val bpb cut to about a quarter,
    # chat bpb not cut, mid val bpb where the baseline is ahead of (a), SFT halved on average but not on every seed
    diloco = run_experiment(["diloco"], "micro")[0]["diloco"][0]
    recipe, base = ([json.loads(json.dumps(diloco)) for _ in range(2)] for _ in range(2))
    gaps = {"val_bpb": [(0.10, 0.40), (0.12, 0.42)], "chat_bpb_base": [(0.2, 0.2), (0.2, 0.21)],
            "mid_val_bpb": [(-0.05, -0.1), (-0.05, -0.1)], "sft_val_bpb": [(0.10, 0.40), (0.30, 0.40)]}
    for i in range(2):
        recipe[i]["seed"] = base[i]["seed"] = 1337 + i
        for k, per_seed in gaps.items():
            a = (r0, r1)[i]["row"][k]
            recipe[i]["row"][k], base[i]["row"][k] = a + per_seed[i][0], a + per_seed[i][1]
    # a stage of the baseline's own (a marker of 1,000 s): counted with the recipe's stages, and its time too
    with open(runner.marker_path("base_train-diloco_baseline_only"), "w") as f:
        json.dump({"seconds": 1000.0}, f)
    for b in base:
        b["stages"] = b["stages"] + ["base_train-diloco_baseline_only"]
    write_report({"ddp": [r0, r1], "diloco": recipe}, runner, str(base_dir / "recipe"), "micro", 0.0, (),
                 "final_average", ("paper", {"diloco": base}))
    report = (base_dir / "recipe" / "report.md").read_text()
    assert "## Against recipe `paper`" in report
    own = {s for r in [r0, r1] + recipe for s in r["stages"]}
    seconds = sum(runner.marker(s)["seconds"] for s in own) + 1000
    assert f"took {seconds:.0f} s of wall time" in report
    assert f"it re-ran {len(runner.redone)} of {len(own) + 1} stages" in report
    assert "| (b) DiLoCo -> DiLoCo mid/SFT | val_bpb | +0.1100 | +0.4100 | 0.27 | yes |" in report
    rows = json.loads((base_dir / "recipe" / "baseline.json").read_text())["rows"]
    assert {r["measure"]: r["under_half"] for r in rows} == {"val_bpb": True, "chat_bpb_base": False,
                                                            "mid_val_bpb": None, "sft_val_bpb": False}
    assert "| mid_val_bpb | -0.0500 | -0.1000 | - | no gap to cut |" in report


def test_a_recipe_halves_the_gap_only_beyond_two_standard_errors():
    from scripts.compare import gap_against_baseline
    # gaps 0.10, 0.12 vs baseline gaps 0.40, 0.42: differences -0.10, -0.09, mean -0.095, 2 SE 0.01
    gap, base_gap, ratio, half = gap_against_baseline([2.10, 2.12], [2.40, 2.42], [2.0, 2.0])
    assert (gap, base_gap, ratio, half) == (pytest.approx(0.11), pytest.approx(0.41), pytest.approx(0.11 / 0.41), True)
    # gaps 0.10, 0.30 vs 0.40, 0.40: half on average (0.5) but the seeds disagree: differences -0.10, +0.10
    assert gap_against_baseline([2.10, 2.30], [2.40, 2.40], [2.0, 2.0])[3] is False
    assert gap_against_baseline([2.1], [2.4], [2.0])[3] is False  # one seed: never
    assert gap_against_baseline([1.9, 1.9], [1.8, 1.8], [2.0, 2.0])[2:] == (None, None)  # the baseline is ahead


def test_a_difference_is_real_only_beyond_two_standard_errors():
    from scripts.compare import paired_difference, std
    assert std([1.0]) == 0.0 and std([1.0, 3.0]) == 2 ** 0.5
    # differences 0.10, 0.12, 0.08: mean 0.10, sd 0.02, 2 SE = 0.04 / sqrt(3)
    d, two_se, real = paired_difference([2.10, 2.22, 2.18], [2.00, 2.10, 2.10])
    assert d == pytest.approx(0.10) and two_se == pytest.approx(0.04 / 3 ** 0.5) and real
    d, two_se, real = paired_difference([2.10, 1.90, 2.05], [2.00, 2.00, 2.00])  # +0.10, -0.10, +0.05: noise
    assert d == pytest.approx(0.05 / 3) and not real
    assert paired_difference([2.5], [2.0])[2] is False  # one seed: never marked real
