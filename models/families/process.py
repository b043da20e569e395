"""Process reward model families: one entry per published model, how rmserve exports it, and the ones it
refuses.

A process model is exported with ``--step-token`` and the flags its entry lists (docs/process.md's model
table is written from these entries); export checks a checkpoint against the refused entries by name,
since an implicit PRM's checkpoint is a plain causal LM that config.json alone cannot tell apart.
These entries are kept apart from the outcome registry (``FAMILY_MODULES``): outcome export identifies
a checkpoint's family from config.json, and a token-classification or causal-LM PRM must not be taken
for an outcome family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rmserve.models.families.base import Recognition

Status = Literal["supported", "refused"]


@dataclass(frozen=True)
class ProcessFamily:
    """One published PRM: how it is recognised, the export flags that reproduce its authors' scoring,
    where that scoring is published, and what the tests check (or, refused, what rmserve cannot do)."""

    name: str
    title: str
    recognition: Recognition
    layout: str
    flags: str
    source: str
    checked: str
    status: Status = "supported"
    refusal: str | None = None


PROCESS_FAMILIES: tuple[ProcessFamily, ...] = (
    ProcessFamily(
        name="qwen2.5-math-prm",
        title="Qwen2.5-Math-PRM-7B/72B, Qwen2.5-Math-7B-PRM800K, ReasonFlux-PRM-7B",
        recognition=Recognition(architectures=("Qwen2ForProcessRewardModel",)),
        layout="joint",
        flags='--step-token "<extra_0>"',
        source="Qwen/Qwen2.5-Math-PRM-7B model card (make_step_rewards)",
        checked="tiny checkpoint in the score.0/score.2 layout: the head against its definition, within 1e-4",
    ),
    ProcessFamily(
        name="trl-prm",
        title="TRL PRMTrainer checkpoints (*ForTokenClassification, 2 labels)",
        recognition=Recognition(architectures=("*ForTokenClassification",)),
        layout="separate",
        flags='--step-token "\\n" --step-layout separate',
        source="huggingface/trl trl/experimental/prm/prm_trainer.py (tokenize_row, TRL <= 1.13.0)",
        checked="replica trained here by TRL 1.13.0's PRMTrainer: tokenize_row's ids, p(+) within 1e-4",
    ),
    ProcessFamily(
        name="pure-prm",
        title="PURE-PRM-7B (jinachris/PURE-PRM-7B)",
        recognition=Recognition(architectures=("Qwen2ForTokenClassification",), names=("*PURE-PRM*",)),
        layout="separate",
        flags='--step-token "\\n" --step-layout separate --step-rule prob_diff',
        source="jinachris/PURE-PRM-7B card; CJReinforce/PURE openrlhf/trainer/ppo_utils/experience_maker.py",
        checked="the TRL replica read as p(+) - p(-) within 1e-4; ProcessBench threshold 0",
    ),
    ProcessFamily(
        name="math-shepherd",
        title="Math-Shepherd (peiyi9979/math-shepherd-mistral-7b-prm)",
        recognition=Recognition(architectures=("MistralForCausalLM",), names=("*math-shepherd*",)),
        layout="joint",
        flags='--step-token "ки" --label-tokens + - --input-format plain --bos-tokens 1 '
        '--before-step-token " " --between-steps "\\n"',
        source="peiyi9979/math-shepherd-mistral-7b-prm model card",
        checked="Mistral replica (SentencePiece-style tokenizer): the card's snippet within 1e-4, one BOS",
    ),
    ProcessFamily(
        name="rlhflow-prm",
        title="RLHFlow Llama3.1-8B-PRM (-Deepseek-Data, -Mistral-Data)",
        recognition=Recognition(architectures=("LlamaForCausalLM",), names=("*RLHFlow*PRM*",)),
        layout="turns",
        flags='--step-token + --label-tokens + - --step-layout turns --prompt-suffix " "',
        source="RLHFlow/RLHF-Reward-Modeling math-rm/prm_evaluate.py",
        checked="Llama-3 replica: prm_evaluate.py's pass per step against one served pass, within 1e-4",
    ),
    ProcessFamily(
        name="skywork-o1-prm",
        title="Skywork-o1-Open-PRM (Qwen-2.5-1.5B/7B)",
        recognition=Recognition(architectures=("Qwen2ForPrmModel",)),
        layout="separate",
        flags='--step-token "\\n" --step-layout separate --prompt-suffix "\\n"',
        source="SkyworkAI/skywork-o1-prm-inference model_utils/io_utils.py, prm_model.py",
        checked="replica in its checkpoint layout, scored by its published code (verbatim): within 1e-4",
    ),
    ProcessFamily(
        name="eurus-prm",
        title="EurusPRM and other implicit PRMs (PRIME-RL/EurusPRM-Stage1/2)",
        recognition=Recognition(names=("*EurusPRM*",)),
        layout="-",
        flags="-",
        source="PRIME-RL/PRIME README (implicit PRM: beta * log-ratio to a reference model)",
        checked="export refuses it by name",
        status="refused",
        refusal="an implicit PRM's step reward is beta times the summed log-ratio of two causal LMs (the PRM "
        "and its reference model); rmserve exports one body per bundle and does not compute it",
    ),
)


def refused_process_family(names: list[str]) -> ProcessFamily | None:
    """The refused process family whose name patterns ``names`` (the checkpoint's hub name and path
    directories) match, if any."""
    return next(
        (f for f in PROCESS_FAMILIES if f.status == "refused" and f.recognition.named(names)),
        None,
    )
