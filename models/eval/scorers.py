"""``rmserve eval``, second stage: rows -> score records, in process or through a running rmserve.

``LocalScorer`` runs the server's own Formatter and ONNX Runtime engine in this process;
``RemoteScorer`` sends the items with ``rmserve.client.RewardClient``. Either way a row the model
side refuses becomes an ``error`` record and the other rows of its chunk are scored as usual. A
process reward model's value for an item is its list of step scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rmserve.items import Item, StepsItem
from rmserve.models.eval.rows import EvalError, EvalRow

# An item's score, or a process reward model's step scores.
Scored = float | list[float]


class Scorer(Protocol):
    """Scores items in order. ``items_sent`` counts every item handed to the model (the proof that a
    resumed run scores no row twice); ``model`` describes what scored them."""

    items_sent: int
    model: dict[str, Any]

    def score(self, items: list[Item]) -> list[Scored]: ...

    def close(self) -> None: ...


class RejectedItem(Exception):
    """The model side refused one item (its formatter or the server said it is malformed)."""


class TooLong(RejectedItem):
    """A solution in steps is over the model's max_length: eval never scores one cut (rows.py: a
    ProcessBench row is judged on all its steps), so it is recorded apart."""


def _uncut(items: list[Item]) -> bool:
    """Whether these items must be scored whole: solutions in steps are never cut."""
    return any(isinstance(i, StepsItem) for i in items)


class LocalScorer:
    """In process: the server's Formatter and engine, length-sorted batches under a token budget."""

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        provider: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        batch_tokens: int | None = None,
        batch_size: int = 64,
    ) -> None:
        from rmserve.bundle import load_bundle
        from rmserve.config import Settings
        from rmserve.engines.select import create_engine, default_batch_tokens
        from rmserve.formatting import Formatter
        from rmserve.kinds import kind_of

        self.bundle = load_bundle(bundle_dir)
        chosen: dict[str, Any] = {"provider": provider, "precision": precision}
        if threads is not None:  # else RMSERVE_THREADS or the CPUs this process may use, as the server does
            chosen["threads"] = threads
        settings = Settings(**chosen)
        self.engine, selection = create_engine(self.bundle, settings)
        self.formatter = Formatter(self.bundle)
        self.kind = kind_of(self.bundle.manifest.name, self.bundle, self.formatter)
        self.batch_tokens = batch_tokens or default_batch_tokens(self.engine.info.provider)
        self.batch_size = batch_size
        self.items_sent = 0
        m = self.bundle.manifest
        self.model = {
            "name": m.name,
            "version": m.version,
            "source": str(self.bundle.path),
            "mode": "in-process",
            "provider": self.engine.info.provider,
            "precision": self.engine.info.precision,
            "threads": self.engine.info.threads,
            "selection": selection.get("reason"),
            "kind": self.bundle.manifest.kind,
            "step_rule": m.process.rule if m.process else None,
        }

    def score(self, items: list[Item]) -> list[Scored]:
        from rmserve.engines.batches import infer_rows
        from rmserve.errors import InvalidItem, InvalidRequest, ItemTooLong
        from rmserve.kinds import NonFinite

        try:
            self.kind.check(items, None)
            encoded = self.kind.encode(items, strict=_uncut(items))
        except ItemTooLong as exc:
            raise TooLong(str(exc)) from None
        except InvalidItem as exc:
            raise RejectedItem(exc.reason) from None
        except (InvalidRequest, ValueError) as exc:
            raise RejectedItem(str(exc)) from None
        try:
            # The shared loop: sorted by length, batches of at most batch_size items and batch_tokens.
            values = infer_rows(
                encoded,
                self.engine.infer,
                self.formatter.settings.pad_token_id,
                self.kind.read,
                batch_items=self.batch_size,
                batch_tokens=self.batch_tokens,
            )
        except NonFinite as exc:
            raise RejectedItem(str(exc)) from None
        finally:
            self.items_sent += len(encoded)
        return [list(v) if isinstance(v, tuple) else float(v) for v in values]

    def close(self) -> None:
        self.engine.close()


