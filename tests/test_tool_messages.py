"""Tool-calling trajectories (assistant tool calls, tool results, null and parts content) rendered by the
reward model's own chat template, from the API's edge, the client, and the TRL and veRL adapters."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.bundle import load_bundle
from rmserve.cache.keys import item_key
from rmserve.chat import ChatTemplate, Rendering
from rmserve.errors import ItemTooLong
from rmserve.formatting import Formatter, shorter_conversations
from rmserve.items import ChatItem, Message, ToolCall, as_messages
from rmserve.markup import reread, split
from tests.support.server import ServerProcess, serve
from tests.support.tiny import CHAT_TEMPLATE, tiny_checkpoint

# A small Qwen-style template of our own that renders tool calls (Hermes JSON in a <call> block, the
# arguments as given: a string as it is, an object through tojson, as Qwen3's template does) and tool
# turns. Short markers: the tiny tokenizer spends many tokens on unfamiliar text.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'assistant' %}<a>{% if m.content is string %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function %}"
    '<call>{"name": "{{ f.name }}", "arguments": '
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}}</call>"
    "{% endfor %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}<r>{{ m.content }}</r>"
    "{% else %}<{{ m.role[0] }}>{{ m.content }}{% endif %}{% endfor %}"
)

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
# What tool-calling GRPO and veRL's agent loop hold: a call with no content, the tool's result, the answer.
TRAJECTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "name": "add", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
]
EXACT = {"RMSERVE_PRECISION": "fp32", "RMSERVE_CACHE": "off"}


def without_nulls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


@pytest.fixture(scope="module")
def tool_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 reward model whose tokenizer carries TOOL_TEMPLATE, exported to a bundle."""
    from transformers import AutoTokenizer

    from rmserve.models.export import export_bundle

    root = tmp_path_factory.mktemp("tools")
    checkpoint = tiny_checkpoint("qwen2", root / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(checkpoint)
    # Rotary positions have no weights: a longer context only lets longer trajectories in.
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 512}))
    export_bundle(checkpoint, root / "bundle", name="tiny-tools")
    return root / "bundle"


def torch_score(bundle: Path, messages: list[dict[str, Any]]) -> float:
    """PyTorch's score of ``tokenizer.apply_chat_template(messages)``, as TRL's own reward-model path
    renders a conversation (trl 1.16 ``GRPOTrainer._calculate_rewards``)."""
    import torch

    from rmserve.models.heads import load_score_model

    model, tokenizer, _ = load_score_model(bundle.parent / "checkpoint")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(ids, torch.ones_like(ids))[0])


@pytest.fixture(scope="module")
def server(
    tool_bundle: Path, tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    models = f"default={tool_bundle},plain={tiny_bundles['llama']}"
    with serve({**EXACT, "RMSERVE_MODELS": models}, tmp_path_factory.mktemp("srv")) as s:
        yield s


def score(server: ServerProcess, items: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/score", json={"items": items, **extra}, timeout=60)


@pytest.mark.parametrize("name", ["qwen3", "qwen2_5", "llama3_1"])
def test_qwen3_qwen25_and_llama31_templates_render_a_trajectory_as_apply_chat_template_does(
    name: str, tiny_bundles: dict[str, Path]
) -> None:
    """The real templates, as the TRL 1.16 wheel ships them (huggingface/trl trl/chat_templates/)."""
    import trl
    from transformers import AutoTokenizer

    source = (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bundles["qwen2"].parent / "checkpoint")
    template = ChatTemplate(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    item = ChatItem(
        (
            Message("system", "Use tools."),
            Message("user", "What is 12 + 30?"),
            Message("assistant", None, (ToolCall("add", {"b": 30, "a": 12}, "call_1"),)),
            Message("tool", "42", tool_call_id="call_1", name="add"),
            Message("assistant", "It is 42."),
        )
    )
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": None, "tool_calls": [copy.deepcopy(CALL) | {"id": "call_1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "add"},
        {"role": "assistant", "content": "It is 42."},
    ]
    messages[2]["tool_calls"][0]["function"]["arguments"] = {"b": 30, "a": 12}  # key order is kept
    expected = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=source)
    assert template.rendering.tool_calls == "template" and template.rendering.tool_role == "tool"
    assert template.render(as_messages(item)) == expected
    assert '"b": 30, "a": 12' in expected


