"""Prefix reuse on and off, interleaved in one run on the same engine, precision and items.

    python -m loadtests.prefix_reuse [--work /tmp/rmserve-prefix-bench] [--rounds 2] [--data FILE]

A random-init Qwen2 of about 42M parameters (hidden 512, 11 layers, 8 query and 2 key/value heads), as an
outcome bundle and as a process bundle, both exported with their prefix-reuse graph, served by rmserve's
own batcher on ONNX Runtime's CPU provider in fp32, fed the token ids rmserve's formatter makes of real
HH-RLHF text. Three workloads:

* GRPO: groups of 8 responses (50-300 tokens) to multi-turn HH prompts of 200-600 tokens, one request
  per member, 16 callers taking the members group after group;
* PRM search: problems whose solution grows from 1 to 12 steps, each scored as it grows (2 problems
  at once, each waiting for its score before its next step);
* nothing shared: one response to each of as many distinct prompts, 16 callers.

Each round runs every workload on fresh items (never seen before), in chunks (two GRPO groups, one
PRM problem, four unshared items), each chunk off then on, so the ratio is measured under the same
load on this shared machine. The fp32 scores of on and off
are compared item by item. A last section feeds a small cache more distinct prompts than it holds
and prints its bytes and the process's resident memory as it goes. A benchmark: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench import load_pairs
from rmserve.batching import Batcher, BatchPolicy
from rmserve.bundle import Bundle, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import Engine, pad_batch
from rmserve.engines.past import PastPass
from rmserve.engines.reuse import PrefixReusingEngine, with_prefix_reuse
from rmserve.engines.select import call_overhead_tokens, create_engine, default_batch_tokens
from rmserve.formatting import Encoded, Formatter
from rmserve.items import PairItem, StepsItem
from rmserve.kinds import kind_of
from rmserve.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
# The shared data beside the checkout (never copied into it); --data names another file.
DATA_CANDIDATES = [REPO / "shared" / "data", REPO.parent / "shared" / "data"]
SIZES = {
    "hidden_size": 512,
    "num_hidden_layers": 11,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 2048,
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
}
MAX_LENGTH = 1024
GROUP = 8
CALLERS = 16


def build_bundles(work: Path) -> tuple[Path, Path]:
    """The outcome and process bundles, exported once into ``work`` and reused by later runs."""
    from rmserve.models.export import export_bundle
    from rmserve.models.process_heads import StepExport
    from tests.support.tiny import STEP_TOKENS, tiny_checkpoint, tiny_process_checkpoint

    outcome, process = work / "outcome", work / "process"
    if not (outcome / "manifest.json").is_file():
        checkpoint = tiny_checkpoint("qwen2", work / "outcome-checkpoint", sizes=SIZES)
        export_bundle(checkpoint, outcome, name="qwen2-42m", max_length=MAX_LENGTH, overwrite=True)
    if not (process / "manifest.json").is_file():
        checkpoint = tiny_process_checkpoint("qwen2-tc2", work / "process-checkpoint", sizes=SIZES)
        step = StepExport(STEP_TOKENS["qwen2-tc2"], None)
        export_bundle(
            checkpoint, process, name="qwen2-42m-prm", max_length=MAX_LENGTH, step=step, overwrite=True
        )
    return outcome, process


def hh_texts(path: Path) -> tuple[list[str], list[str]]:
    """Multi-turn HH prompts (once each) and the replies of every transcript."""
    pairs = load_pairs(path, 1 << 30)
    prompts = list(dict.fromkeys(prompt for prompt, _ in pairs if prompt.count("Human:") >= 2))
    return prompts, [reply for _, reply in pairs]


class Texts:
    """Prompts of a token range and replies cut to a token count, drawn without repeats."""

    def __init__(self, formatter: Formatter, path: Path, seed: int) -> None:
        self.formatter = formatter
        self.rng = np.random.default_rng(seed)
        prompts, self.replies = hh_texts(path)
        self.rng.shuffle(prompts)
        self.prompts = iter(prompts)
        self.words = " ".join(self.replies).split()

    def tokens(self, text: str) -> int:
        return len(self.formatter.encode([PairItem(text, "")])[0].ids)

    def prompt(self, low: int, high: int) -> str:
        for text in self.prompts:
            if low <= self.tokens(text) <= high:
                return text
        raise RuntimeError("ran out of HH prompts in the range")

    def reply(self, tokens: int) -> str:
        start = int(self.rng.integers(0, len(self.words) - 2000))
        words: list[str] = []
        for word in self.words[start:]:
            words.append(word)
            if len(words) % 8 == 0 and self.tokens(" ".join(words)) - self.tokens("") >= tokens:
                break
        return " ".join(words)


def grpo(texts: Texts, groups: int) -> list[PairItem]:
    items = []
    for _ in range(groups):
        prompt = texts.prompt(200, 600)
        items += [PairItem(prompt, texts.reply(int(texts.rng.integers(50, 301)))) for _ in range(GROUP)]
    return items


def distinct(texts: Texts, n: int) -> list[PairItem]:
    return [PairItem(texts.prompt(200, 600), texts.reply(int(texts.rng.integers(50, 301)))) for _ in range(n)]


def prm(texts: Texts, problems: int, steps: int = 12) -> list[list[StepsItem]]:
    """Each problem's items in the order a search scores them: 1 step, 2 steps, ... ``steps``."""
    out = []
    for _ in range(problems):
        prompt = texts.prompt(100, 250)
        solution = tuple(texts.reply(int(texts.rng.integers(25, 61))) for _ in range(steps))
        out.append([StepsItem(prompt, solution[:k]) for k in range(1, steps + 1)])
    return out


