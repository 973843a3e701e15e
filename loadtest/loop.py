"""What the largest bodies the server accepts cost a front-end's event loop, which serves every
other request meanwhile.

    python -m loadtest loop [--model imdb-gru --repository model_repository]

1. in this process, the loop's own work for a V1 predict body (parse and validate it, tokenize and
   encode every text), median of 5: the largest body accepted (RNNSERVE_MAX_BODY_BYTES of texts of
   RNNSERVE_MAX_TEXT_CHARS characters each), and 35 texts of 99k characters;
2. python -m serving (one front-end, one engine): a one-text request's latency alone, and sent while
   a request of 35 texts of 99k characters is being answered.
"""
import asyncio
import json
import statistics
import sys
import time

import httpx

from core.repository import latest, read_version
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import imdb_test_texts
from serving.frontend.schemas import PredictRequest
from serving.common.settings import Settings


def body_of(texts: list[str]) -> bytes:
    return json.dumps({"instances": texts}).encode()


def loop_ms(codec, body: bytes) -> float:
    """The front-end's work on one V1 predict body, in ms: parse, validate, encode every text."""
    started = time.perf_counter()
    for text in PredictRequest.model_validate_json(body).instances:
        codec.encode(text)
    return 1000 * (time.perf_counter() - started)


def loop(args) -> dict:
    settings = Settings()
    codec = read_version(latest(args.repository, args.model)).codec
    review = " ".join(imdb_test_texts(400, seed=3))
    longest = review[: settings.max_text_chars]
    bodies = {f"{settings.max_body_bytes // 2**20} MiB: {settings.max_body_bytes // (len(longest) + 4)} texts of "
              f"{len(longest) // 1000}k characters": body_of([longest] * (settings.max_body_bytes // (len(longest) + 4))),
              "35 texts of 99k characters": body_of([review[:99_000]] * 35)}
    results = {"machine": cpu_name(), "model": args.model, "loop_ms": {}}
    for name, body in bodies.items():
        results["loop_ms"][name] = statistics.median(loop_ms(codec, body) for _ in range(5))
        print(f"event loop, {name} ({len(body) / 1e6:.1f} MB): {results['loop_ms'][name]:.1f} ms")

    port = free_port()
    server = start("rnnserve", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1", "--engines", "1"], {"RNNSERVE_REPOSITORY": str(args.repository)},
                   port, "/v2/health/ready")
    url = f"http://127.0.0.1:{port}/v1/models/{args.model}:predict"

    async def latencies() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one() -> float:
                started = time.perf_counter()
                (await client.post(url, content=body_of([review[:300]]))).raise_for_status()
                return 1000 * (time.perf_counter() - started)

            alone = statistics.median([await one() for _ in range(20)])
            beside = []
            for _ in range(5):
                heavy = asyncio.create_task(client.post(url, content=bodies["35 texts of 99k characters"]))
                await asyncio.sleep(0.005)  # the heavy body is on its way first
                beside.append(await one())
                (await heavy).raise_for_status()
            return alone, statistics.median(beside)

    try:
        alone, beside = asyncio.run(latencies())
    finally:
        server.terminate()
        server.wait(30)
    results |= {"one_text_alone_ms": alone, "one_text_beside_35x99k_ms": beside}
    print(f"one-text request: {alone:.1f} ms alone, {beside:.1f} ms sent beside 35 texts of 99k characters")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results
