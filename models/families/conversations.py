"""The fixed conversations every family's reference is run on at export.

A system turn, several turns, a tool-call turn (with the tool's definition), non-ASCII text, and one
conversation grown until its reference tokenization is near ``max_length`` (``Conversation.fill``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from rmserve.models.families.base import Conversation

WEATHER_TOOL: Mapping[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}

FILLER = "Bread needs time. "

CONVERSATIONS: tuple[Conversation, ...] = (
    Conversation(
        "system turn",
        (
            {"role": "system", "content": "You are a careful assistant. Answer briefly."},
            {"role": "user", "content": "How many legs does a spider have?"},
            {"role": "assistant", "content": "Eight."},
        ),
    ),
    Conversation(
        "several turns",
        (
            {"role": "user", "content": "Can you help me write a poem about rain?"},
            {"role": "assistant", "content": "Of course. Do you want it to rhyme?"},
            {"role": "user", "content": "Yes, four short lines please."},
            {"role": "assistant", "content": "Grey clouds gather, soft and slow,\nrain taps the roof below."},
        ),
    ),
    Conversation(
        "tool call",
        (
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18 C, clear"},
            {"role": "assistant", "content": "It is 18 degrees and clear in Paris."},
        ),
        tools=(WEATHER_TOOL,),
    ),
    Conversation(
        "non-ASCII text",
        (
            {"role": "user", "content": "Traduis « bonne journée » en japonais, s'il te plaît. 🙂"},
            {"role": "assistant", "content": "良い一日を (yoi ichinichi o). Ça se dit aussi « よい一日を »."},
        ),
    ),
    Conversation(
        "near max_length",
        (
            {"role": "user", "content": "Summarise this for me: "},
            {"role": "assistant", "content": "It explains how bread is made."},
        ),
        fill=FILLER,
    ),
)


def grown(conversation: Conversation, repeats: int) -> Conversation:
    """``conversation`` with its filler written ``repeats`` times into its first turn."""
    if conversation.fill is None:
        return conversation
    first = dict(conversation.messages[0])
    first["content"] = str(first["content"]) + conversation.fill * repeats
    return replace(conversation, messages=(first, *conversation.messages[1:]))


def near_limit(conversation: Conversation, length: Callable[[Conversation], int], limit: int) -> Conversation:
    """The longest growth of ``conversation`` whose ``length`` (its token count as the reference
    tokenizes it) stays ``margin`` tokens under ``limit`` (2 BOS may still be added or removed)."""
    margin = 4
    if conversation.fill is None or length(grown(conversation, 0)) > limit - margin:
        return grown(conversation, 0)
    low, high = 0, 1
    while length(grown(conversation, high)) <= limit - margin:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if length(grown(conversation, mid)) <= limit - margin else (low, mid)
    return grown(conversation, low)
