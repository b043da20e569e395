"""OpenRLHF's /get_reward: turn policy-rendered queries into items the bundle can score.

``query`` is the full text the policy rendered, special tokens and padding included. Trailing
pad tokens are stripped (and a run of end-of-sequence tokens kept as one); then:
- a ``text_pair`` bundle scores (prompt, response) when ``prompts[i]`` is a prefix of the query,
  the response being the rest (its trailing special tokens removed, since the encoder's own
  tokenizer adds its separators); without a prompt, the query is split at its last HH
  Assistant turn when it has one, else scored as one text;
- ``chat_template`` and ``plain`` bundles score the query as rendered: it already is the text
  the reward model reads.
``labels`` do not enter the score; they are accepted so OpenRLHF's requests validate.
"""

from __future__ import annotations

from rmserve.bundle import FormatSettings
from rmserve.errors import TooLarge
from rmserve.items import Item, PairItem, TextItem

# End-of-text markers of common policies; an encoder reward model must not read them as words.
_POLICY_SPECIALS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<end_of_turn>",
    "<pad>",
    "<|pad|>",
    "[PAD]",
    "[SEP]",
)


def strip_trailing(text: str, tokens: tuple[str, ...]) -> str:
    """Remove any run of ``tokens`` (and whitespace between them) from the end of ``text``."""
    changed = True
    while changed:
        changed = False
        stripped = text.rstrip()
        for tok in tokens:
            if tok and stripped.endswith(tok):
                text = stripped[: -len(tok)]
                changed = True
    return text


def _strip_pad(text: str, fmt: FormatSettings, pad: str | None) -> str:
    eos = fmt.eos_token
    if pad and pad != eos:
        text = strip_trailing(text, (pad,))
    if eos and text.endswith(eos):
        text = strip_trailing(text, (eos,)) + eos  # a run of EOS becomes one
    return text


def query_items(
    queries: list[str],
    prompts: list[str] | None,
    fmt: FormatSettings,
    max_chars: int,
    pad_token: str | None = None,
) -> list[Item]:
    items: list[Item] = []
    for i, query in enumerate(queries):
        if len(query) > max_chars:
            raise TooLarge(f"query[{i}]: {len(query)} characters is over the limit of {max_chars}")
        text = _strip_pad(query, fmt, pad_token)
        prompt = prompts[i] if prompts is not None else None
        if fmt.input_format != "text_pair":
            items.append(TextItem(text))
        elif prompt and text.startswith(prompt):
            items.append(PairItem(prompt, strip_trailing(text[len(prompt) :], _POLICY_SPECIALS).strip()))
        else:
            items.append(TextItem(strip_trailing(text, _POLICY_SPECIALS)))
    return items
