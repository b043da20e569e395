"""The model bundle: a directory holding ``model.onnx``, the tokenizer and ``manifest.json``.

The manifest's ``version`` is a content digest of the model files, the tokenizer files and every
setting that changes how text becomes a score, so any change gives a new version (and new cache
keys). ``load_bundle`` recomputes the digest and refuses a bundle that does not match it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.logkeys import reserved_clash

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# The prefix-reuse variant of a lean decoder graph (past K/V in, present K/V out): docs/prefix-reuse.md.
PAST_FILE = "model_past.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CALIBRATION_FILE = "calibration.jsonl"
# 2: ``family`` (encoder, decoder) and ``kind`` (outcome, process); format 1 said ``kind`` for the family.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

InputFormat = Literal["text_pair", "chat_template", "plain"]
Pooling = Literal["cls", "mean", "mean_response", "last_token", "step"]
# What an encoder may pool (a decoder pools its last token). cls: the checkpoint's own head on the
# first token; mean: the mean of the last hidden states over every real token; mean_response: the
# mean over the response's tokens only (segment B of the text pair, its closing [SEP] included), so
# a long prompt, identical for every response to it, does not dilute what differs between them.
ENCODER_POOLINGS: tuple[Pooling, ...] = ("cls", "mean", "mean_response")
Precision = Literal["fp32", "fp16", "bf16", "int8"]
Family = Literal["encoder", "decoder"]
# outcome: one reward per sequence; process: a reward at each step of a solution (a step token's position).
Kind = Literal["outcome", "process"]
# traced: torch.onnx's graph of the PyTorch model; lean: rmserve's own decoder graph (models/lean).
Graph = Literal["traced", "lean"]
# any: the graph reads the attention mask, so rows may be padded on either side; right: it reads no
# padding mask and is right only when every row's real tokens come first.
Padding = Literal["any", "right"]
# How a process head's label logits become a step's reward (applied in the graph): the positive
# label's probability (softmax over the two labels), p(+) - p(-), the sigmoid of a single logit, or
# the positive label's raw logit.
StepRule = Literal["positive_prob", "prob_diff", "sigmoid", "raw"]
# Where a process bundle's label logits come from: a token-classification head (1 or 2 labels), the
# Qwen2.5-Math-PRM head (two linear layers, 2 labels), or a causal LM's head read at two label tokens.
# value_head: a one-output linear layer saved beside a causal LM (Skywork-o1-Open-PRM's ``v_head.summary``).
HeadForm = Literal["token_classification", "qwen2_prm", "lm_head", "value_head"]
# How a process bundle's steps become token ids (``rmserve.layouts``): joint (the item rendered as one text,
# the step token after each step), separate (the prompt and each step tokenized on their own, the
# separator's ids after each step) or turns (each step a user turn, read where the model predicts its
# assistant label).
StepLayout = Literal["joint", "separate", "turns"]


class BundleError(Exception):
    """A bundle is missing, malformed, or does not match its digest."""


class FormatSettings(BaseModel):
    """Everything about turning an item into token ids; all of it is part of the digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Fields added after bundles were already published: in the digest only when not at their
    # default, so a bundle exported before the field existed keeps its version (``digest_json``).
    DIGEST_WHEN_SET: ClassVar[tuple[str, ...]] = ("bos_tokens", "template_date", "gate_pattern")

    input_format: InputFormat
    max_length: int = Field(gt=1)
    # "left": when an item is too long, drop its oldest tokens first (the prompt from the left,
    # then the response from the left), so the response and the final tokens survive.
    truncation: Literal["left"] = "left"
    pooling: Pooling
    pad_token_id: int = Field(ge=0)
    # Special tokens are added by the tokenizer's post-processor for encoders; decoder bundles
    # receive text already rendered by a chat template and add none for plain text.
    add_special_tokens: bool = True
    # Only for chat_template bundles: the Jinja template that renders a message list.
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    # Only for text_pair bundles: how a message list becomes (prompt, response), and where a
    # plain text transcript is split. "hh" renders turns as "\n\nHuman: ..." / "\n\nAssistant: ...".
    turn_style: Literal["hh"] = "hh"
    # An outcome bundle's score map: each score leaves the server as ``score_scale * raw + score_shift``
    # (``rmserve.kinds``); the defaults serve raw scores. Always in the digest, so a map is a new version.
    score_shift: float = 0.0
    score_scale: float = 1.0
    # Decoders: how many BOS ids every item starts with. None: as the text tokenizes (a chat template's
    # own BOS, plain text's none). N: the leading BOS ids the text tokenized to are replaced by exactly
    # N (``Formatter.tokenize``), as the model's authors tokenize it; decided at export from the reference.
    bos_tokens: int | None = Field(None, ge=0, le=2)
    # The date ``strftime_now`` renders in chat templates (ISO, e.g. "2026-12-07"), fixed at export so a
    # score does not change from day to day; None leaves ``strftime_now`` undefined.
    template_date: str | None = None
    # Only for a gating head (ArmoRM): the token ids whose last occurrence marks the prompt end it reads;
    # an item whose ids lack them cannot be scored.
    gate_pattern: tuple[int, ...] | None = None

    @property
    def maps_scores(self) -> bool:
        """Whether the bundle's scores leave the server mapped (``score_shift``, ``score_scale``)."""
        return (self.score_shift, self.score_scale) != (0.0, 1.0)

    @model_validator(mode="after")
    def _order_kept(self) -> FormatSettings:
        # A map that flips or flattens the order would change which of two responses is better.
        if not (math.isfinite(self.score_scale) and self.score_scale > 0):
            raise ValueError(f"score_scale {self.score_scale} must be a positive finite number")
        if not math.isfinite(self.score_shift):
            raise ValueError(f"score_shift {self.score_shift} must be a finite number")
        return self

    @model_validator(mode="after")
    def _iso_date(self) -> FormatSettings:
        if self.template_date is not None:
            try:
                date.fromisoformat(self.template_date)
            except ValueError:
                raise ValueError(f"template_date {self.template_date!r} is not an ISO date") from None
        return self