class RemoteScorer:
    """Through a running rmserve: the client chunks each call and runs ``concurrency`` requests at once."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
    ) -> None:
        from rmserve.client import RewardClient

        self.client = RewardClient(
            url, api_key=api_key, model=model, chunk_size=batch_size, max_concurrency=concurrency
        )
        if self.client.health().status == "unreachable":  # fail fast; a starting server gets a minute
            self.client.close()
            raise EvalError(f"no rmserve answers at {url}")
        self.client.wait_until_ready(timeout_s=60.0)
        chosen = _served_model([served_entry(m) for m in self.client.models()], model)
        self.items_sent = 0
        self.model = {**chosen, "source": url, "mode": "server", "concurrency": concurrency}

    def score(self, items: list[Item]) -> list[Scored]:
        from rmserve.client import BadRequestError, RequestTooLargeError

        uncut = _uncut(items)
        try:
            result = self.client.score_result(items, truncation="error" if uncut else None)
        except RequestTooLargeError as exc:
            if uncut and "max_length" in exc.message:
                raise TooLong(exc.message) from None
            raise
        except BadRequestError as exc:
            if exc.status in (400, 422):
                raise RejectedItem(exc.message) from None
            raise
        finally:
            self.items_sent += len(items)
        versions = set(result.model_versions)
        if versions - {self.model["version"]}:
            raise EvalError(
                f"the server now serves model version {sorted(versions)}, not "
                f"{self.model['version']}: scores of two models would mix; rerun with a new --out"
            )
        if result.step_scores is not None:  # a process reward model: each item's step scores
            return list(result.step_scores)
        return list(result.scores)

    def close(self) -> None:
        self.client.close()


def served_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """What eval records of one ``/v1/models`` entry, in either of its shapes: ``{"models": [{"name",
    "version", "provider", "precision", "manifest", ...}]}``, or OpenAI's ``{"data": [{"id", ...}]}``
    with the same fields beside ``id`` (the backend perhaps as ``backend``)."""
    manifest = entry.get("manifest") or {}
    return {
        "name": entry.get("name", entry.get("id")),
        "version": entry.get("version", manifest.get("version")),
        "provider": entry.get("provider", entry.get("backend")),
        "precision": entry.get("precision", manifest.get("precision")),
        "bundle_name": manifest.get("name"),
        # A process model's rule, which sets ProcessBench's default threshold.
        **({"step_rule": entry["step_rule"]} if entry.get("step_rule") else {}),
    }


def _served_model(served: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    if not served:
        raise EvalError("the server lists no models at /v1/models")
    by_name = {m.get("name"): m for m in served}
    if name is not None:
        if name not in by_name:
            raise EvalError(f"the server does not serve {name!r}; it serves {', '.join(map(str, by_name))}")
        return by_name[name]
    if "default" in by_name:
        return by_name["default"]
    if len(served) == 1:
        return served[0]
    raise EvalError(
        f"the server serves several models ({', '.join(map(str, by_name))}); choose one with --model"
    )


def _where(row: EvalRow) -> dict[str, Any]:
    where = {"key": row.key, "file": row.file, "line": row.line, "kind": row.kind, "subset": row.subset}
    if row.row_id is not None:
        where["id"] = row.row_id
    return where


def _refused(row: EvalRow, exc: RejectedItem) -> dict[str, Any]:
    return {**_where(row), "error": str(exc), **({"too_long": True} if isinstance(exc, TooLong) else {})}


def _record(row: EvalRow, scores: list[Scored]) -> dict[str, Any]:
    record = {**_where(row), "n_chosen": row.n_chosen, "scores": scores}
    if row.kind == "process":
        record["label"] = row.label
    if row.kind == "process_best_of_n":
        record["correct"] = list(row.correct)
    if row.kind in ("process", "process_best_of_n"):  # steps kept may be fewer (truncation)
        record["n_steps"] = [len(i.steps) for i in row.items if isinstance(i, StepsItem)]
    return record


def score_chunk(scorer: Scorer, chunk: list[EvalRow]) -> list[dict[str, Any]]:
    """Records for a chunk of rows; a row the model side refuses gets an ``error`` record."""
    items = [item for row in chunk for item in row.items]
    try:
        flat = scorer.score(items)
    except RejectedItem:
        records = []
        for row in chunk:  # find the row(s) at fault; the others are scored as usual
            try:
                records.append(_record(row, scorer.score(list(row.items))))
            except RejectedItem as exc:
                records.append(_refused(row, exc))
        return records
    records, at = [], 0
    for row in chunk:
        records.append(_record(row, flat[at : at + len(row.items)]))
        at += len(row.items)
    return records
