"""Policy chat markup read back into messages; the tool role rendered; queue room waited for."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from rmserve.bundle import load_bundle
from rmserve.engines.base import TokenBatch
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.errors import InvalidItem
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message, TextItem, as_pair, render_hh
from rmserve.markup import detect, prompt_messages, reread, reread_pair, split

CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "What is 2+2?"),
    Message("assistant", "It is 4."),
)

# The same conversation as each policy family's chat template renders it, end markers and padding
# included as OpenRLHF's query carries them (decoded with skip_special_tokens=False).
RENDERED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n<|endoftext|><|endoftext|>"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
    ),
    "gemma": (
        "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 4.<end_of_turn>\n<eos>"
    ),
    "hh": "\n\nSystem: Be brief.\n\nHuman: What is 2+2?\n\nAssistant: It is 4.</s>",
}


@pytest.mark.parametrize("markup", sorted(RENDERED))
def test_each_policy_markup_is_recognised_and_split_into_its_messages(markup: str) -> None:
    text = RENDERED[markup]
    assert detect(text) == markup
    assert split(text, markup) == CONVERSATION  # type: ignore[arg-type]


def test_mistral_inst_turns_split_into_user_and_assistant_messages() -> None:
    text = "<s>[INST] What is 2+2? [/INST] It is 4.</s>[INST] And 3+3? [/INST] It is 6.</s>"
    assert detect(text) == "mistral"
    assert split(text, "mistral") == (
        Message("user", "What is 2+2?"),
        Message("assistant", "It is 4."),
        Message("user", "And 3+3?"),
        Message("assistant", "It is 6."),
    )


def test_text_in_the_bundles_own_markup_is_scored_as_given_and_other_markup_from_its_messages() -> None:
    chatml = RENDERED["chatml"]
    assert reread(chatml, "chatml").outcome == "as_is"
    assert reread(chatml, "chatml").item == TextItem(chatml)
    other = reread(chatml, "llama3")
    assert other.outcome == "retemplated" and other.item == ChatItem(CONVERSATION)
    assert reread(chatml, None).outcome == "retemplated"  # a bundle template of no known family
    assert reread(chatml, "llama3", enabled=False).outcome == "as_is"


def test_text_without_markup_or_without_a_reply_is_reported_unrecognised() -> None:
    assert reread("just some words", "llama3").outcome == "unrecognised"
    prompt_only = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert reread(prompt_only, "llama3").outcome == "unrecognised"
    assert reread(prompt_only, "llama3").item == TextItem(prompt_only)


def test_a_rendered_prompt_loses_its_open_generation_turn_and_gains_the_reply() -> None:
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_messages(prompt, "chatml") == (Message("user", "What is 2+2?"),)
    reading = reread_pair(prompt, "It is 4.", "llama3")
    assert reading is not None and reading.outcome == "retemplated"
    assert reading.item == ChatItem((Message("user", "What is 2+2?"), Message("assistant", "It is 4.")))
    assert reread_pair("What is 2+2?", "It is 4.", "llama3") is None  # plain words: the user's prompt


def test_tool_messages_render_as_their_own_hh_turn() -> None:
    messages = (
        Message("user", "Add 1 and 2."),
        Message("assistant", '{"name": "add", "arguments": {"a": 1, "b": 2}}'),
        Message("tool", "3"),
        Message("assistant", "It is 3."),
    )
    assert render_hh(messages[:3]) == (
        '\n\nHuman: Add 1 and 2.\n\nAssistant: {"name": "add", "arguments": {"a": 1, "b": 2}}\n\nTool: 3'
    )
    pair = as_pair(ChatItem(messages))
    assert pair is not None and pair[1] == "It is 3." and pair[0].endswith("\n\nTool: 3\n\nAssistant:")


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def test_a_template_without_a_tool_role_renders_tool_results_as_user_turns(
    tiny_bundles: dict[str, Path],
) -> None:
    bundle = load_bundle(tiny_bundles["llama"])
    fmt = bundle.manifest.format.model_copy(update={"chat_template": STRICT_TEMPLATE})
    formatter = Formatter(type(bundle)(bundle.path, bundle.manifest.model_copy(update={"format": fmt})))
    with_tool = ChatItem((Message("user", "Add."), Message("tool", "3"), Message("assistant", "3.")))
    as_user = ChatItem((Message("user", "Add."), Message("user", "3"), Message("assistant", "3.")))
    assert formatter.encode([with_tool])[0].ids == formatter.encode([as_user])[0].ids
    with pytest.raises(InvalidItem, match="unknown role critic"):
        formatter.encode([ChatItem((Message("critic", "x"), Message("assistant", "y")))])


class GatedEngine:
    """The real ONNX Runtime engine, holding each forward pass until the test opens the gate."""

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self.gate = threading.Event()

    def infer(self, batch: TokenBatch) -> np.ndarray:
        self.gate.wait(60)
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()