class ProcessSettings(BaseModel):
    """How a process bundle marks and reads steps; part of the digest (a different step token, head or
    rule is a different bundle)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # As for FormatSettings: later fields enter the digest only when set.
    DIGEST_WHEN_SET: ClassVar[tuple[str, ...]] = (
        "layout",
        "separator_ids",
        "prompt_suffix",
        "before_token",
        "between_steps",
    )

    step_token: str = Field(min_length=1)
    step_token_id: int = Field(ge=0)
    head: HeadForm
    rule: StepRule
    # The positive and negative labels: label indices of a classification head, or the token ids an
    # LM head is read at (``label_tokens`` names them). A 1-label head has no negative label.
    positive_label: int = Field(ge=0)
    negative_label: int | None = Field(None, ge=0)
    label_tokens: tuple[str, str] | None = None
    # How steps become ids. Under ``separate`` the step token is the separator text and
    # ``separator_ids`` its ids, appended to each step; under ``turns`` it is the assistant's reply
    # after each step (the positive label token). ``prompt_suffix`` is written after the prompt, before
    # the first step (separate: in the prompt's text; turns: in the first user turn, before step 1).
    layout: StepLayout = "joint"
    separator_ids: tuple[int, ...] | None = None
    prompt_suffix: str = ""
    # Joint: what a steps item writes before each step token and between steps (Math-Shepherd's
    # "Step 1: ... ки\nStep 2: ... ки" is " " and "\n"; the Qwen cards' "<extra_0>" joins, "" and "").
    before_token: str = ""
    between_steps: str = ""


# A head with several outputs emits its objectives' values under this name, beside ``scores``.
COMPONENTS_OUTPUT = "components"


class Manifest(BaseModel):
    """``manifest.json``: what the server needs to load, verify and describe a bundle."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    digest: str
    architecture: str
    model_type: str
    family: Family
    kind: Kind = "outcome"
    # Only for process bundles: the step token and how a step's reward is read.
    process: ProcessSettings | None = None
    # Only for an outcome head other than transformers' ``score`` layer: its form, the checkpoint
    # weights it was read from, and what it adds (an LM head's token id, a normalisation's mean/std).
    head: dict[str, Any] | None = None
    base_model: str
    # The model family export recognised, its authors' tokenization recipe and the BOS policy it
    # implied (rmserve.models.families); the reference's result is ``parity["reference"]``.
    model_family: dict[str, Any] | None = None
    format: FormatSettings
    precision: Precision = "fp32"
    opset: int
    inputs: list[str]
    output: str = "scores"
    files: list[str]
    parity: dict[str, Any] = Field(default_factory=dict)
    calibration_file: str | None = None
    training: dict[str, Any] | None = None
    # "fused:<op>": each layer's attention is one fused operator (ONNX's Attention, opset 23);
    # "unfused": matrix products and a softmax, with ``attention_reason`` saying why.
    attention: str = "unfused"
    attention_reason: str | None = None
    # The graph variant, decided at export: "lean" graphs need right padding (``padding``), which the
    # engine enforces; ``graph_reason`` says why a decoder did not get the lean graph.
    graph: Graph = "traced"
    graph_reason: str | None = None
    padding: Padding = "any"
    # The prefix-reuse graph's file (lean decoders exported with it), or None: such a bundle scores
    # every item whole (docs/prefix-reuse.md).
    past_graph: str | None = None
    created_by: str = "rmserve export"

    @property
    def components(self) -> tuple[str, ...]:
        """The objectives' names of a head with several outputs (a gating head's ``components``, the
        graph's second output ``[batch, objectives]``); empty for a bundle with one score per item."""
        names = (self.head or {}).get("components")
        return tuple(str(n) for n in names) if names else ()

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        """The graph outputs an engine returns beside ``output``, as columns after the score."""
        return (COMPONENTS_OUTPUT,) if self.components else ()

    @model_validator(mode="before")
    @classmethod
    def _from_format_1(cls, data: Any) -> Any:
        # Format 1 named the family ``kind`` and had only outcome bundles; its digest covers the same
        # files and settings, so such a bundle is read as is.
        if isinstance(data, dict) and data.get("format_version") == 1 and "family" not in data:
            data = {**data, "family": data.get("kind"), "kind": "outcome"}
        return data

    @model_validator(mode="after")
    def _process_settings(self) -> Manifest:
        if (self.kind == "process") != (self.process is not None):
            raise ValueError("a process bundle, and only a process bundle, has process settings")
        for name in self.components:  # logged by /get_reward under their own names
            why = reserved_clash(name, "objective")
            if why is not None:
                raise ValueError(why)
        if self.process is not None and self.format.maps_scores:
            raise ValueError(
                "score_shift and score_scale apply to outcome bundles; a process bundle's step values are "
                f"what its step rule {self.process.rule!r} makes them"
            )
        return self


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def digest_json(settings: FormatSettings | ProcessSettings) -> dict[str, Any]:
    """The settings as the digest reads them: every field, less the ``DIGEST_WHEN_SET`` ones that
    still hold their defaults."""
    data = settings.model_dump(mode="json")
    for name in settings.DIGEST_WHEN_SET:
        if getattr(settings, name) == type(settings).model_fields[name].default:
            data.pop(name, None)
    return data