async def batcher_for(bundle: Bundle, engine: Engine, name: str) -> Batcher:
    kind = kind_of(name, bundle, Formatter(bundle))
    budget = max(default_batch_tokens(engine.info.provider), MAX_LENGTH)
    policy = BatchPolicy(budget, 0.0, 100_000, call_overhead_tokens(engine.info.provider))
    pad = bundle.manifest.format.pad_token_id
    b = Batcher(name, engine, policy, pad_id=pad, with_type_ids=False, metrics=Metrics(), read=kind.read)
    await b.warmup(64)
    b.start()
    return b


async def drive(
    batcher: Batcher, requests: Sequence[Sequence[Encoded]], callers: int
) -> tuple[float, list[Any]]:
    """Each request in order by ``callers`` callers; a request is a chain scored one item after another."""
    waiting = list(enumerate(requests))[::-1]
    out: list[Any] = [None] * len(requests)

    async def caller() -> None:
        while waiting:
            i, chain = waiting.pop()
            values = []
            for item in chain:
                values.append((await asyncio.gather(*batcher.submit([item], time.monotonic() + 3600)))[0])
            out[i] = values

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - started, out


def flat(values: Any) -> list[float]:
    """Every number in nested lists and tuples (scores, and a process model's step values)."""
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in flat(v)]
    return [float(values)]


def max_difference(a: list[Any], b: list[Any]) -> float:
    return float(np.abs(np.array(flat(a)) - np.array(flat(b))).max())


def engines(bundle: Bundle, **reuse: Any) -> tuple[Engine, Engine]:
    settings = Settings(provider="cpu", precision="fp32", **reuse)
    plain = create_engine(bundle, settings)[0]
    reusing, about = with_prefix_reuse(
        create_engine(bundle, settings)[0], bundle, settings, lambda e, n: None
    )
    assert about["enabled"], about
    return plain, reusing


