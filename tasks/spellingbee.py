"""SpellingBee: "How many r are in strawberry?", answered by spelling the word out, counting, and checking
with the calculator tool ("strawberry".count("r"), which nanochat/calculator.py's use_calculator allows).

Synthetic: example i is built from a seed made of i, so every slice is reproducible. It teaches the model
which letters its tokens spell and how to call the tool; offline, where GSM8K's training split is missing,
it is the only tool-use training there is. The words are real ones, taken from the chat data.
"""

import random
import re
import string
from collections import Counter

from tasks.chat import ChatData
from tasks.common import Task
from tasks.gsm8k import extract_answer

WORD_RE = re.compile(r"\b[a-z]{3,14}\b")
QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the letter {letter} in \"{word}\".",
    "how many {letter}'s are in {word}",
    "In the word {word}, how many times does '{letter}' occur?",
]


def chat_words(split, num_conversations=2000, min_count=3):
    """Lowercase words seen at least min_count times in the first conversations of the chat data."""
    counts = Counter()
    for conv in ChatData(split, stop=num_conversations):
        for message in conv["messages"]:
            if isinstance(message["content"], str):
                counts.update(WORD_RE.findall(message["content"].lower()))
    return sorted(word for word, n in counts.items() if n >= min_count)


class SpellingBee(Task):

    eval_type = "generative"

    def __init__(self, size, split, words=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"SpellingBee split must be train|val, got {split}")
        self.size = size
        self.seed = {"train": 0, "val": 1 << 40}[split]  # disjoint example seeds
        self.words = words if words is not None else chat_words(split)
        if not self.words:
            raise ValueError("SpellingBee has no words to spell: the chat data is empty")

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(self.seed + index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that 0 is an answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        tally, n = [], 0
        for c in word:
            n += c == letter
            tally.append(f"{c}({n})" if c == letter else c)
        spelled = (f"Spelling out {word} and counting each {letter}: {' '.join(tally)}. That makes {count}."
                   if count else f"Spelling out {word}: {' '.join(word)}. There is no {letter} in it, so 0.")
        parts = [
            {"type": "text", "text": f"{spelled}\n\nLet me check with Python: "},
            {"type": "python", "text": f'"{word}".count("{letter}")'},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nSo the answer is {count}.\n\n#### {count}"},
        ]
        question = rng.choice(QUESTIONS).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, assistant_response):
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(extract_answer(assistant_response) == reference)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
