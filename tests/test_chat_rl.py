"""chat_rl: the policy gradient is the one written down, rollouts mark what the policy chose, RL really raises a
learnable reward on a tiny model, and the GSM8K run (offline: trains on test[first half], evaluates on the
second half) is honest end to end under DiLoCo on 2 processes."""

import json
import os

import torch

from diloco import make_sync, make_worker_groups
from nanochat.checkpoint import checkpoint_dir, load_checkpoint, load_model
from nanochat.engine import Engine
from nanochat.train_loop import scale_initial_lrs
from scripts import chat_eval, chat_rl
from scripts.flags import sync_config
from tests.helpers_pipeline import torchrun
from tests.helpers_tiny import ANIMALS, PLACES, SOURCE, TAG, ScriptedModel, build_tiny


class PlaceTask:
    """Toy RL task on the tiny chat model, which learned that an animal lives in one of six random places:
    reward 1 when the reply puts the animal in `place`."""

    eval_type = "generative"

    def __init__(self, animals, place):
        self.animals, self.place = animals, place

    def __len__(self):
        return len(self.animals)

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"tell me about the {self.animals[i]}"},
                             {"role": "assistant", "content": f"The {self.animals[i]} lives in the {self.place}."}]}

    def evaluate(self, conversation, text):
        return int(f"lives in the {self.place}" in text)

    def reward(self, conversation, text):
        return float(self.evaluate(conversation, text))


def tiny(base_dir):
    torch.set_num_threads(1)
    build_tiny(str(base_dir))
    return load_model(SOURCE, torch.device("cpu"), phase="train", model_tag=TAG)


def test_policy_gradient_is_advantage_weighted_log_prob_of_sampled_tokens(base_dir):
    model, tokenizer, _ = tiny(base_dir)
    gen = torch.Generator().manual_seed(0)
    sequences = []
    for n, adv in ((9, 0.75), (14, -0.25), (6, -0.5)):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (n,), generator=gen).tolist()
        mask = [0] * 3 + [1] * (n - 3)
        mask[5] = 0  # a token forced by the tool: not the policy's action
        sequences.append((ids, mask, adv))
    loss = chat_rl.policy_gradient_backward(model, sequences, device_batch_size=2)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    # by hand, one sequence at a time: mean over the sampled tokens of -advantage * log p(token)
    num_tokens = sum(sum(mask[1:]) for _, mask, _ in sequences)
    expected = 0.0
    for ids, mask, adv in sequences:
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        picked = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        expected = expected - adv * (picked * torch.tensor(mask[1:], dtype=torch.float32)).sum() / num_tokens
    expected.backward()
    assert abs(loss - expected.item()) < 1e-6
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # fp32 summation order: ~1e-7 apart


