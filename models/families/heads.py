"""Families whose head is not transformers' ``score`` layer (models/named_heads.py builds each form), and
the ones refused by name.

Only the Nemotron-Reward-HF form's authors' usage runs at export (its card's ``generate`` call, plain
transformers). The others' usage code cannot run inside an export: OpenRLHF's ``RewardModel`` lives in
the openrlhf package (deepspeed, flash-attn), INF-ORM's class in its model card, and ArmoRM's remote
``modeling_custom.py`` no longer imports under transformers 5.25 (``LLAMA_INPUTS_DOCSTRING`` is gone).
Their entries have no ``reference``: export's parity holds the graph to rmserve's torch reading of the
head, and that reading is held to the published code on replicas by the tests (tests/test_named_heads.py,
tests/test_mlp_and_lm_heads.py, tests/test_gating_head.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmserve.models.families import register
from rmserve.models.families.base import Conversation, ModelFamily, Recognition, Reference, ReferenceSettings
from rmserve.models.families.conversations import near_limit
from rmserve.models.families.reference import authors_tokenizer, pinned_now
from rmserve.models.heads import DECODER_TYPES

DECODERS = tuple(sorted(DECODER_TYPES))
NEMOTRON_TOKEN = 0  # the reward's row of the LM head (the card reads scores[0][0][0])


def lm_logit_usage(
    checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
) -> Reference:
    """The Llama-3.1-Nemotron-70B-Reward-HF card: ``AutoModelForCausalLM``, ``apply_chat_template(messages,
    tokenize=True)``, ``generate(max_new_tokens=1, return_dict_in_generate=True, output_scores=True)``,
    reward ``scores[0][0][0]``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = authors_tokenizer(checkpoint, settings)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def rendered(conv: Conversation) -> str:
        tools = None if conv.tools is None else [dict(t) for t in conv.tools]
        text = tokenizer.apply_chat_template([dict(m) for m in conv.messages], tools=tools, tokenize=False)
        return str(text)

    def tokenized(text: str) -> Any:  # what apply_chat_template(tokenize=True) gives: the text as rendered
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")

    with pinned_now(settings.template_date):
        convs = tuple(
            near_limit(c, lambda c: int(tokenized(rendered(c))["input_ids"].shape[1]), settings.max_length)
            for c in conversations
        )
        texts = tuple(rendered(c) for c in convs)
    inputs = [tokenized(t) for t in texts]
    scores = []
    for x in inputs:
        with torch.inference_mode():
            out = model.generate(
                x["input_ids"],
                attention_mask=x["attention_mask"],
                max_new_tokens=1,
                return_dict_in_generate=True,
                output_scores=True,
            )
        scores.append(float(out["scores"][0][0][NEMOTRON_TOKEN]))
    return Reference(
        recipe="template",
        refused={},
        conversations=convs,
        rendered=texts,
        ids=tuple(tuple(int(i) for i in x["input_ids"][0]) for x in inputs),
        scores=tuple(scores),
    )


register(
    ModelFamily(
        name="openrlhf-rm",
        title="OpenRLHF reward models (train_rm: RewardModel, value_head_prefix, mean/std)",
        recognition=Recognition(architectures=("RewardModel",), model_types=DECODERS),
        head="value_head",
        recipe="template",
        reference=None,
        source="OpenRLHF/OpenRLHF openrlhf/models/model.py (_get_reward_model), openrlhf/cli/serve_rm.py",
        flags=("--normalize", "--value-head NAME"),
        checked="replica saved by OpenRLHF's own class; /get_reward against serve_rm's RewardModelProxy, "
        "raw and normalised: ids identical, fp32 within 1e-4",
        examples=("OpenRLHF/Llama-3-8b-rm-700k", "OpenRLHF/Llama-3-8b-rm-mixture"),
    ),
    ModelFamily(
        name="inf-orm",
        title="INF-ORM (INFORMForSequenceClassification: MLP score head)",
        # Named: its class name also fits the stock "*ForSequenceClassification" entries.
        recognition=Recognition(
            architectures=("INFORMForSequenceClassification",), model_types=("llama",), names=("*INF-ORM*",)
        ),
        head="mlp_score",
        recipe="template",
        reference=None,
        source="infly/INF-ORM-Llama3.1-70B README.md (the class and its usage; allenai/reward-bench "
        "rewardbench/models/inform.py ships the class)",
        checked="replica: the card's class and orm(apply_chat_template(conv)).logits[0][0]",
        examples=("infly/INF-ORM-Llama3.1-70B",),
    ),
    ModelFamily(
        name="armorm",
        title="ArmoRM (LlamaForRewardModelWithGating: 19 objectives, gated at the prompt end)",
        recognition=Recognition(architectures=("LlamaForRewardModelWithGating",), model_types=("llama",)),
        head="gating",
        recipe="template",
        reference=None,
        source="RLHFlow/ArmoRM-Llama3-8B-v0.1 modeling_custom.py and README.md (usage)",
        flags=("--trust-remote-code",),
        checked="replica run by its modeling_custom.py: ids identical, score and the 19 rewards within 1e-4",
        examples=("RLHFlow/ArmoRM-Llama3-8B-v0.1",),
    ),
    ModelFamily(
        name="nemotron-reward-hf",
        title="Llama-3.1-Nemotron-70B-Reward-HF (the logit of token 0 of the LM head)",
        recognition=Recognition(
            architectures=("LlamaForCausalLM",), model_types=("llama",), names=("*Nemotron*Reward-HF*",)
        ),
        head="lm_logit",
        recipe="template",
        reference=lm_logit_usage,
        source="nvidia/Llama-3.1-Nemotron-70B-Reward-HF README.md (usage); discussion #7 (token 0's row)",
        flags=("--lm-logit 0",),
        checked="replica: the card's generate(max_new_tokens=1, output_scores=True)[0][0][0]",
        examples=("nvidia/Llama-3.1-Nemotron-70B-Reward-HF",),
    ),
    ModelFamily(
        name="internlm2-reward",
        title="InternLM2 reward models (InternLM2ForRewardModel)",
        recognition=Recognition(architectures=("InternLM2ForRewardModel",)),
        head="value_head",
        recipe="template",
        reference=None,
        source="internlm/internlm2-7b-reward modeling_internlm2.py (get_score)",
        status="refused",
        refusal="its remote-code body (packed wqkv) and get_score's appended reward token are not exported",
        examples=("internlm/internlm2-7b-reward", "internlm/internlm2-1_8b-reward"),
    ),
    ModelFamily(
        name="qwen2.5-math-rm",
        title="Qwen2.5-Math-RM-72B (Qwen2ForRewardModel)",
        recognition=Recognition(architectures=("Qwen2ForRewardModel",)),
        head="mlp_score",
        recipe="template",
        reference=None,
        source="Qwen/Qwen2.5-Math-RM-72B modeling_qwen2_rm.py",
        status="refused",
        refusal="its remote head (modeling_qwen2_rm.py) has not been checked, so its read position is not "
        "guessed",
        examples=("Qwen/Qwen2.5-Math-RM-72B",),
    ),
)
