"""What a state token costs a session step: its bytes and microseconds, and the requests/s of a
step that carries it against a step by session id.

    python -m loadtest state [--lm timemachine-gru --repository model_repository --users 16 --seconds 5 --repeats 3]

1. A token's size and the time to seal it (sign and encode) and unseal it (decode and verify), in
   this process: for --lm's state, the tests' tiny lm, a 1-layer GRU of 256 units and a 2-layer
   LSTM of 512.
2. One python -m serving over --repository with RNNSERVE_STATE_KEY set; --users chains of steps,
   each step one short piece of text, over keep-alive connections: by session id
   (POST /v1/models/{lm}/sessions/{id}:step) and carrying the token (POST /v1/models/{lm}:step
   with the last answer's state), the two interleaved (the order turns every round), the median
   of --repeats; requests/s, p50, p99 and the server's CPU per step.
Writes results.json and results.md under --out.
"""
import asyncio
import json
import os
import secrets
import sys
import time
import timeit

from core.repository import latest, read_version
from loadtest.bench import measure, median_point
from loadtest.client import JSON, LoadResult, close, read_response, timed
from loadtest.protocols import rotated
from loadtest.servers import cpu_name, free_port, start
from serving.frontend.core.state_token import Carried, seal, unseal

TEXT = ("the time traveller (for so it will be convenient to speak of him) was expounding a recondite matter to us. "
        "his grey eyes shone and twinkled, and his usually pale face was flushed and animated.")
PIECE = 16  # characters per step
SHAPES = {"the tests' tiny lm: 2-layer GRU, 12 units": ("lm", 2 * 12),  # (model name, floats)
          "1-layer GRU, 256 units": ("timemachine-gru", 1 * 256),
          "2-layer LSTM, 512 units (h and c)": ("timemachine-lstm", 2 * 512 * 2)}


def token_cost(model: str, floats: int, number: int = 2000) -> dict:
    """A token of `floats` float32 for `model`: its characters and the µs to seal and to unseal it."""
    key, carried = secrets.token_bytes(32), Carried(model, 1, 1234, os.urandom(4 * floats))
    token = seal(key, carried)
    sealed = min(timeit.repeat(lambda: seal(key, carried), number=number, repeat=5)) / number
    unsealed = min(timeit.repeat(lambda: unseal(key, token, model), number=number, repeat=5)) / number
    return {"state_bytes": 4 * floats, "token_chars": len(token), "seal_us": 1e6 * sealed, "unseal_us": 1e6 * unsealed}


async def chain(host: str, port: int, lm: str, mode: str, deadline: float, result: LoadResult, offset: int):
    """One user: a chain of steps over one keep-alive connection, by session id or by token."""
    reader, writer = connection = await asyncio.open_connection(host, port)
    path, state, i = f"/v1/models/{lm}:step", None, offset

    async def post(target: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        sent_at = time.perf_counter()
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            target.encode(), host.encode(), JSON, len(data), data))
        status, answer, _ = await read_response(reader, sent_at, result)
        result.latencies_s.append(time.perf_counter() - sent_at)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        result.errors += status != 200
        return status, json.loads(answer)
    try:
        if mode == "session id":
            _, opened = await post(f"/v1/models/{lm}/sessions", {})
            path = f"/v1/models/{lm}/sessions/{opened['session_id']}:step"
            result.latencies_s.pop()  # the open is not a step
        while time.perf_counter() < deadline:
            start_at = i * PIECE % (len(TEXT) - PIECE)
            body = {"text": TEXT[start_at: start_at + PIECE]} | ({"state": state} if state else {})
            status, answer = await post(path, body)
            state = answer.get("state") if status == 200 and mode == "token" else None
            i += 1
    finally:
        close(connection)


async def chains(host: str, port: int, requests: list, users: int, duration_s: float) -> LoadResult:
    """`users` chains of the mode requests[0] names, for duration_s."""
    (lm, mode), result = requests[0], LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(chain(host, port, lm, mode, started + duration_s, result, u) for u in range(users)))
    result.elapsed_s = time.perf_counter() - started
    return result


def chains_load(host: str, port: int, requests: list, users: int, duration_s: float, processes: int = 1) -> LoadResult:
    return timed(chains, (host, port, requests, users, duration_s))


def state(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    spec = read_version(latest(args.repository, args.lm)).manifest.state
    shapes = {f"{args.lm} ({spec.layers} x {spec.hidden_size} x {len(spec.inputs)})":
              (args.lm, spec.layers * spec.hidden_size * len(spec.inputs))} | SHAPES
    results = {"machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                           "date": time.strftime("%Y-%m-%d %H:%M")},
               "lm": args.lm, "users": args.users, "seconds": args.seconds, "repeats": args.repeats,
               "tokens": {shape: token_cost(*named) for shape, named in shapes.items()}, "steps": {}}
    port = free_port()
    env = {"RNNSERVE_STATE_KEY": secrets.token_hex(32)}
    server = start("rnnserve", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port),
                                "--repository", str(args.repository)], env, port, "/v2/health/ready")
    raw = {}
    try:
        for round_ in range(args.repeats):
            for mode in rotated(["session id", "token"], round_):
                point = measure(server.pid, port, [(args.lm, mode)], args.users, args.seconds, 1, 1, load=chains_load)
                raw.setdefault(mode, []).append(point)
                print(f"{mode:10s} {point['requests_per_s']:8.0f} steps/s p50 {point['p50_ms']:6.1f} ms "
                      f"p99 {point['p99_ms']:6.1f} ms errors {point['errors']}")
    finally:
        server.terminate()
        server.wait(30)
    results["steps"] = {mode: median_point(points) for mode, points in raw.items()}
    results["round_ratios"] = [token["requests_per_s"] / by_id["requests_per_s"]
                               for by_id, token in zip(raw["session id"], raw["token"])]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"{m['date']}, {m['cpu']} ({m['cores']} cores)", "",
             "| state | bytes | token (characters) | seal µs | unseal µs |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {t['state_bytes']:,} | {t['token_chars']:,} | {t['seal_us']:.1f} | {t['unseal_us']:.1f} |"
              for name, t in r["tokens"].items()]
    lines += ["", f"{r['lm']}, {r['users']} chains of {PIECE}-character steps, median of {r['repeats']} x "
                  f"{r['seconds']:g} s:", "",
              "| step | steps/s | p50 ms | p99 ms | server CPU ms/step | errors |", "|---|---|---|---|---|---|"]
    lines += [f"| by {mode} | {p['requests_per_s']:.0f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
              f"{p['frontend_cpu_ms_per_request'] + p['engine_cpu_ms_per_request']:.2f} | {p['errors']:.0f} |"
              for mode, p in r["steps"].items()]
    by_id, by_token = (r["steps"].get(k, {}).get("requests_per_s") for k in ("session id", "token"))
    if by_id and by_token:
        lines += ["", f"token / session id: {by_token / by_id:.2f}x (the medians); per round: "
                      f"{', '.join(f'{x:.2f}x' for x in r['round_ratios'])}"]
    return "\n".join(lines) + "\n"
