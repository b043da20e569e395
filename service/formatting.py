"""Items -> token ids, the way the bundle's model was trained to read them.

Three input formats (``input_format``): ``text_pair`` (encoders: prompt and response as a sentence pair),
``chat_template`` (decoder reward models: messages rendered by the bundle's Jinja template) and
``plain`` (text already formatted). Truncation keeps the response and the final tokens: the prompt
loses its oldest tokens first, then the response does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding, Tokenizer

from rmserve.bundle import Bundle, FormatSettings
from rmserve.errors import InvalidItem, ItemTooLong
from rmserve.items import (
    Item,
    StepsItem,
    TextItem,
    as_messages,
    as_pair,
)
from rmserve.markup import Markup, detect

# Rendered once to learn which markup a bundle's chat template writes.
_PROBE = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "reply"}]


@dataclass(frozen=True)
class Encoded:
    """One item's token ids, ready for the batcher."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...] | None
    truncated: bool
    # Process bundles: where each step's token is, in order, and how many trailing steps truncation dropped.
    positions: tuple[int, ...] = ()
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    # Saved tokenizers often carry padding/truncation presets; the formatter does both itself.
    tok.no_padding()
    tok.no_truncation()
    return tok


def _raise(message: str) -> None:
    raise ValueError(message)


class Formatter:
    """Turns items into token ids for one bundle. Thread-safe: tokenizers releases the GIL."""

    def __init__(self, bundle: Bundle, tokenizer: Tokenizer | None = None) -> None:
        self.settings: FormatSettings = bundle.manifest.format
        self.tokenizer = tokenizer or load_tokenizer(bundle)
        self.uses_type_ids = "token_type_ids" in bundle.manifest.inputs
        self._pair_specials = (
            self.tokenizer.post_processor.num_special_tokens_to_add(True)
            if (self.tokenizer.post_processor is not None)
            else 0
        )
        self._template: Any = None
        if self.settings.input_format == "chat_template":
            if not self.settings.chat_template:
                raise ValueError("a chat_template bundle needs a chat template in its manifest")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.settings.chat_template)
        bos = self.settings.bos_token
        self._bos_id = self.tokenizer.token_to_id(bos) if bos else None
        # The pad token's text, which policies also append: OpenRLHF's queries arrive padded with it.
        self.pad_token: str | None = self.tokenizer.id_to_token(self.settings.pad_token_id)
        # The markup this bundle reads: its template's for chat_template bundles, HH turns for pairs.
        self.markup: Markup | None = None
        if self._template is not None:
            self.markup = detect(self._render_messages(_PROBE))
        elif self.settings.input_format == "text_pair":
            self.markup = "hh"

    def encode(
        self, items: list[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        """Token ids for each item, in order. ``strict`` raises ItemTooLong instead of truncating.

        ``positions`` are the items' indices in the caller's request, used to name an item in errors.
        """
        try:
            if self.settings.input_format == "text_pair":
                return self._encode_pairs(items, strict)
            texts = [self._render(i, item) for i, item in enumerate(items)]
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=self.settings.add_special_tokens)
            return [self._fit_single(i, e, strict) for i, e in enumerate(encs)]
        except (InvalidItem, ItemTooLong) as exc:
            if positions is not None:
                raise exc.at(positions[exc.index]) from None
            raise

    def text_of(self, index: int, item: Item) -> str:
        """The text the model reads for ``item`` (``index`` names it in an InvalidItem), untokenized."""
        return self._render(index, item)

    def leading_special(self, enc: Encoding) -> int:
        """1 when ``enc`` starts with a BOS/CLS that truncation must keep, else 0."""
        return int(bool(enc.ids) and (enc.special_tokens_mask[0] == 1 or enc.ids[0] == self._bos_id))

    def _render(self, index: int, item: Item) -> str:
        if isinstance(item, StepsItem):  # the process kind renders steps (rmserve.steps)
            raise InvalidItem(index, "steps are scored by process reward models")
        if isinstance(item, TextItem) or self._template is None:
            if isinstance(item, TextItem):
                return item.text
            pair = as_pair(item)
            assert pair is not None
            return pair[0] + " " + pair[1]
        messages = as_messages(item)
        try:
            return self._render_messages(messages)
        except Exception as exc:  # a template's own raise_exception, or a Jinja error
            if not any(m["role"] == "tool" for m in messages):
                raise InvalidItem(index, f"chat template rejected the messages: {exc}") from None
        # A template without a tool role (many reject any role but user/assistant/system): a tool's
        # result is what the user side of the conversation reported back, so it renders as a user turn.
        folded = [{"role": "user", "content": m["content"]} if m["role"] == "tool" else m for m in messages]
        try:
            return self._render_messages(folded)
        except Exception as exc:
            raise InvalidItem(index, f"chat template rejected the messages: {exc}") from None

    def _render_messages(self, messages: list[dict[str, str]]) -> str:
        return str(
            self._template.render(
                messages=messages,
                add_generation_prompt=False,
                bos_token=self.settings.bos_token or "",
                eos_token=self.settings.eos_token or "",
            )
        )

    def _encode_pairs(self, items: list[Item], strict: bool) -> list[Encoded]:
        pairs: list[tuple[str, str] | None] = []
        for i, item in enumerate(items):
            try:
                pairs.append(as_pair(item))
            except ValueError as exc:
                raise InvalidItem(i, str(exc)) from None
        both = [p for p in pairs if p is not None]
        prompts = self.tokenizer.encode_batch([p[0] for p in both], add_special_tokens=False)
        responses = self.tokenizer.encode_batch([p[1] for p in both], add_special_tokens=False)
        # A text without an HH Assistant turn to split at is read as one sequence.
        singles = [
            item.text
            for item, p in zip(items, pairs, strict=True)
            if p is None and isinstance(item, TextItem)
        ]
        single_encs = self.tokenizer.encode_batch(singles, add_special_tokens=True)
        out: list[Encoded] = []
        it_pairs = iter(zip(prompts, responses, strict=True))
        it_single = iter(single_encs)
        for i, p in enumerate(pairs):
            if p is None:
                out.append(self._fit_single(i, next(it_single), strict))
            else:
                out.append(self._fit_pair(i, *next(it_pairs), strict))
        return out

    def _fit_pair(self, index: int, prompt: Encoding, response: Encoding, strict: bool) -> Encoded:
        budget = self.settings.max_length - self._pair_specials
        n_p, n_r = len(prompt.ids), len(response.ids)
        truncated = n_p + n_r > budget
        if truncated:
            if strict:
                raise ItemTooLong(index, n_p + n_r + self._pair_specials, self.settings.max_length)
            keep_r = min(n_r, budget)
            prompt.truncate(budget - keep_r, direction="left")
            if keep_r < n_r:
                response.truncate(keep_r, direction="left")
        enc = self.tokenizer.post_process(prompt, response, add_special_tokens=True)
        type_ids = tuple(enc.type_ids) if self.uses_type_ids else None
        return Encoded(tuple(enc.ids), type_ids, truncated)

    def _fit_single(self, index: int, enc: Encoding, strict: bool) -> Encoded:
        ids = enc.ids
        limit = self.settings.max_length
        truncated = len(ids) > limit
        if truncated:
            if strict:
                raise ItemTooLong(index, len(ids), limit)
            # Keep a leading BOS/CLS, then the final tokens: a decoder scores the last one.
            head = ids[: self.leading_special(enc)]
            ids = head + ids[len(ids) - (limit - len(head)) :]
        type_ids = tuple([0] * len(ids)) if self.uses_type_ids else None
        return Encoded(tuple(ids), type_ids, truncated)