def test_a_template_without_tool_markup_writes_the_calls_into_the_assistant_text_and_says_so() -> None:
    template = ChatTemplate(CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert template.rendering == Rendering(
        tool_calls="content", tool_role="tool", ipython_role="ipython", parts="joined"
    )
    call = Message("assistant", None, (ToolCall("add", {"a": 12, "b": 30}),))
    written = Message(
        "assistant", '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call>'
    )
    user = Message("user", "What is 12 + 30?")
    assert template.render((user, call)) == template.render((user, written))

    # A template that refuses a tool role gets the result as a user turn; Llama 3.1's role name is
    # given to a template that renders only "tool", and the other way round.
    strict = ChatTemplate(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant', 'tool'] %}"
        "{{ raise_exception('no role ' + m.role) }}{% endif %}{{ m.role }}:{{ m.content }};{% endfor %}",
        bos_token=None,
        eos_token=None,
    )
    assert (strict.rendering.tool_role, strict.rendering.ipython_role) == ("tool", "tool")
    assert strict.render((user, Message("ipython", "42"))) == "user:What is 12 + 30?;tool:42;"


def test_v1_models_says_how_each_bundle_renders_tool_calls(server: ServerProcess) -> None:
    data = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert data["default"]["messages"] == {
        "tool_calls": "template",
        "tool_role": "tool",
        "ipython_role": "ipython",  # its catch-all branch writes any role
        "parts": "joined",
    }
    assert data["plain"]["messages"]["tool_calls"] == "content"


def test_a_tool_calling_trajectory_scores_what_pytorch_scores_for_its_chat_template_rendering(
    server: ServerProcess, tool_bundle: Path
) -> None:
    expected = torch_score(tool_bundle, without_nulls(TRAJECTORY))
    as_string = copy.deepcopy(TRAJECTORY)
    as_string[1]["tool_calls"][0]["function"]["arguments"] = '{"a": 12, "b": 30}'
    items = [
        {"messages": TRAJECTORY},
        {"prompt": TRAJECTORY[:-1], "response": "It is 42."},
        {"messages": as_string},  # a JSON string renders as it is: here the same text
    ]
    resp = score(server, items)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], [expected] * 3, rtol=1e-4, atol=1e-4)
    # The calls reach the model: without them, the score is another one.
    bare = [TRAJECTORY[0], {"role": "assistant", "content": ""}, *TRAJECTORY[2:]]
    assert score(server, [{"messages": bare}]).json()["scores"][0] != pytest.approx(expected, abs=1e-4)


def test_tool_call_arguments_that_are_not_json_are_scored_as_given(
    server: ServerProcess, tool_bundle: Path
) -> None:
    broken = copy.deepcopy(TRAJECTORY)
    broken[1]["tool_calls"][0]["function"]["arguments"] = '{"a": 12, "b": '  # a policy cut off mid-call
    resp = score(server, [{"messages": broken}])
    assert resp.status_code == 200, resp.text
    assert resp.json()["scores"][0] == pytest.approx(
        torch_score(tool_bundle, without_nulls(broken)), abs=1e-4
    )


def test_text_parts_are_scored_as_their_joined_text_and_other_parts_are_counted_or_refused(
    server: ServerProcess,
) -> None:
    parts = [
        {"type": "text", "text": "What is"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "12 + 30?"},
    ]
    with_parts = [{"role": "user", "content": parts}, *TRAJECTORY[1:]]
    joined = [{"role": "user", "content": "What is\n12 + 30?"}, *TRAJECTORY[1:]]
    resp = score(server, [{"messages": with_parts}, {"messages": joined}])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["scores"][0] == pytest.approx(body["scores"][1], abs=1e-6)
    assert body["usage"]["dropped_parts"] == 1

    refused = score(server, [{"messages": joined}, {"messages": with_parts}], non_text_parts="error")
    assert refused.status_code == 422
    message = refused.json()["error"]["message"]
    assert message.startswith("items[1]: messages[0].content[1] is a part of type 'image_url'")


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ({"role": "assistant", "content": "x", "function_call": {}}, "items[0].messages[1].function_call"),
        ({"role": "user", "content": None}, "items[0].messages[1]"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, "tool_calls belong to an assistant turn"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add"}}]},
            "items[0].messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_unknown_message_fields_and_missing_content_are_422s_naming_them(
    server: ServerProcess, message: dict[str, Any], named: str
) -> None:
    resp = score(server, [{"messages": [TRAJECTORY[0], message, TRAJECTORY[-1]]}])
    assert resp.status_code == 422
    assert named in resp.json()["error"]["message"]


def test_the_trl_adapter_sends_tool_calling_completions_as_structured_messages(
    server: ServerProcess, tool_bundle: Path
) -> None:
    """A completion as tool-calling GRPO hands it to reward functions (trl 1.16
    ``GRPOTrainer._tool_call_loop``: the parsed assistant turn with ``tool_calls`` and ``content: ''``,
    then ``{"role": "tool", "name", "content"}``, then the parsed final answer)."""
    from rmserve.adapters.trl import TRLRewardFunction, trl_items

    prompts = [[TRAJECTORY[0]]]
    first = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    completions = [[first, TRAJECTORY[2], TRAJECTORY[3]]]
    sent = trl_items(prompts, completions)
    assert sent == [{"messages": [TRAJECTORY[0], first, TRAJECTORY[2], TRAJECTORY[3]]}]
    rewards = TRLRewardFunction(server.url)(prompts, completions)
    expected = torch_score(tool_bundle, [TRAJECTORY[0], *completions[0]])
    assert rewards == pytest.approx([expected], abs=1e-4)


