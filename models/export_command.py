"""``rmserve export``, the command: flags -> ``rmserve.models.export.export_bundle``.

Torch is imported only to run, so ``rmserve export --help`` works without the export extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from rmserve.bundle import InputFormat, StepLayout, StepRule
from rmserve.cli import DefaultsHelpFormatter
from rmserve.models.data import HH_DEV_ENV, hh_dev_path


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a Hugging Face checkpoint directory (num_labels=1; with --step-token, a process reward model)",
    )
    parser.add_argument("bundle", type=Path, help="where to write the bundle (must be absent or empty)")
    parser.add_argument("--name", help="bundle name (default: the checkpoint directory's name)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="token limit (default: the model's trained context, max_position_embeddings or the "
        "tokenizer's model_max_length where smaller)",
    )
    parser.add_argument(
        "--input-format",
        choices=get_args(InputFormat),
        help="default: text_pair for encoders, chat_template for decoders",
    )
    parser.add_argument("--optimize", action="store_true", help="ORT fusions, kept only if parity holds")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="fp32 (exact; CPU and GPU), fp16 (GPU; every layer fp16 where the measured headroom allows), "
        "bf16 (GPU with bf16 units, compute capability 8.0+; lean graphs)",
    )
    parser.add_argument(
        "--graph",
        choices=["auto", "lean", "traced"],
        default="auto",
        help="auto: the lean graph (right padding, no mask) for Llama/Qwen2/Qwen3/Mistral decoders, else "
        "the traced one; lean: fail where it does not apply; traced: torch.onnx's graph",
    )
    parser.add_argument(
        "--no-past-graph",
        dest="past_graph",
        action="store_false",
        help="write no prefix-reuse graph beside a lean one (smaller bundle; every item is scored whole: "
        "docs/prefix-reuse.md)",
    )
    parser.add_argument(
        "--opset", type=int, help="ONNX opset (default: 23 for fused decoder attention, else 18)"
    )
    parser.add_argument(
        "--no-fuse-attention",
        dest="fuse_attention",
        action="store_false",
        help="keep a decoder's attention unfused (MatMul/Softmax/MatMul), not one Attention op per layer",
    )
    parser.add_argument(
        "--calibration",
        help="JSONL of {prompt, response} calibration pairs, or 'builtin' (default: the HH-RLHF dev "
        f"pairs at {hh_dev_path()} when present, else 'builtin'; ${HH_DEV_ENV} moves it)",
    )
    parser.add_argument(
        "--base-model",
        help="the model this checkpoint was fine-tuned from (default: the name its config.json "
        "records, else the checkpoint directory's name)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    heads = parser.add_argument_group("heads other than a score layer (docs/models.md)")
    heads.add_argument(
        "--value-head",
        metavar="NAME",
        help="score with the one-output linear layer saved as NAME (v_head, value_head, regression_layer) "
        "on the decoder body, at the last token (default: the head the family has; OpenRLHF's RewardModel: "
        "config.json's value_head_prefix)",
    )
    heads.add_argument(
        "--lm-logit",
        type=int,
        metavar="TOKEN_ID",
        help="score a causal LM by the logit of TOKEN_ID at the next position (Llama-3.1-Nemotron-70B-"
        "Reward-HF: 0); only that row of the LM head is kept (default: none, a head other than the LM's)",
    )
    heads.add_argument(
        "--normalize",
        action="store_true",
        help="serve (reward - mean) / std with config.json's mean and std, as OpenRLHF's "
        "--reward.normalize_enable does (default: the raw reward)",
    )
    family = parser.add_argument_group("model families and their authors' usage (docs/models.md)")
    family.add_argument(
        "--family",
        help="the model family (docs/models.md); default: the one config.json and the checkpoint's name "
        "identify",
    )
    family.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the modeling code a checkpoint ships (auto_map); refused without this flag",
    )
    family.add_argument(
        "--bos-tokens",
        type=int,
        choices=[0, 1, 2],
        help="start every item with exactly this many BOS tokens (default: as the authors' usage does; a "
        "process model: as its template writes, or under --step-layout separate 1 where the tokenizer has "
        "one)",
    )
    family.add_argument(
        "--template-date",
        help="the date (YYYY-MM-DD) a chat template's strftime_now renders (default: the export's day)",
    )
    steps = parser.add_argument_group("process reward models (a reward per step: docs/process.md)")
    steps.add_argument(
        "--step-token",
        help='export a process reward model whose steps each end with this token (e.g. "<extra_0>"); '
        "it must be one token of the tokenizer (default: none, an outcome model)",
    )
    steps.add_argument(
        "--step-rule",
        choices=get_args(StepRule),
        help="how a step's reward comes from the head (default: positive_prob for 2 labels or an LM head, "
        "sigmoid for 1 label)",
    )
    steps.add_argument(
        "--label-tokens",
        nargs=2,
        metavar=("POSITIVE", "NEGATIVE"),
        default=("+", "-"),
        help="a causal LM read at two tokens: the positive and negative one",
    )
    steps.add_argument(
        "--step-layout",
        choices=get_args(StepLayout),
        default="joint",
        help="how steps become token ids: joint (one text, the step token after each step), separate "
        "(prompt and each step tokenized on their own, --step-token's ids after each step: TRL's "
        "PRMTrainer, PURE, Skywork-o1) or turns (each step a user turn answered by --step-token, the "
        "positive label: RLHFlow)",
    )
    steps.add_argument(
        "--prompt-suffix",
        default="",
        help="text after the prompt, before the first step (separate: in the prompt's text, as Skywork-o1 "
        "writes a newline there; turns: in the first user turn, as RLHFlow writes a space)",
    )
    steps.add_argument(
        "--before-step-token",
        default="",
        help="joint layout: text a steps item writes between each step and its step token "
        '(Math-Shepherd: " ")',
    )
    steps.add_argument(
        "--between-steps",
        default="",
        help="joint layout: text a steps item writes between one step's token and the next step "
        "(Math-Shepherd: a newline)",
    )


def run_export(args: argparse.Namespace) -> int:
    from rmserve.models.export import ExportError, export_bundle
    from rmserve.models.named_heads import HeadRequest
    from rmserve.models.process_heads import StepExport

    if args.step_token is None and args.step_rule is not None:
        print("export failed: --step-rule applies to process reward models; give --step-token too")
        return 2
    step = None
    if args.step_token is not None:
        labels = (args.label_tokens[0], args.label_tokens[1])
        step = StepExport(
            args.step_token,
            args.step_rule,
            labels,
            args.step_layout,
            args.prompt_suffix,
            args.before_step_token,
            args.between_steps,
        )
    try:
        manifest = export_bundle(
            args.checkpoint,
            args.bundle,
            name=args.name,
            max_length=args.max_length,
            input_format=args.input_format,
            optimize=args.optimize,
            precision=args.precision,
            opset=args.opset,
            fuse_attention=args.fuse_attention,
            graph=args.graph,
            past_graph=args.past_graph,
            calibration_pairs=args.calibration,
            base_model=args.base_model,
            overwrite=args.force,
            step=step,
            head=HeadRequest(args.value_head, args.lm_logit, args.normalize),
            family=args.family,
            trust_remote_code=args.trust_remote_code,
            bos_tokens=args.bos_tokens,
            template_date=args.template_date,
        )
    except ExportError as exc:
        print(f"export failed: {exc}")
        return 1
    p = manifest.parity
    why = f" ({manifest.attention_reason})" if manifest.attention_reason else ""
    traced = f" ({manifest.graph_reason})" if manifest.graph_reason else ""
    process = manifest.process
    kind = (
        f", {manifest.kind}: step token {process.step_token!r}, rule {process.rule}"
        + (f", layout {process.layout}" if process.layout != "joint" else "")
        if process
        else ""
    )
    ref = p.get("reference")
    if ref:
        kind += (
            f"; family {ref['name']}: token ids {ref['token_ids']}, "
            f"max|served-reference|={ref['max_diff']:.3g}"
            f" on {len(ref['conversations'])} conversations ({ref['recipe']}, BOS: {ref['bos_decided_by']})"
        )
    print(
        f"exported {manifest.name} version {manifest.version} to {args.bundle}: "
        f"max|onnx-torch|={p['max_abs_diff']:.3g}, batch invariance {p['batch_invariance_max']:.3g}, "
        f"attention {manifest.attention}{why}, graph {manifest.graph}{traced}, padding {manifest.padding}"
        f"{kind}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve export",
        description="Export a Hugging Face reward model to a verified bundle.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_export_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_export(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
