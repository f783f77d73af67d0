"""The naive baseline: the same model behind an endpoint that serves one request at a time, no batching.

    python -m benchmarks.naive_server --port 8001 [--model shakespeare]

Same request and SSE format as the service's /generate (enough for the load generator).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import torch
import uvicorn
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse

from service.model import store
from service.sampling import SamplingParams


def build(model_ref: str) -> FastAPI:
    loaded = store.load(model_ref)
    model, vocab = loaded.model, loaded.vocab
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    @torch.inference_mode()
    def generate(prompt: str, n: int, temperature: float, seed: int, emit) -> None:
        g = torch.Generator().manual_seed(seed)
        logits, state = model(torch.tensor([vocab.encode(prompt or "\n")]))
        for _ in range(n):
            probs = torch.softmax(logits[0, -1] / max(temperature, 1e-6), -1)
            nxt = torch.multinomial(probs, 1, generator=g)
            emit(vocab.chars[int(nxt)])
            logits, state = model(nxt.view(1, 1), state)

    @app.post("/generate")
    async def gen(request: Request):
        body = await request.json()
        p = SamplingParams(temperature=body.get("temperature", 1.0))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def events():
            async with lock:  # one request at a time
                task = loop.run_in_executor(None, generate, body.get("prompt", ""), body.get("max_new_tokens", 256),
                                            p.temperature, body.get("seed", 0),
                                            lambda ch: loop.call_soon_threadsafe(queue.put_nowait, ch))
                task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
                i = 0
                while (ch := await queue.get()) is not None:
                    yield {"event": "token", "data": json.dumps({"index": i, "text": ch})}
                    i += 1
                yield {"event": "done", "data": json.dumps({"finish_reason": "length"})}

        return EventSourceResponse(events())

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port, log_level="warning")