def compute_digest(
    directory: Path,
    files: list[str],
    settings: FormatSettings,
    precision: str,
    process: ProcessSettings | None = None,
) -> str:
    """sha256 over each file (name, length, bytes, in sorted order), the format settings and, for a
    process bundle, its process settings."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle file {name!r} is missing from {directory}")
        h.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    meta: dict[str, Any] = {"format": digest_json(settings), "precision": precision}
    if process is not None:  # absent for outcome bundles, so their digests are what they always were
        meta["process"] = digest_json(process)
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


def version_of(digest: str) -> str:
    return digest.removeprefix("sha256:")[:16]


def bundle_files(directory: Path) -> list[str]:
    """The files that make up a bundle's content: the model (and its external data) and tokenizer."""
    names = [MODEL_FILE]
    if (directory / PAST_FILE).is_file():  # absent from older bundles, whose digests stay as they were
        names.append(PAST_FILE)
    names += sorted(p.name for p in directory.glob("*.onnx.data"))
    names += [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if (directory / CALIBRATION_FILE).is_file():  # the quality gate's input is content too
        names.append(CALIBRATION_FILE)
    return names


def write_manifest(directory: Path, **fields: Any) -> Manifest:
    """Compute the digest of ``directory`` and write its manifest; returns the manifest written."""
    settings = fields["format"]
    if not isinstance(settings, FormatSettings):
        settings = FormatSettings.model_validate(settings)
    precision = fields.get("precision", "fp32")
    process = fields.get("process")
    if isinstance(process, dict):
        process = ProcessSettings.model_validate(process)
    files = bundle_files(directory)
    digest = compute_digest(directory, files, settings, precision, process)
    manifest = Manifest.model_validate(
        {
            **fields,
            "format": settings,
            "process": process,
            "files": files,
            "digest": digest,
            "version": version_of(digest),
        }
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def unsealed_bundle(directory: Path, **fields: Any) -> Bundle:
    """A bundle still being built: its fields validated, no digest computed yet.

    The exporter checks parity on it, then seals it once with ``write_manifest``, so each file
    is hashed once, when it is final.
    """
    files = bundle_files(directory)
    unsealed = {"files": files, "digest": "unsealed", "version": "unsealed"}
    manifest = Manifest.model_validate(fields | unsealed)
    return Bundle(path=directory.resolve(), manifest=manifest)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory} is not a bundle: {MANIFEST} is missing")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is not a valid manifest: {exc}") from None


def peek_bundle(directory: str | Path) -> tuple[Path, Manifest]:
    """A bundle directory and its manifest, read but not verified (no file is hashed): what start-up
    checks before the server listens. Raises BundleError naming what is wrong."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    manifest = read_manifest(path)
    if manifest.format_version not in READABLE_FORMATS:
        raise BundleError(f"{path}: bundle format {manifest.format_version} is not supported")
    return path, manifest


def load_bundle(directory: str | Path) -> Bundle:
    """Read and verify a bundle; raises BundleError when its content does not match its digest."""
    path, manifest = peek_bundle(directory)
    actual = compute_digest(path, manifest.files, manifest.format, manifest.precision, manifest.process)
    if actual != manifest.digest:
        raise BundleError(
            f"{path}: content digest {actual} does not match the manifest's {manifest.digest}; "
            "the bundle was modified after export"
        )
    return Bundle(path=path, manifest=manifest)


def default_bundle_path() -> Path:
    """The default reward model shipped inside the package: ``rmserve/models/default`` as installed,
    ``models/default`` in a clone (an editable install maps ``rmserve.models`` there)."""
    # Found, not imported: the package's __init__ is empty, and nothing torch-side runs.
    spec = importlib.util.find_spec("rmserve.models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the rmserve.models package (the default bundle's home) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "default"
