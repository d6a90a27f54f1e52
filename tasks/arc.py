"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices. Easy and Challenge sets."""

from tasks.common import ARC as DATASET, MultipleChoiceTask, load_records, render_mc


class ARC(MultipleChoiceTask):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError(f"ARC subset must be ARC-Easy|ARC-Challenge and split train|validation|test, got {subset} {split}")
        self.records = load_records(DATASET, subset, split)

    def num_examples(self):
        return len(self.records)

    def get_example(self, index):
        row = self.records[index]
        letters = list(row["choices"]["label"])  # usually A-D; a few Hub records use 1-4
        assert row["answerKey"] in letters, f"ARC {row['id']}: answer {row['answerKey']} not in {letters}"
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": row["answerKey"]},
        ]
        return {"messages": messages, "letters": letters}
