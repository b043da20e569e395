"""Items -> token ids, the way the bundle's model was trained to read them.

Three input formats (``input_format``): ``text_pair`` (encoders: prompt and response as a sentence pair),
``chat_template`` (decoder reward models: messages rendered by the bundle's Jinja template, ``rmserve.chat``)
and ``plain`` (text already formatted). Truncation keeps the response and the final tokens: the prompt
loses its oldest tokens first, then the response does. A conversation rendered by a chat template loses
whole turns first (``shorter_conversations``), so what is left still reads as the template wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import Encoding, Tokenizer

from rmserve.bundle import Bundle, FormatSettings
from rmserve.chat import TRANSCRIPT, ChatTemplate, Rendering
from rmserve.errors import InvalidItem, ItemTooLong
from rmserve.items import (
    TOOL_ROLES,
    ChatItem,
    FieldError,
    Item,
    Message,
    Messages,
    StepsItem,
    TextItem,
    as_messages,
    as_pair,
)
from rmserve.markup import Markup, detect

# Rendered once to learn which markup a bundle's chat template writes.
_PROBE = (Message("user", "probe"), Message("assistant", "reply"))


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


Tools = tuple[Mapping[str, Any], ...] | None


def tools_of(item: Item) -> Tools:
    """The tool definitions an item carries for its template (chat items only)."""
    return item.tools if isinstance(item, ChatItem) else None


def _length(enc: Encoding) -> int:
    return len(enc.ids)


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    # Saved tokenizers often carry padding/truncation presets; the formatter does both itself.
    tok.no_padding()
    tok.no_truncation()
    return tok


def shorter_conversations(messages: Messages) -> Iterator[Messages]:
    """The conversation with its oldest turns dropped, one more each time; the final turn, a leading
    system message and the latest prompt turn stay (a reply is never scored without what it answers:
    past that, the formatter cuts tokens). A turn leaves with the tool results that follow it (an
    assistant's calls and their results go together)."""
    head = messages[:1] if len(messages) > 1 and messages[0].role == "system" else ()
    body, last = messages[len(head) : -1], messages[-1]
    for cut in range(1, len(body)):
        if body[cut].role not in TOOL_ROLES:
            yield (*head, *body[cut:], last)


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
        self.template: ChatTemplate | None = None
        fmt = self.settings
        if fmt.input_format == "chat_template":
            if not fmt.chat_template:
                raise ValueError("a chat_template bundle needs a chat template in its manifest")
            self.template = ChatTemplate(
                fmt.chat_template,
                bos_token=fmt.bos_token,
                eos_token=fmt.eos_token,
                template_date=fmt.template_date,
            )
        bos = self.settings.bos_token
        self._bos_id = self.tokenizer.token_to_id(bos) if bos else None
        if fmt.bos_tokens and self._bos_id is None:
            raise ValueError(f"bos_tokens={fmt.bos_tokens} needs a BOS token, and {bos!r} is not one")
        # The pad token's text, which policies also append: OpenRLHF's queries arrive padded with it.
        self.pad_token: str | None = self.tokenizer.id_to_token(self.settings.pad_token_id)
        # The markup this bundle reads: its template's for chat_template bundles, HH turns for pairs.
        self.markup: Markup | None = None
        if self.template is not None:
            self.markup = detect(self.template.render(_PROBE))
        elif self.settings.input_format == "text_pair":
            self.markup = "hh"
        # How messages reach the model (shown in /v1/models); HH transcripts write tool calls as text.
        self.rendering: Rendering = self.template.rendering if self.template is not None else TRANSCRIPT

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
            encs = self.tokenize(texts)
            pairs = enumerate(zip(items, encs, strict=True))
            return self._with_gate([self._fit_rendered(i, item, e, strict) for i, (item, e) in pairs])
        except (InvalidItem, ItemTooLong) as exc:
            if positions is not None:
                raise exc.at(positions[exc.index]) from None
            raise

    def _with_gate(self, encoded: list[Encoded]) -> list[Encoded]:
        """``encoded``, when each item holds the gate pattern a gating head reads its prompt end at."""
        pattern = self.settings.gate_pattern
        if pattern:
            n = len(pattern)
            for i, enc in enumerate(encoded):
                if not any(enc.ids[j : j + n] == pattern for j in range(len(enc.ids) - n + 1)):
                    raise InvalidItem(
                        i,
                        "the model's gating head reads the prompt end (token ids "
                        f"{list(pattern)}: the end of a user turn and the start of the assistant's), "
                        "which this item does not have: send messages ending with an assistant turn",
                    )
        return encoded

    def text_of(self, index: int, item: Item) -> str:
        """The text the model reads for ``item`` (``index`` names it in an InvalidItem), untokenized."""
        return self._render(index, item)

    def tokenize(self, texts: list[str]) -> list[Encoding]:
        """Rendered texts (a template's, a steps layout's or plain text) as token ids, with the bundle's
        BOS policy applied: under ``bos_tokens`` N, the leading BOS ids a text tokenized to are
        replaced by exactly N. Every decoder item reaches the model through here."""
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=self.settings.add_special_tokens)
        wanted = self.settings.bos_tokens
        return encs if wanted is None else [self._with_bos(enc, wanted) for enc in encs]

    def _with_bos(self, enc: Encoding, wanted: int) -> Encoding:
        lead = 0
        while lead < len(enc.ids) and enc.ids[lead] == self._bos_id:
            lead += 1
        if lead == len(enc.ids):  # nothing but BOS (an empty text): start from nothing
            enc = self.tokenizer.encode("", add_special_tokens=False)
        elif lead:
            enc.truncate(len(enc.ids) - lead, direction="left")
        bos = self.tokenizer.encode(self.settings.bos_token or "", add_special_tokens=False)
        return Encoding.merge([bos] * wanted + [enc], growing_offsets=False)

    def leading_special(self, enc: Encoding) -> int:
        """How many leading special ids truncation must keep: the bundle's BOS count under a BOS policy,
        else 1 when ``enc`` starts with a BOS/CLS, else 0."""
        if self.settings.bos_tokens is not None:
            return self.settings.bos_tokens
        return int(bool(enc.ids) and (enc.special_tokens_mask[0] == 1 or enc.ids[0] == self._bos_id))

    def _render(self, index: int, item: Item) -> str:
        if isinstance(item, StepsItem):  # the process kind renders steps (rmserve.steps)
            raise InvalidItem(index, "steps are scored by process reward models")
        if isinstance(item, TextItem):
            return item.text
        if self.template is None:
            pair = _pair(index, item)
            assert pair is not None
            return pair[0] + " " + pair[1]
        return self._render_messages(index, as_messages(item), tools_of(item))

    def _render_messages(self, index: int, messages: Messages, tools: Tools = None) -> str:
        assert self.template is not None
        try:
            return self.template.render(messages, tools)
        except Exception as exc:  # a template's own raise_exception, or a Jinja error
            raise InvalidItem(index, f"chat template rejected the messages: {exc}") from None

    def _fit_rendered(self, index: int, item: Item, enc: Encoding, strict: bool) -> Encoded:
        """A rendered item cut to max_length: a conversation loses its oldest turns, then tokens."""
        if strict:
            return self._fit_single(index, enc, strict)
        shorter = self.fewer_turns(item, enc)
        fitted = self._fit_single(index, shorter, strict)
        return Encoded(fitted.ids, fitted.type_ids, truncated=fitted.truncated or shorter is not enc)

    def fewer_turns(self, item: Item, enc: Encoding, length: Callable[[Encoding], int] = _length) -> Encoding:
        """``item`` rendered again with its conversation's oldest turns dropped (``shorter_conversations``),
        one more each time, until the ``length`` of its encoding fits max_length; the last rendering
        tried when none fits. ``enc`` (the item's full rendering) itself when that fits already, or when
        the item is no conversation rendered by a chat template."""
        limit = self.settings.max_length
        if length(enc) <= limit or self.template is None or isinstance(item, TextItem | StepsItem):
            return enc
        for shorter in shorter_conversations(as_messages(item)):
            try:
                text = self.template.render(shorter, tools_of(item))
            except Exception:  # e.g. a template that needs a user turn: try dropping more, or cut tokens
                continue
            enc = self.tokenize([text])[0]
            if length(enc) <= limit:
                break
        return enc

    def _encode_pairs(self, items: list[Item], strict: bool) -> list[Encoded]:
        pairs: list[tuple[str, str] | None] = []
        for i, item in enumerate(items):
            pairs.append(_pair(i, item))
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


def _pair(index: int, item: Item) -> tuple[str, str] | None:
    """``as_pair``, its errors an InvalidItem naming the field where it has one."""
    try:
        return as_pair(item)
    except FieldError as exc:
        raise InvalidItem(index, exc.reason, exc.field) from None
    except ValueError as exc:
        raise InvalidItem(index, str(exc)) from None
