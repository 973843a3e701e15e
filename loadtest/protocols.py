"""What the protocol costs, what tracing costs, and what plain text costs over V2: one model, one
run, one machine.

    python -m loadtest protocols --model imdb-gru [--rows 32 --users 64 --seconds 5 --repeats 3]

1. the same requests of --rows pre-tokenized IMDB rows each as V2 infer with JSON tensors, with
   binary tensors (in and out, as tritonclient.http sends them) and over gRPC (raw contents),
   against one python -m serving; sequences/s, p50, p99, server CPU per request;
2. python -m serving with tracing off, with RNNSERVE_TRACING=otlp exporting every request's spans
   to a receiver process on 127.0.0.1 (python -m loadtest.otlp), and the same with OpenTelemetry's
   standard sampler keeping 1 trace in 10 (OTEL_TRACES_SAMPLER=parentbased_traceidratio) and
   keeping none (its ratio 0: what tracing costs a request it does not record); one short text
   per V1 predict (--modes: which of the three besides off). --no-protocols measures part 2 alone;
   --baseline DIR measures the server of another checkout (before a change) at each of its points
   too, in the same rounds.
3. plain text to the classifier, V1 :predict against V2 infer's text_input (JSON, binary as
   tritonclient.http sends it, gRPC raw contents), the same texts, and beside them the same texts
   as V2 token ids (JSON: what the V2 protocol costs without the text), at each of --text-points
   (USERSxTEXTS: users, texts per request); requests/s, p50, p99, server CPU per request.
   --no-texts skips it; --no-protocols --no-tracing measures it alone.
Points are interleaved (the order turns every round) and the median of --repeats is reported.
Writes results.json and results.md under --out.
"""
import asyncio
import json
import multiprocessing
import os
import sys
import time

from core.codec import pad
from core.repository import latest
from loadtest.bench import measure, median_point
from loadtest.client import LoadResult, load_in_processes, timed
from loadtest.otlp import Receiver
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import (predict_body, serialized, texts, token_rows, v2_binary_body, v2_body,
                                v2_text_binary_body, v2_text_body)


async def grpc_users(port: int, requests: list[bytes], users: int, duration_s: float) -> LoadResult:
    """`users` concurrent ModelInfer calls in a loop over one channel (HTTP/2 multiplexes them)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
    messages = [pb.ModelInferRequest.FromString(r) for r in requests]
    result = LoadResult()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.perf_counter() + duration_s

        async def user(i: int):
            while time.perf_counter() < deadline:
                sent_at = time.perf_counter()
                try:
                    await stub.ModelInfer(messages[i % len(messages)], timeout=30)
                    status = 200
                except grpc.aio.AioRpcError as e:
                    status = e.code().name
                result.latencies_s.append(time.perf_counter() - sent_at)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                result.errors += status != 200
                i += users

        started = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(users)))
        result.elapsed_s = time.perf_counter() - started
    return result


def grpc_part(args) -> LoadResult:
    return timed(grpc_users, args)


def grpc_load(host: str, port: int, requests: list[bytes], users: int, duration_s: float, processes: int = 1) -> LoadResult:
    """grpc_users in its own process (the load generator's CPU counted, as the HTTP client's is)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(grpc_part, ((port, requests, users, duration_s),))


def grpc_text_request(model: str, texts_: list[str]) -> bytes:
    """text_input as tritonclient.grpc sends it: BYTES serialized in raw_input_contents."""
    from tritonclient.grpc import service_pb2 as pb
    return pb.ModelInferRequest(model_name=model, raw_input_contents=[serialized(texts_)], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[len(texts_)])]).SerializeToString()


def grpc_request(model: str, rows: list[list[int]]) -> bytes:
    from tritonclient.grpc import service_pb2 as pb
    ids, lengths = pad(rows)
    tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(model_name=model, raw_input_contents=[ids.tobytes(), lengths.tobytes()],
                                inputs=[tensor(name="input_ids", datatype="INT64", shape=ids.shape),
                                        tensor(name="lengths", datatype="INT64", shape=lengths.shape)]).SerializeToString()


def rotated(items: list, by: int) -> list:
    return items[by % len(items):] + items[:by % len(items)]