def test_the_verl_manager_and_compute_score_score_a_raw_prompt_holding_a_tool_calling_turn(
    server: ServerProcess, tool_bundle: Path
) -> None:
    """veRL's ``raw_prompt`` as a parquet row gives it back: an object array of messages, every key of
    every message present (None where unset), the assistant's tool-calling turn with ``content: null``
    (verl 0.9.1 ``experimental/agent_loop/tool_agent_loop.py`` builds such turns)."""
    from transformers import AutoTokenizer

    from rmserve.adapters import verl
    from rmserve.adapters.verl_manager import RMServeRewardManager
    from tests.test_trainers import Rows, verl_row

    keys = ("role", "content", "tool_calls", "tool_call_id", "name")
    prompt = [{k: m.get(k) for k in keys} for m in TRAJECTORY[:3]]
    prompt.append(
        {"role": "user", "content": "And so?", "tool_calls": None, "tool_call_id": None, "name": None}
    )
    answer = "It is 42."
    expected = torch_score(tool_bundle, [*without_nulls(prompt), {"role": "assistant", "content": answer}])

    tokenizer = AutoTokenizer.from_pretrained(tool_bundle.parent / "checkpoint")
    config = {"reward": {"reward_kwargs": {"rmserve_url": server.url}, "custom_reward_function": {}}}
    manager = RMServeRewardManager(config=config, tokenizer=tokenizer)
    out = asyncio.run(manager.run_single(Rows([verl_row(tokenizer, prompt, answer)])))
    assert out["reward_score"] == pytest.approx(expected, abs=1e-4)

    extra_info = {"prompt": np.array(prompt, dtype=object)}
    result = asyncio.run(verl.compute_score("tools", answer, None, extra_info, rmserve_url=server.url))
    assert result["score"] == pytest.approx(expected, abs=1e-4)


def test_a_chatml_tool_calling_query_is_re_rendered_in_the_bundles_template_on_get_reward(
    server: ServerProcess,
) -> None:
    query = (
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 42.<|im_end|>\n<|endoftext|>"
    )
    messages = [TRAJECTORY[0], TRAJECTORY[1], {"role": "tool", "content": "42"}, TRAJECTORY[3]]
    expected = score(server, [{"messages": messages}]).json()["scores"][0]
    body = httpx.post(server.url + "/get_reward", json={"query": [query]}, timeout=60).json()
    assert body["rewards"] == pytest.approx([expected], abs=1e-6)
    assert body["extra_logs"]["rm_retemplated"] == [1.0]


def test_tool_markup_of_chatml_and_llama31_is_read_back_into_tool_calls_and_results() -> None:
    chatml = (
        '<|im_start|>assistant\nLet me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n'
        '</tool_call>\n<tool_call>\n{"name": "neg", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n-1\n</tool_response><|im_end|>\n"
    )
    assert split(chatml, "chatml") == (
        Message("assistant", "Let me add.", (ToolCall("add", {"a": 1}), ToolCall("neg", {"x": 1}))),
        Message("tool", "1"),
        Message("tool", "-1"),
    )
    llama = (
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 1.<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 1}}<|eom_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 1.<|eot_id|>"
    )
    reading = reread(llama, "chatml")
    assert reading.outcome == "retemplated"
    assert reading.item == ChatItem(
        (
            Message("user", "Add 1."),
            Message("assistant", None, (ToolCall("add", {"a": 1}),)),
            Message("ipython", "1"),
            Message("assistant", "It is 1."),
        )
    )
    # A block that is not a call stays text.
    broken = "<|im_start|>assistant\n<tool_call>\nnot json\n</tool_call><|im_end|>"
    assert split(broken, "chatml") == (Message("assistant", "<tool_call>\nnot json\n</tool_call>"),)


