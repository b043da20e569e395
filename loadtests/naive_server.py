"""The naive baseline: a FastAPI handler that runs the PyTorch model per request.

This is the shape of OpenRLHF's ``serve_rm.py``: tokenize the request's texts, one forward pass,
answer; no batching across requests, the model called inside the async handler. Run it with
``python -m loadtests.naive_server CHECKPOINT_DIR PORT``.
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class Pair(BaseModel):
    prompt: str
    response: str


class Request(BaseModel):
    items: list[Pair]


def create_naive_app(checkpoint: str, max_length: int = 512) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1).eval()
    app = FastAPI()

    @app.post("/v1/score")
    async def score(req: Request) -> dict[str, list[float]]:
        enc = tokenizer(
            [p.prompt for p in req.items],
            [p.response for p in req.items],
            padding=True,
            truncation="only_first",
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = model(**enc).logits[:, 0]
        return {"scores": logits.tolist()}

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
    uvicorn.run(create_naive_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