def protocols(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                           "date": time.strftime("%Y-%m-%d %H:%M")},
               "model": args.model, "rows": args.rows, "users": args.users, "seconds": args.seconds,
               "repeats": args.repeats, "protocols": {}, "tracing": {}, "texts": {}}
    base = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--repository", str(args.repository)]

    if args.protocols:
        results["protocols"] = protocol_cost(args, base)
    if args.tracing:
        results["tracing"], results["baseline"], results["spans_received"] = tracing_cost(args, base)
    if args.texts:
        results["texts"] = text_cost(args, base)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return results


def protocol_cost(args, base: list[str]) -> dict:
    """Part 1: name -> median point, one server for every protocol."""
    rows = token_rows(latest(args.repository, args.model), texts("short", 2048, seed=3))
    chunks = [rows[i: i + args.rows] for i in range(0, len(rows) - args.rows + 1, args.rows)]
    path = f"/v2/models/{args.model}/infer"
    binary = [v2_binary_body(*c) for c in chunks]
    requests = {"v2 JSON": [(path, v2_body(*c)) for c in chunks],
                "v2 binary": [(path, body, b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
                               b"%d\r\n" % length) for body, length in binary],
                "gRPC": [grpc_request(args.model, c) for c in chunks]}
    port, grpc_port = free_port(), free_port()
    server = start("rnnserve", base + ["--port", str(port)], {"RNNSERVE_GRPC_PORT": str(grpc_port)}, port, "/v2/health/ready")
    raw = {}
    try:
        for round_ in range(args.repeats):
            for name in rotated(list(requests), round_):
                grpc = name == "gRPC"
                point = measure(server.pid, grpc_port if grpc else port, requests[name], args.users, args.seconds, 1,
                                args.rows, load=grpc_load if grpc else load_in_processes)
                raw.setdefault(name, []).append(point)
                print(f"{name:10s} {point['sequences_per_s']:8.0f} seq/s p50 {point['p50_ms']:6.1f} ms "
                      f"p99 {point['p99_ms']:6.1f} ms errors {point['errors']}")
    finally:
        server.terminate()
        server.wait(30)
    return {k: median_point(v) for k, v in raw.items()}


def text_cost(args, base: list[str]) -> dict:
    """Part 3: "USERSxTEXTS" -> protocol -> median point, one server: V1 predict, V2 ids (JSON) and
    V2 text_input over JSON, binary and gRPC, the same texts in the same chunks."""
    stream = texts("short", 2048, seed=5)
    ids = token_rows(latest(args.repository, args.model), stream)
    path, predict = f"/v2/models/{args.model}/infer", f"/v1/models/{args.model}:predict"
    binary_header = b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
    points = {}
    for point in args.text_points:
        users, per = map(int, point.split("x"))
        starts = range(0, len(stream) - per + 1, per)
        chunks = [stream[i: i + per] for i in starts]
        points[point] = (users, per, {
            "V1 predict": [(predict, predict_body(*c)) for c in chunks],
            "V2 ids JSON": [(path, v2_body(*ids[i: i + per])) for i in starts],  # the same texts, tokenized here
            "V2 text JSON": [(path, v2_text_body(*c)) for c in chunks],
            "V2 text binary": [(path, body, binary_header % length)
                               for body, length in (v2_text_binary_body(*c) for c in chunks)],
            "V2 text gRPC": [grpc_text_request(args.model, c) for c in chunks]})
    port, grpc_port = free_port(), free_port()
    server = start("rnnserve", base + ["--port", str(port)], {"RNNSERVE_GRPC_PORT": str(grpc_port)}, port, "/v2/health/ready")
    raw = {}
    try:
        for round_ in range(args.repeats):
            for point, name in rotated([(p, n) for p in points for n in points[p][2]], round_):
                users, per, requests = points[point]
                grpc = name.endswith("gRPC")
                measured = measure(server.pid, grpc_port if grpc else port, requests[name], users, args.seconds, 1, per,
                                   load=grpc_load if grpc else load_in_processes)
                raw.setdefault(point, {}).setdefault(name, []).append(measured)
                print(f"{point:6s} {name:15s} {measured['requests_per_s']:8.0f} req/s p50 {measured['p50_ms']:6.1f} ms "
                      f"p99 {measured['p99_ms']:6.1f} ms errors {measured['errors']}")
    finally:
        server.terminate()
        server.wait(30)
    return {point: {name: median_point(v) for name, v in by_name.items()} for point, by_name in raw.items()}