async def compare(
    label: str,
    bundle: Bundle,
    off: Batcher,
    on: Batcher,
    requests: list[list[Any]],
    callers: int,
    chunk: int,
) -> dict[str, Any]:
    """``requests`` in chunks of ``chunk``, each chunk run off and on (which first alternates from
    chunk to chunk), so both see the same load."""
    kind = kind_of(label, bundle, Formatter(bundle))
    encoded = [kind.encode(chain) for chain in requests]
    items = sum(len(c) for c in encoded)
    tokens = sum(len(e) for c in encoded for e in c)
    seconds = {"off": 0.0, "on": 0.0}
    values: dict[str, list[Any]] = {"off": [], "on": []}
    for n, start in enumerate(range(0, len(encoded), chunk)):
        part = encoded[start : start + chunk]
        sides = [("off", off), ("on", on)]
        for side, batcher in sides if n % 2 == 0 else sides[::-1]:
            elapsed, got = await drive(batcher, part, callers)
            seconds[side] += elapsed
            values[side] += got
    return {
        "workload": label,
        "items": items,
        "tokens": tokens,
        "off_items_s": items / seconds["off"],
        "on_items_s": items / seconds["on"],
        "ratio": seconds["off"] / seconds["on"],
        "max_diff": max_difference(values["off"], values["on"]),
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def mask_cost(bundle: Bundle, texts: Texts, items: int = 4, repeats: int = 3) -> str:
    """The same items whole through the bundle's graph (no mask) and the prefix-reuse graph with an
    empty past (explicit mask, presents not fetched): what the mask costs an item that reuses nothing."""
    plain, reusing = engines(bundle)
    assert isinstance(reusing, PrefixReusingEngine)
    kind = kind_of("mask", bundle, Formatter(bundle))
    rows = [e.ids for e in kind.encode(distinct(texts, items))]
    pad = bundle.manifest.format.pad_token_id
    times = {"plain": 0.0, "past": 0.0}
    for _ in range(repeats):
        for ids in rows:
            batch = pad_batch([ids], pad)
            started = time.perf_counter()
            plain.infer(batch)
            times["plain"] += time.perf_counter() - started
            keys, values = reusing.runner.empty(1)
            step = PastPass(batch.input_ids, batch.attention_mask, np.zeros((1, 0), np.int64), keys, values)
            started = time.perf_counter()
            reusing.runner.run(step, presents=False)
            times["past"] += time.perf_counter() - started
    reusing.close()
    n = repeats * len(rows)
    return (
        f"attention with a past, {len(rows)} items of {min(map(len, rows))}-{max(map(len, rows))} tokens "
        f"x {repeats}: "
        f"lean graph {1000 * times['plain'] / n:.0f} ms/item, prefix-reuse graph (explicit mask, empty past) "
        f"{1000 * times['past'] / n:.0f} ms/item: {times['past'] / times['plain']:.3f}x"
    )


async def budget_section(bundle: Bundle, texts: Texts, groups: int) -> list[str]:
    """A 16 MB cache fed more distinct prompts than it holds: its bytes and the process's memory."""
    _, reusing = engines(bundle, prefix_cache_mb=16)
    assert isinstance(reusing, PrefixReusingEngine)
    b = await batcher_for(bundle, reusing, "budget")
    kind = kind_of("budget", bundle, Formatter(bundle))
    lines = ["| groups scored | cache bytes | cache entries | resident MB |", "| ---: | ---: | ---: | ---: |"]
    for done in range(1, groups + 1):
        encoded = kind.encode(grpo(texts, 1))
        await drive(b, [[e] for e in encoded], CALLERS)
        stats = reusing.cache.stats()
        lines.append(f"| {done} | {stats.bytes:,} | {stats.entries} | {rss_mb():.0f} |")
    await b.stop()
    return lines


async def main_async(args: argparse.Namespace) -> None:
    outcome_dir, process_dir = build_bundles(args.work)
    outcome, process = load_bundle(outcome_dir), load_bundle(process_dir)
    texts = Texts(Formatter(outcome), args.data, args.seed)
    params = sum(int(np.prod(a.dims)) for a in _initializers(outcome_dir / "model.onnx"))
    print(f"model: random-init Qwen2, {params / 1e6:.1f}M parameters, fp32, ONNX Runtime CPU", flush=True)
    results = []
    for label, bundle in (("outcome", outcome), ("process", process)):
        plain, reusing = engines(bundle)
        off, on = await batcher_for(bundle, plain, label + "-off"), await batcher_for(bundle, reusing, label)
        print(f"{label}: {plain.info.threads} threads, {plain.info.streams} streams", flush=True)
        for r in range(args.rounds):
            if label not in args.bundles:
                break
            if label == "outcome":
                groups = [[item] for item in grpo(texts, args.groups)]
                alone = [[item] for item in distinct(texts, args.distinct)]
                rows = [
                    await compare("GRPO", bundle, off, on, groups, CALLERS, 2 * GROUP),
                    await compare("nothing shared", bundle, off, on, alone, CALLERS, 4),
                ]
            else:
                chains = prm(texts, args.problems)
                rows = [await compare("PRM search", bundle, off, on, chains, args.problems, 1)]
            for row in rows:
                results.append(row | {"round": r + 1})
                print(
                    json.dumps({k: round(v, 7) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
        await off.stop()
        await on.stop()
    print(
        "\n| round | workload | items | tokens | off items/s | on items/s | on / off | max abs diff (fp32) |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        print(
            f"| {row['round']} | {row['workload']} | {row['items']} | {row['tokens']:,} "
            f"| {row['off_items_s']:.2f} | {row['on_items_s']:.2f} | {row['ratio']:.2f}x "
            f"| {row['max_diff']:.1e} |"
        )
    print("\n" + mask_cost(outcome, texts), flush=True)
    print("\ncache under more distinct prompts than fit (16 MB budget):")
    print("\n".join(await budget_section(outcome, texts, args.budget_groups)))


def _initializers(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.initializer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rmserve-prefix-bench"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="GRPO groups per round")
    parser.add_argument("--distinct", type=int, default=12, help="nothing-shared items per round")
    parser.add_argument("--problems", type=int, default=2, help="PRM search problems per round")
    parser.add_argument("--budget-groups", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bundles", nargs="+", default=["outcome", "process"], help="outcome: GRPO and nothing shared"
    )
    data = next((d for d in DATA_CANDIDATES if (d / "hh-rlhf").is_dir()), DATA_CANDIDATES[-1])
    parser.add_argument("--data", type=Path, default=data / "hh-rlhf" / "train.jsonl.gz")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
