"""TRL's GRPOTrainer optimizes a small policy on CPU against a live rmserve.

    rmserve serve --port 8000 &                 # serves the default (HH-RLHF) reward model
    python examples/grpo_remote_reward.py --url http://127.0.0.1:8000 --steps 40

The policy is a tiny Llama built from a config (random init, nothing downloaded) with a word-level
tokenizer over a small vocabulary: polite, helpful words and rude, dismissive ones. A reward model
trained on human preferences scores the first far above the second, so the policy can find out
within a few dozen steps which words pay; the mean reward rises. The only line that involves
rmserve is ``reward_funcs=[trl_reward_func(url)]``. The script saves the reward curve as a PNG and
prints the first and last steps' mean reward.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

# Words the policy may say. The reward model never sees this split; it has to be learned from scores.
HELPFUL = (
    "sure happy to help here is how glad you asked great question thank you please let me "
    "explain step by step of course certainly gladly kind safe careful useful honest"
)
RUDE = (
    "no stupid go away idiot shut up whatever hate dumb boring never ugh leave alone figure it out "
    "yourself not my problem lazy useless"
)
FILLER = "the a and it so well maybe really"
PROMPTS = [
    "Can you help me fix my bike?",
    "How do I bake bread at home?",
    "What is a good way to learn chess?",
    "Could you explain how rain forms?",
    "I need advice on writing a poem.",
    "How should I travel safely at night?",
    "Can you summarize the history of Rome?",
    "Why is the sky blue?",
]
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over the prompts' and completions' words (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: list[str] = []
    for text in [HELPFUL, RUDE, FILLER, *PROMPTS]:
        for w in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            if w[0] not in words:
                words.append(w[0])
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_policy(tokenizer: Any, seed: int = 0) -> Any:
    """A tiny random-init Llama: two layers, 64 wide. Small enough for CPU, big enough to learn."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompt_dataset(n: int) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]})


def grpo_config(
    output_dir: str | Path,
    *,
    steps: int,
    batch: int,
    generations: int,
    completion_len: int,
    learning_rate: float,
    seed: int = 0,
    **extra: Any,
) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        num_generations=generations,
        max_completion_length=completion_len,
        learning_rate=learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=seed,
        temperature=1.0,
        disable_tqdm=True,
        **extra,
    )


def reward_curve(log_history: list[dict[str, Any]]) -> list[float]:
    return [float(h["reward"]) for h in log_history if "reward" in h and not math.isnan(h["reward"])]


def save_plot(curve: list[float], path: Path, url: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, marker=".", label="mean reward per step")
    if len(curve) >= 5:
        k = 5
        smooth = [
            sum(curve[max(0, i - k + 1) : i + 1]) / len(curve[max(0, i - k + 1) : i + 1])
            for i in range(len(curve))
        ]
        ax.plot(range(1, len(curve) + 1), smooth, label=f"moving mean ({k})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("rmserve reward")
    ax.set_title(f"GRPO against {url}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="rmserve base URL")
    parser.add_argument("--model", default=None, help="bundle name on the server (default: its default)")
    parser.add_argument("--api-key", default=None, help="API key, if the server wants one")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="completions per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--completion-len", type=int, default=8, help="tokens per completion")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/grpo_remote_reward"), help="output directory")
    args = parser.parse_args(argv)

    import torch
    from trl import GRPOTrainer

    from rmserve.adapters.trl import trl_reward_func
    from rmserve.client import RewardClient

    torch.set_num_threads(2)
    with RewardClient(args.url, api_key=args.api_key) as client:
        health = client.wait_until_ready(timeout_s=120)
        served = [m.get("name") for m in client.models()]
        print(f"rmserve at {client.base_url}: {health.status}, serving {served}")

    tokenizer = build_tokenizer()
    trainer = GRPOTrainer(
        model=build_policy(tokenizer, args.seed),
        processing_class=tokenizer,
        reward_funcs=[trl_reward_func(args.url, model=args.model, api_key=args.api_key)],
        args=grpo_config(
            args.out,
            steps=args.steps,
            batch=args.batch,
            generations=args.generations,
            completion_len=args.completion_len,
            learning_rate=args.lr,
            seed=args.seed,
        ),
        # Each prompt is sampled ``generations`` times per step: steps * batch / generations prompts in all.
        train_dataset=prompt_dataset(args.steps * args.batch // args.generations),
    )
    started = time.monotonic()
    trainer.train()
    curve = reward_curve(trainer.state.log_history)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "reward_curve.png"
    save_plot(curve, png, args.url)
    k = max(1, min(5, len(curve) // 4))
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    print(f"{len(curve)} steps in {time.monotonic() - started:.0f} s; reward curve: {png}")
    print(
        f"mean reward, first {k} steps: {first:.4f}  last {k} steps: {last:.4f}  (change {last - first:+.4f})"
    )
    samples = list(trainer._logs["completion"])[:4]
    print("last completions:", *[repr(s) for s in samples], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
