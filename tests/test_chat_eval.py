"""chat_eval: categorical scoring picks among the answer letters, generative scoring grades what the Engine
produced, data-parallel evaluation on 2 gloo processes counts exactly what one process counts, and the CLI
writes its JSON results and report section. Stand-in models built from the conversations give known answers."""

import json
import math
import os

import pytest
import torch

from nanochat.checkpoint import load_model
from nanochat.engine import Engine
from scripts import chat_eval
from tasks.chat_eval import categorical_predictions, chatcore, fit_prompt, load_task, run_chat_eval
from tests.dist_utils import run_distributed
from tests.helpers_tiny import SOURCE, TAG, ScriptedModel, build_tiny


class LetterModel(ScriptedModel):
    """Categorical stand-in: at the last prompt position (its final <|assistant_start|>) the logits are
    answer(prompt) over the vocabulary; padding after it is ignored, as it must be."""

    def __init__(self, tokenizer, answer):
        super().__init__([0], tokenizer.get_vocab_size(), sequence_len=1 << 16)
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.answer = answer

    def forward(self, idx, kv_cache=None):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for row, ids in enumerate(idx.tolist()):
            end = len(ids) - ids[::-1].index(self.assistant_start)
            logits[row, end - 1] = self.answer(tuple(ids[:end]))
        return logits


class AnswerModel(ScriptedModel):
    """Generative stand-in: emits the script that scripts[prompt] holds for the prompt it is prefilled with."""

    def __init__(self, scripts, vocab_size):
        super().__init__([0], vocab_size, sequence_len=1 << 14)
        self.scripts = scripts

    def forward(self, idx, kv_cache=None):
        if kv_cache.get_pos() == 0:
            self.script = self.scripts[tuple(idx[0].tolist())]
        return super().forward(idx, kv_cache)


def oracle_model(tokenizer, conversations):
    """LetterModel that puts its largest logit on each question's gold letter."""
    gold = {}
    for conv in conversations:
        gold[tuple(tokenizer.render_for_completion(conv))] = tokenizer.encode(conv["messages"][-1]["content"])[0]
    return LetterModel(tokenizer, lambda prompt: torch.nn.functional.one_hot(torch.tensor(gold[prompt]),
                                                                              tokenizer.get_vocab_size()).float())


def random_logits(tokenizer, prompt):
    """Logits drawn from a generator seeded by the prompt, so any batching sees the same ones."""
    gen = torch.Generator().manual_seed(hash(prompt) % (1 << 31))
    return torch.randn(tokenizer.get_vocab_size(), generator=gen)


def gsm8k_answer_model(tokenizer, task, n, correct):
    """AnswerModel that ends every solution with '#### <answer>', the right one where correct(i)."""
    from tasks.gsm8k import extract_answer
    end = tokenizer.encode_special("<|assistant_end|>")
    scripts = {}
    for i in range(n):
        conv = task[i]
        answer = int(extract_answer(conv["messages"][-1]["content"][-1]["text"]))
        text = f"Let me think step by step.\n#### {answer if correct(i) else answer + 1}"
        scripts[tuple(tokenizer.render_for_completion(conv))] = tokenizer.encode(text) + [end]
    return AnswerModel(scripts, tokenizer.get_vocab_size())


def tiny_tokenizer(base_dir):
    build_tiny(str(base_dir))
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


def test_categorical_oracle_scores_one_and_random_scores_chance(base_dir):
    tokenizer = tiny_tokenizer(base_dir)
    for name, n in (("ARC-Easy", 120), ("ARC-Challenge", 120)):
        task = load_task(name)
        model = oracle_model(tokenizer, [task[i] for i in range(n)])
        result = run_chat_eval(model, tokenizer, None, name, max_problems=n, batch_size=8)
        assert (result["accuracy"], result["correct"], result["total"], result["cropped"]) == (1.0, n, n, 0)
        # logit 1 on the gold letter, 0 on the others: log p(right) = log(e / (e + letters - 1)), known per question
        known = [math.log(math.e / (math.e + len(task[i]["letters"]) - 1)) for i in range(n)]
        assert result["mean_logprob"] == pytest.approx(sum(known) / n, abs=1e-6)

    # random logits over the whole vocabulary: an answer letter is almost never the overall argmax, so only
    # restricting the choice to the letters gives chance accuracy; it must equal the count made by hand
    task = load_task("MMLU")
    model = LetterModel(tokenizer, lambda prompt: random_logits(tokenizer, prompt))
    result = run_chat_eval(model, tokenizer, None, "MMLU", max_problems=400, batch_size=16)
    expected, logprob = 0, 0.0
    for i in range(400):
        conv = task[i]
        logits = random_logits(tokenizer, tuple(tokenizer.render_for_completion(conv)))
        letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
        expected += conv["letters"][int(logits[letter_ids].argmax())] == conv["messages"][-1]["content"]
        right = conv["letters"].index(conv["messages"][-1]["content"])
        logprob += torch.log_softmax(logits[letter_ids], 0)[right].item()
    assert result["correct"] == expected and result["total"] == 400
    assert abs(result["accuracy"] - 0.25) < 0.07  # 3 standard deviations of 400 fair 4-way guesses
    # the mean log-probability of the right letter among the letters, as computed by hand
    assert result["mean_logprob"] == pytest.approx(logprob / 400, abs=1e-5)


