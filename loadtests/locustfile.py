"""Load shapes of rmserve's callers, for a cluster or loopback.

    locust -f loadtests/locustfile.py --host http://rmserve:8000 --headless -u 64 -r 16 -t 2m

- TrainerUser: an RL trainer's reward calls: one sample per request, OpenRLHF (/get_reward) and
  TRL-style (/v1/score), fresh text every time (cache misses);
- EvalUser: a researcher scoring an eval set: large requests of 64 items;
- HotCacheUser: the same few pairs again and again (GRPO groups, eval reruns): cache hits.

RMSERVE_API_KEY, if set, is sent as a Bearer token. The text is synthetic, built from word lists,
so the load test needs no data files.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

_WORDS = [
    *("the", "model", "answer", "question", "helpful", "careful", "explain", "reason", "step"),
    *("result", "because", "however", "sorry", "cannot", "help", "please", "thanks", "example"),
    *("code", "water", "bread", "travel", "music", "science", "history"),
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _pair(rng: random.Random) -> dict[str, str]:
    return {"prompt": _sentence(rng, rng.randint(8, 60)), "response": _sentence(rng, rng.randint(8, 120))}


class _RMUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        self.rng = random.Random()
        key = os.environ.get("RMSERVE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"


class TrainerUser(_RMUser):
    weight = 8
    wait_time = between(0.0, 0.05)

    @task(3)
    def openrlhf_one_sample(self) -> None:
        pair = _pair(self.rng)
        prompt = "\n\nHuman: " + pair["prompt"] + "\n\nAssistant:"
        self.client.post(
            "/get_reward",
            json={"query": [prompt + " " + pair["response"]], "prompts": [prompt], "labels": [""]},
            name="/get_reward (1 sample)",
        )

    @task(1)
    def score_one_pair(self) -> None:
        self.client.post("/v1/score", json={"items": [_pair(self.rng)]}, name="/v1/score (1 item)")


class EvalUser(_RMUser):
    weight = 1
    wait_time = between(0.1, 0.5)

    @task
    def score_batch(self) -> None:
        self.client.post(
            "/v1/score", json={"items": [_pair(self.rng) for _ in range(64)]}, name="/v1/score (64 items)"
        )


class HotCacheUser(_RMUser):
    weight = 2
    wait_time = between(0.0, 0.05)
    _fixed = [_pair(random.Random(i)) for i in range(16)]

    @task
    def repeat(self) -> None:
        self.client.post("/v1/score", json={"items": self.rng.sample(self._fixed, 4)}, name="/v1/score (hot)")
