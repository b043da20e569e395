"""OpenRLHF's /get_reward: turn policy-rendered queries into items the bundle can score.

``query`` is the full text the policy rendered, special tokens and padding included. Trailing
pad tokens are stripped (and a run of end-of-sequence tokens kept as one); then:
- a ``chat_template`` bundle scores the query as rendered when it carries the bundle's own markup;
  a query in another policy's markup (ChatML, Llama-3, ``[INST]``, Gemma, HH) is split into its
  messages and rendered with the bundle's template (``rmserve.markup``; setting ``retemplate``);
- a ``text_pair`` bundle scores a query in a chat markup from its messages (rendered as HH turns);
  otherwise (prompt, response) when ``prompts[i]`` is a prefix of the query, the response being the
  rest (its trailing special tokens removed, since the encoder's own tokenizer adds its
  separators); without a prompt, the query is split at its last HH Assistant turn when it has one,
  else scored as one text;
- ``plain`` bundles score the query as rendered.
Each query's outcome (``as_is``, ``retemplated``, ``unrecognised``) is returned beside its item.
``labels`` (any JSON) do not enter the score; they are accepted so OpenRLHF's requests validate.
A process model's queries are read by ``step_query_items``: the response is split into steps.
"""

from __future__ import annotations

from rmserve.bundle import FormatSettings
from rmserve.errors import InvalidRequest, TooLarge
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Item, PairItem, StepsItem, TextItem, split_steps, written_text
from rmserve.markup import (
    POLICY_SPECIALS,
    Outcome,
    detect,
    prompt_messages,
    reread,
    split,
    strip_trailing,
)


def _strip_pad(text: str, fmt: FormatSettings, pad: str | None) -> str:
    eos = fmt.eos_token
    if pad and pad != eos:
        text = strip_trailing(text, (pad,))
    if eos and text.endswith(eos):
        text = strip_trailing(text, (eos,)) + eos  # a run of EOS becomes one
    return text


def _pair_item(text: str, prompt: str | None, retemplate: bool) -> tuple[Item, Outcome]:
    found = detect(text) if retemplate else None
    outcome: Outcome = "as_is"
    if found not in (None, "hh"):
        messages = split(text, found)
        if messages is not None and messages[-1].role == "assistant":
            return ChatItem(messages), "retemplated"
        outcome = "unrecognised"
    if prompt and text.startswith(prompt):
        return PairItem(prompt, strip_trailing(text[len(prompt) :], POLICY_SPECIALS).strip()), outcome
    return TextItem(strip_trailing(text, POLICY_SPECIALS)), outcome


def query_items(
    queries: list[str],
    prompts: list[str] | None,
    formatter: Formatter,
    max_chars: int,
    *,
    retemplate: bool = True,
) -> tuple[list[Item], list[Outcome]]:
    """The items to score for OpenRLHF's queries, and how each query was read."""
    fmt = formatter.settings
    items: list[Item] = []
    outcomes: list[Outcome] = []
    for i, query in enumerate(queries):
        if len(query) > max_chars:
            raise TooLarge(f"query[{i}]: {len(query)} characters is over the limit of {max_chars}")
        text = _strip_pad(query, fmt, formatter.pad_token)
        if fmt.input_format == "chat_template":
            reading = reread(text, formatter.markup, enabled=retemplate)
            item, outcome = reading.item, reading.outcome
        elif fmt.input_format == "text_pair":
            item, outcome = _pair_item(text, prompts[i] if prompts is not None else None, retemplate)
        else:
            item, outcome = TextItem(text), "as_is"
        items.append(item)
        outcomes.append(outcome)
    return items, outcomes


def step_query_items(
    queries: list[str],
    prompts: list[str] | None,
    formatter: Formatter,
    step_token: str,
    max_chars: int,
    *,
    retemplate: bool = True,
) -> tuple[list[Item], list[Outcome]]:
    """The items for a process model: each query's response cut into steps at blank lines.

    A query that already carries the step token is scored as sent. Otherwise its messages are read
    from its chat markup (the bundle's own or a policy's), or ``prompts[i]`` is its prefix, and the
    last assistant turn (the rest of the query) is split into steps (``rmserve.items.split_steps``).
    A query with none of these is a 422 naming it.
    """
    items: list[Item] = []
    outcomes: list[Outcome] = []
    own = formatter.markup
    for i, query in enumerate(queries):
        if len(query) > max_chars:
            raise TooLarge(f"query[{i}]: {len(query)} characters is over the limit of {max_chars}")
        text = _strip_pad(query, formatter.settings, formatter.pad_token)
        found = detect(text)
        messages = split(text, found) if found is not None else None
        prompt = prompts[i] if prompts is not None else None
        if step_token in text:
            items.append(TextItem(text))
            outcomes.append("as_is")
        elif messages is not None and messages[-1].role == "assistant" and (retemplate or found == own):
            items.append(StepsItem(messages[:-1], split_steps(written_text(messages[-1]))))
            outcomes.append("as_is" if found == own else "retemplated")
        elif prompt and text.startswith(prompt):
            markup = detect(prompt)
            context = prompt_messages(prompt, markup) if markup is not None else None
            response = strip_trailing(text[len(prompt) :], POLICY_SPECIALS)
            items.append(StepsItem(context or prompt, split_steps(response)))
            outcomes.append("as_is")
        else:
            raise InvalidRequest(
                f"query[{i}]: a process reward model scores the steps of a response, and this query has no "
                f"step token {step_token!r}, no chat markup to find the response in, and no prompt that "
                "begins it"
            )
    return items, outcomes
