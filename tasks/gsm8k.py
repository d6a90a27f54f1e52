"""GSM8K: grade-school math word problems. The reference solutions mark each calculation as
<<expression=result>>; we turn those into calculator tool calls, so the model learns to use the tool."""

import re

from tasks.common import GSM8K as DATASET, Task, load_records

ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text):
    """The number after the last "####", commas removed; None if there is none."""
    matches = ANSWER_RE.findall(text)
    return matches[-1].replace(",", "") if matches else None


class GSM8K(Task):

    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K subset must be main|socratic and split train|test, got {subset} {split}")
        self.records = load_records(DATASET, subset, split)

    def num_examples(self):
        return len(self.records)

    def get_example(self, index):
        row = self.records[index]
        parts = []
        for piece in re.split(r"(<<[^>]*>>)", row["answer"]):
            if piece.startswith("<<") and piece.endswith(">>") and "=" in piece:
                expr, result = piece[2:-2].rsplit("=", 1)
                parts.append({"type": "python", "text": expr})
                parts.append({"type": "python_output", "text": result})
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        parts = conversation["messages"][-1]["content"]
        reference = extract_answer(parts if isinstance(parts, str) else parts[-1]["text"])
        predicted = extract_answer(assistant_response)
        return int(predicted is not None and float(predicted) == float(reference))

    def reward(self, conversation, assistant_response):
        """RL reward: 1.0 for the right final answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