def test_rollout_keeps_the_stop_token_and_masks_tool_output(base_dir):
    build_tiny(str(base_dir))
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    special = tokenizer.encode_special
    calc = [special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    # the stand-in emits its script by position; while the tool's tokens are forced its own choices are dropped
    script = calc + [0] * len(forced) + tokenizer.encode(" so 42") + [special("<|assistant_end|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size(), sequence_len=256)
    conv = {"messages": [{"role": "user", "content": "what is 6 times 7?"}]}
    prompt, completions, masks = chat_rl.rollout(Engine(model, tokenizer), tokenizer, conv, 2, 64, 0.0, None, seed=0)
    expected = calc + forced + tokenizer.encode(" so 42") + [special("<|assistant_end|>")]
    assert prompt == tokenizer.render_for_completion(conv)
    assert completions == [expected, expected]
    assert masks[0] == [1] * len(calc) + [0] * len(forced) + [1] * (len(expected) - len(calc) - len(forced))


def test_rl_raises_a_learnable_reward(base_dir):
    model, tokenizer, _ = tiny(base_dir)
    args = chat_rl.parse_args(["--num-steps", "30", "--examples-per-step", "4", "--num-samples", "8",
                               "--max-new-tokens", "20", "--eval-every", "0", "--init-lr-frac", "0.2", "--seed", "0"])
    groups = make_worker_groups(sync_config(args))
    optimizers = model.setup_optimizers(process_group=groups.inner)
    scale_initial_lrs(optimizers, args.init_lr_frac)
    sync = make_sync(sync_config(args), model, optimizers, groups)
    # "desert" is one of six places the model picks about equally; greedy decoding says "forest" for every animal
    history, finished = chat_rl.train_rl(model, tokenizer, optimizers, sync, PlaceTask(ANIMALS[:6], "desert"),
                               PlaceTask(ANIMALS[6:], "desert"), "place", args)
    rewards = [h["reward"] for h in history if "reward" in h]
    evals = [h["pass@1"] for h in history if "pass@1" in h]
    assert finished and len(rewards) == 30 and len(PLACES) == 6
    assert sum(rewards[:3]) / 3 < 0.25
    assert sum(rewards[-10:]) / 10 > 0.7
    assert evals == [0.0, 1.0]  # greedy replies about the two held-out animals now say desert too


def test_rl_stopped_and_resumed_equals_uninterrupted(base_dir, monkeypatch):
    """chat_rl.main with DiLoCo (H = 3, one worker in process; evals at 2 and 4 are mid-round), stopped after
    step 5 (mid-round, with a step's rewards in the window) and resumed, ends with the weights and records of
    the run that never stopped: the checkpoint holds the optimizers, the sync state, the step, the reward
    window and the history; rollouts are seeded by slot. --output-tag puts it in a folder of its own."""
    tiny(base_dir)
    monkeypatch.setattr(chat_rl, "gsm8k_split",
                        lambda: (PlaceTask(ANIMALS[:6], "desert"), PlaceTask(ANIMALS[6:], "desert"), "place", None))
    argv = ["--num-steps", "6", "--examples-per-step", "2", "--num-samples", "6", "--max-new-tokens", "12",
            "--eval-every", "2", "--eval-examples", "2", "--init-lr-frac", "0.2", "--seed", "0",
            "--sync", "diloco", "--diloco-h", "3"]
    ckpt = checkpoint_dir("rl", TAG)
    timings = ("dt", "opt_seconds", "outer_wait_seconds")

    def finished_run(ckpt):
        state, _, _, _ = load_checkpoint(ckpt, 6, "cpu")
        with open(os.path.join(ckpt, "metrics.jsonl")) as f:
            return state, [{k: v for k, v in json.loads(line).items() if k not in timings} for line in f]

    chat_rl.main(argv)
    whole_state, whole = finished_run(ckpt)
    parted = argv + ["--output-tag", "parts"]  # the interrupted run goes to its own folder, beside the whole one
    chat_rl.main(parted + ["--stop-after", "5"])
    chat_rl.main(parted + ["--resume"])
    parts_state, parts = finished_run(checkpoint_dir("rl", "parts"))
    assert [r["step"] for r in whole if "reward" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in whole if "pass@1" in r] == [0, 2, 4, 6]
    assert sum(r["informative"] for r in whole if "reward" in r) > 0  # real gradients moved the weights
    assert parts == whole
    source, _, _ = load_model(SOURCE, torch.device("cpu"), model_tag=TAG)
    assert any(not torch.equal(whole_state[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(whole_state[k], parts_state[k]) for k in whole_state)


def test_gsm8k_run_offline_under_diloco_is_labelled_and_never_scored_on_its_training_half(base_dir):
    model, _, _ = tiny(base_dir)
    out = torchrun("scripts.chat_rl", ["--num-steps", "3", "--examples-per-step", "2", "--num-samples", "2",
                                       "--max-new-tokens", "12", "--eval-every", "2", "--eval-examples", "4",
                                       "--sync", "diloco", "--diloco-h", "2"])
    assert "RL TRAINS ON GSM8K TEST[:659] (the first half)" in out
    ckpt = checkpoint_dir("rl", TAG)
    state, _, meta, _ = load_checkpoint(ckpt, 3, "cpu")
    assert meta["trained_on_test"] == {"GSM8K": {"stop": 659, "label": "GSM8K test[second half]"}}
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "pass@1" in r] == [0, 2, 3]
    assert [r["step"] for r in records if "reward" in r] == [1, 2, 3]
    # the tiny model solves nothing: no advantage, no gradient, and the weights come back unchanged
    assert all(r["reward"] == 0 and r["informative"] == 0 for r in records if "reward" in r)
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    with open(os.path.join(str(base_dir), "report", "chat-rl.md")) as f:
        report = f.read()
    assert "- GSM8K test[second half] pass@1 at end: 0\n" in report and "the policy gradient vanished" in report
    assert "- GSM8K:" not in report

    # chat_eval on this checkpoint scores GSM8K on the held-out half only, under that label
    results, _ = chat_eval.main(["-i", "rl", "-a", "GSM8K", "--max-problems", "3", "--max-new-tokens", "8"])
    assert list(results) == ["GSM8K test[second half]"] and results["GSM8K test[second half]"]["total"] == 3
