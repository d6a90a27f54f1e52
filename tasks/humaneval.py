"""HumanEval: 164 Python functions to complete from signature and docstring, scored by running their unit
tests in the sandbox (nanochat/humaneval_harness.py)."""

import re

from tasks.common import HUMANEVAL as DATASET, Task, load_records

FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion):
    """The first fenced code block if there is one (an unclosed fence runs to the end), else the raw text."""
    match = FENCE_RE.search(completion)
    return match.group(1) if match else completion


def prompt_imports(prompt):
    """The prompt's import lines: models often write just the function and drop them."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):

    eval_type = "generative"

    def __init__(self, timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        self.records = load_records(DATASET, None, "test")

    def num_examples(self):
        return len(self.records)

    def get_example(self, index):
        row = self.records[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}{row['canonical_solution']}"},
        ]
        return {"messages": messages, "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, assistant_response):
        from nanochat.humaneval_harness import check_humaneval
        prompt = conversation["messages"][0]["content"]
        problem = {"task_id": conversation["task_id"], "prompt": prompt,
                   "entry_point": conversation["entry_point"], "test": conversation["test"]}
        code = extract_code(assistant_response)
        if f"def {problem['entry_point']}" in code:
            # a whole function (what we train on): check_humaneval puts it after the prompt, which it
            # redefines; the prompt's imports go first in case the model left them out
            code = f"{prompt_imports(prompt)}\n\n{code}"
        # else the model continued the prompt with just the body, which check_humaneval appends to
        return int(check_humaneval(problem, code, timeout=self.timeout))