def test_a_long_conversation_loses_its_oldest_turns_whole_and_keeps_the_final_answer(
    tool_bundle: Path,
) -> None:
    bundle = load_bundle(tool_bundle)
    system = Message("system", "Be brief.")
    turns = [Message("user", f"Question {i} about bread?") for i in range(6)]
    call = Message("assistant", None, (ToolCall("add", {"a": 1}),))
    conversation = (
        system,
        turns[0],
        call,
        Message("tool", "1"),
        *turns[1:],
        Message("assistant", "Bake it."),
    )
    formatter = Formatter(bundle)

    def cut_to(limit: int) -> Formatter:
        fmt = bundle.manifest.format.model_copy(update={"max_length": limit})
        return Formatter(type(bundle)(bundle.path, bundle.manifest.model_copy(update={"format": fmt})))

    def ids(*messages: Message) -> tuple[int, ...]:
        return formatter.encode([ChatItem(messages)])[0].ids

    # One token too many: the oldest turn after the system message goes; the rest is rendered whole.
    without_first = (system, call, Message("tool", "1"), *turns[1:], conversation[-1])
    got = cut_to(len(ids(*conversation)) - 1).encode([ChatItem(conversation)])[0]
    assert got.truncated and got.ids == ids(*without_first)
    # Shorter still: the assistant's call leaves together with its result.
    without_call = (system, *turns[1:], conversation[-1])
    got = cut_to(len(ids(*without_first)) - 1).encode([ChatItem(conversation)])[0]
    assert got.truncated and got.ids == ids(*without_call)
    assert list(shorter_conversations(conversation))[:2] == [without_first, without_call]
    with pytest.raises(ItemTooLong):
        cut_to(len(ids(*conversation)) - 1).encode([ChatItem(conversation)], strict=True)
    # Past the latest question nothing more is dropped whole: the oldest tokens go, the answer's stay.
    assert list(shorter_conversations(conversation))[-1] == (system, turns[-1], conversation[-1])
    tiny = cut_to(12).encode([ChatItem(conversation)])[0]
    assert tiny.truncated and tiny.ids[-5:] == ids(*conversation)[-5:] and len(tiny.ids) == 12


def test_messages_that_differ_only_in_a_tool_call_never_share_a_cache_key() -> None:
    ns = b"\x01" * 32
    user = Message("user", "q")

    def item(*middle: Message) -> ChatItem:
        return ChatItem((user, *middle, Message("assistant", "a")))

    variants = [
        item(Message("assistant", None, (ToolCall("add", {"a": 1}),))),
        item(Message("assistant", None, (ToolCall("add", {"a": 2}),))),
        item(Message("assistant", None, (ToolCall("add", '{"a": 1}'),))),
        item(Message("assistant", None, (ToolCall("add", {"a": 1}, "call_1"),))),
        item(Message("assistant", "", (ToolCall("add", {"a": 1}),))),
        item(Message("tool", "1")),
        item(Message("tool", "1", tool_call_id="call_1")),
        item(Message("tool", ("1",))),
        item(Message("tool", "1", name="add")),
    ]
    assert len({item_key(ns, v) for v in variants}) == len(variants)
    assert item_key(ns, variants[0]) == item_key(ns, copy.deepcopy(variants[0]))


def test_a_template_that_reads_text_parts_gets_them_as_parts_and_others_get_them_joined() -> None:
    reads_parts = ChatTemplate(
        "{% for m in messages %}{% if m.content is string %}{{ m.content }}"
        "{% else %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %};{% endfor %}",
        bos_token=None,
        eos_token=None,
    )
    parts = (Message("user", ("a", "b")), Message("assistant", "c"))
    assert reads_parts.rendering.parts == "template"
    assert reads_parts.render(parts) == "[a][b];c;"
    joined = ChatTemplate(CHAT_TEMPLATE, bos_token="", eos_token="")
    assert joined.render(parts) == joined.render((Message("user", "a\nb"), Message("assistant", "c")))


def test_the_client_keeps_a_messages_structure_and_leaves_out_what_cannot_travel() -> None:
    """Rows from parquet carry every key (None where unset) and arrays; parts may hold images."""
    from rmserve.client import BadRequestError, message_text, to_item

    class Image:  # what a multimodal tool result holds: not JSON, and never scored
        pass

    image_and_text = [{"type": "image", "image": Image()}, {"type": "text", "text": "42"}]
    messages = np.array(
        [
            {"role": "user", "content": "q", "tool_calls": None, "thinking": None},
            {"role": "assistant", "content": None, "tool_calls": np.array([CALL], dtype=object)},
            {"role": "tool", "content": image_and_text},
            {"role": "assistant", "content": "It is 42.", "tool_calls": [], "thinking": "Add them."},
        ],
        dtype=object,
    )
    assert to_item(list(messages)) == {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "42"}]},
            {"role": "assistant", "content": "It is 42.", "reasoning_content": "Add them."},
        ]
    }
    assert message_text(None) == "" and message_text(messages[2]["content"]) == "42"
    with pytest.raises(BadRequestError, match="items\\[0\\]: a message is a mapping with 'role'"):
        to_item([{"content": "no role"}, {"role": "assistant", "content": "x"}])