def test_padding_does_not_change_a_real_models_answers(base_dir):
    torch.set_num_threads(1)
    build_tiny(str(base_dir))
    model, tokenizer, _ = load_model(SOURCE, torch.device("cpu"), model_tag=TAG)
    task = load_task("ARC-Challenge")
    convs = [task[i] for i in range(12)]
    # the tiny model's context (128) is shorter than these prompts: cut them to different lengths so the batch pads
    prompts = [fit_prompt(tokenizer.render_for_completion(c), 128 - 7 * i) for i, c in enumerate(convs)]
    letters = [c["letters"] for c in convs]
    batched = categorical_predictions(model, tokenizer, prompts, letters)
    alone = [categorical_predictions(model, tokenizer, [p], [l])[0] for p, l in zip(prompts, letters)]
    assert [pick for pick, _ in batched] == [pick for pick, _ in alone]
    for (_, lp_batched), (_, lp_alone) in zip(batched, alone):
        assert lp_batched == pytest.approx(lp_alone, abs=1e-4)


def test_fit_prompt_keeps_bos_and_the_end():
    assert fit_prompt([1, 2, 3, 4, 5], 5) == [1, 2, 3, 4, 5]
    assert fit_prompt([1, 2, 3, 4, 5, 6, 7], 4) == [1, 5, 6, 7]


def test_generative_gsm8k_and_humaneval_grade_what_was_generated(base_dir):
    tokenizer = tiny_tokenizer(base_dir)
    gsm8k = load_task("GSM8K")
    for correct, expected in ((lambda i: True, 1.0), (lambda i: False, 0.0), (lambda i: i % 2 == 0, 0.5)):
        model = gsm8k_answer_model(tokenizer, gsm8k, 6, correct)
        result = run_chat_eval(model, tokenizer, Engine(model, tokenizer), "GSM8K", max_problems=6)
        assert result["accuracy"] == expected and result["total"] == 6

    # HumanEval: the canonical solution passes the unit tests in the sandbox, a wrong body fails them
    humaneval = load_task("HumanEval")
    end = tokenizer.encode_special("<|assistant_end|>")
    for wrong, expected in ((False, 1.0), (True, 0.0)):
        scripts = {}
        for i in range(2):
            conv = humaneval[i]
            prompt = conv["messages"][0]["content"]
            body = "    return None\n" if wrong else conv["messages"][-1]["content"][len(prompt):]
            scripts[tuple(tokenizer.render_for_completion(conv))] = tokenizer.encode(body) + [end]
        model = AnswerModel(scripts, tokenizer.get_vocab_size())
        result = run_chat_eval(model, tokenizer, Engine(model, tokenizer), "HumanEval", max_problems=2,
                               max_new_tokens=4096)
        assert result["accuracy"] == expected


def test_chatcore_matches_nanochat_d20():
    # nanochat's d20 speedrun after SFT (DESIGN.md): ChatCORE 0.088
    accuracies = {"ARC-Easy": 0.388, "ARC-Challenge": 0.281, "MMLU": 0.315, "GSM8K": 0.046, "HumanEval": 0.085}
    assert abs(chatcore(accuracies) - 0.0886) < 1e-4
    assert chatcore({k: v for k, v in accuracies.items() if k != "MMLU"}) is None


def _evaluate_on_ranks(rank, world_size, base_dir):
    """Real tiny GPT on ARC-Easy (categorical) and a half-right stand-in on GSM8K (generative)."""
    torch.set_num_threads(1)
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    model, tokenizer, _ = load_model(SOURCE, torch.device("cpu"), model_tag=TAG)
    arc = run_chat_eval(model, tokenizer, None, "ARC-Easy", max_problems=30, batch_size=4)
    stand_in = gsm8k_answer_model(tokenizer, load_task("GSM8K"), 7, lambda i: i % 3 == 0)
    gsm8k = run_chat_eval(stand_in, tokenizer, Engine(stand_in, tokenizer), "GSM8K", max_problems=7)
    return [(r["correct"], r["total"], r["accuracy"]) for r in (arc, gsm8k)]


def test_data_parallel_equals_one_process(base_dir, tmp_path):
    build_tiny(str(base_dir))
    single = _evaluate_on_ranks(0, 1, str(base_dir))
    ranks = run_distributed(_evaluate_on_ranks, 2, tmp_path, str(base_dir))
    assert ranks[0] == ranks[1] == single
    assert single[1] == (3, 7, 3 / 7)  # problems 0, 3, 6 answered right


def test_cli_writes_json_and_report(base_dir):
    torch.set_num_threads(1)
    build_tiny(str(base_dir))
    results, core = chat_eval.main(["-i", "sft", "-a", "ARC-Easy|GSM8K", "--max-problems", "6", "--max-new-tokens", "8"])
    assert core is None  # not all five tasks
    path = os.path.join(str(base_dir), "eval", "chat_sft_tiny_step0.json")
    with open(path) as f:
        saved = json.load(f)
    assert saved["tasks"].keys() == {"ARC-Easy", "GSM8K"}
    assert saved["tasks"]["ARC-Easy"]["total"] == 6 and saved["tasks"] == json.loads(json.dumps(results))
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    with open(os.path.join(str(base_dir), "report", "chat-evaluation-sft.md")) as f:
        report = f.read()
    for key in ("ARC-Easy", "GSM8K"):
        assert f"- {key}: {results[key]['accuracy']:.6g}\n" in report
