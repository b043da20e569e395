"""Trains the TRL PRM replica in ``checkpoint/`` with TRL's own ``PRMTrainer`` and records
``tokenize_row.json``: TRL's tokenization of the eval solutions, the reference the tests compare with.

TRL removed ``PRMTrainer`` after 1.13.0 (huggingface/trl pull request 7133, "Remove the experimental PRM
trainer"); the rest of rmserve runs TRL 1.16, so this script runs once, under TRL 1.13.0, and its output
is committed (a tiny random-init Qwen2 token classifier trained for a few steps, about 150 kB):

    pip download trl==1.13.0 --no-deps -d /tmp/trl && unzip -q /tmp/trl/trl-1.13.0-*.whl -d /tmp/trl/site
    PYTHONPATH=/tmp/trl/site:. python tests/replicas/trl_prm/train.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import Qwen2ForTokenClassification
from trl.experimental.prm import PRMConfig, PRMTrainer

from tests.support.prm_replicas import qwen2_tokenizer, tiny_config

HERE = Path(__file__).resolve().parent

TRAIN = [
    {
        "prompt": f"What is {a} times {b}, minus {a}?",
        "completions": [f"{a} * {b} = {a * b}.", f"{a * b} - {a} = {a * b - a + (a % 2)}.", "Done!"],
        "labels": [True, a % 2 == 0, a % 2 == 0],
    }
    for a in range(2, 14)
    for b in (3, 7)
]
EVAL = [
    {
        "prompt": "Which number is larger, 9.8 or 9.11?",
        "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
    },
    {"prompt": "What is 3 + 5?", "completions": ["We add 3 and 5 to get 8.", "So the answer is 8!", "Yes."]},
    {"prompt": "Compute 7 * 12.", "completions": ["Then 7 * 12 = 84.\n", "Is 84 less than 90? Yes."]},
]


def main() -> None:
    assert trl.__version__ == "1.13.0", f"run under TRL 1.13.0 (PRMTrainer), not {trl.__version__}"
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer()
    model = Qwen2ForTokenClassification(tiny_config("qwen2", tokenizer, num_labels=2))
    with tempfile.TemporaryDirectory() as scratch:
        args = PRMConfig(
            output_dir=scratch,
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            step_separator="\n",
        )
        trainer = PRMTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(TRAIN)
        )
        trainer.train()
        out = HERE / "checkpoint"
        trainer.save_model(str(out))
        tokenizer.save_pretrained(out)
    rows = []
    for row in EVAL:
        features = {**row, "labels": [True] * len(row["completions"])}
        tokenized = PRMTrainer.tokenize_row(features, tokenizer, "\n", None, None, False, True)
        rows.append({**row, "input_ids": tokenized["input_ids"], "labels": tokenized["labels"]})
    (HERE / "tokenize_row.json").write_text(
        json.dumps({"trl": trl.__version__, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