def tracing_cost(args, base: list[str]) -> tuple[dict, dict, int]:
    """Part 2: (mode -> median point, the same of --baseline's checkout or {}, spans the receiver got)."""
    receiver = Receiver(free_port())  # its gRPC server answers from threads of this process
    traced = {"RNNSERVE_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
              "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    ratio = lambda r: traced | {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": r}  # noqa: E731
    modes = {"off": {}, "otlp, every request": traced, "otlp, 1 in 10 sampled": ratio("0.1"),
             "otlp, nothing sampled": ratio("0")}
    modes = {name: env for name, env in modes.items() if name == "off" or name.split(", ")[1] in args.modes}
    checkouts = [None, args.baseline] if args.baseline else [None]  # None: this one
    predicts = [(f"/v1/models/{args.model}:predict", predict_body(t)) for t in texts("short", 2000, seed=4)]
    raw = {}
    try:
        for round_ in range(args.repeats):
            for checkout, mode in rotated([(c, m) for c in checkouts for m in modes], round_):
                port, other = free_port(), {"PYTHONPATH": str(checkout.resolve())} if checkout else {}
                server = start("rnnserve-tracing", base + ["--port", str(port)], modes[mode] | other, port,
                               "/v2/health/ready", cwd=checkout)
                try:
                    point = measure(server.pid, port, predicts, args.users, args.seconds, 1, 1)
                finally:
                    server.terminate()
                    server.wait(30)
                raw.setdefault((checkout, mode), []).append(point)
                print(f"tracing {mode:22s} {point['requests_per_s']:8.0f} req/s p50 {point['p50_ms']:6.1f} ms "
                      f"p99 {point['p99_ms']:6.1f} ms errors {point['errors']}{' (baseline)' if checkout else ''}")
    finally:
        receiver.stop()
    medians = {key: median_point(v) for key, v in raw.items()}
    return ({m: medians[None, m] for m in modes}, {m: medians[args.baseline, m] for m in modes if args.baseline},
            len(receiver.spans))


def markdown(r: dict) -> str:
    m, p, t = r["machine"], r["protocols"], r["tracing"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; {m['date']}. Model {r['model']}; {r['users']} users; "
             f"{r['seconds']} s per point, median of {r['repeats']}, interleaved."]
    if p:
        lines += ["", f"| V2 infer, {r['rows']} rows per request | sequences/s | requests/s | p50 ms | p99 ms | "
                  "front-end / engine CPU ms/request | vs JSON |", "|---|---|---|---|---|---|---|"]
        for name, v in p.items():
            lines.append(f"| {name} | {v['sequences_per_s']:.0f} | {v['requests_per_s']:.0f} | {v['p50_ms']:.1f} | "
                         f"{v['p99_ms']:.1f} | {v['frontend_cpu_ms_per_request']:.3f} / "
                         f"{v['engine_cpu_ms_per_request']:.3f} | {v['sequences_per_s'] / p['v2 JSON']['sequences_per_s']:.2f}x |")
        lines += ["", f"gRPC / binary REST: {p['gRPC']['sequences_per_s'] / p['v2 binary']['sequences_per_s']:.2f}."]
    for point, by_name in r.get("texts", {}).items():
        users, per = point.split("x")
        lines += ["", f"| plain text, {users} users, {per} texts per request | requests/s | texts/s | p50 ms | p99 ms | "
                  "front-end / engine CPU ms/request | vs V1 |", "|---|---|---|---|---|---|---|"]
        for name, v in by_name.items():
            lines.append(f"| {name} | {v['requests_per_s']:.0f} | {v['sequences_per_s']:.0f} | {v['p50_ms']:.1f} | "
                         f"{v['p99_ms']:.1f} | {v['frontend_cpu_ms_per_request']:.3f} / "
                         f"{v['engine_cpu_ms_per_request']:.3f} | "
                         f"{v['requests_per_s'] / by_name['V1 predict']['requests_per_s']:.2f}x |")
    if not t:
        return "\n".join(lines) + "\n"
    lines += ["", "| V1 predict, one short text | requests/s | p50 ms | p99 ms | front-end / engine CPU ms/request | vs off |",
              "|---|---|---|---|---|---|"]
    for which, points in (("", t), ("baseline: ", r.get("baseline") or {})):
        for mode, v in points.items():
            lines.append(f"| {which}tracing {mode} | {v['requests_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                         f"{v['frontend_cpu_ms_per_request']:.3f} / {v['engine_cpu_ms_per_request']:.3f} | "
                         f"{v['requests_per_s'] / points['off']['requests_per_s']:.2f} |")
    lines.append(f"\n{r['spans_received']} spans received by the OTLP receiver.")
    return "\n".join(lines) + "\n"
