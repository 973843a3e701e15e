"""Generation beside classification: what classifier load does to the pace of the streams.

    python -m loadtest mixed [--model imdb-gru --lm timemachine-gru --repository model_repository]
                             [--streams 16 --users 64 --seconds 5 --repeats 2] [--server-env RNNSERVE_X=V ...]

python -m serving (its default layout, with --server-env) and --streams users each streaming 200
tokens of --lm at a time (:generate), alone, then beside --users users classifying whole IMDB
reviews with --model, alternately, --repeats times each; the two loads run in processes of their
own. Reported for each: the gaps between the body chunks a stream's client reads (p50, p99, max: a
step the engine ran late shows here; the front-end paces chunks at RNNSERVE_STREAM_INTERVAL_MS),
streams and classifier requests answered per second, errors. Writes results.json and results.md
under --out.
"""
import json
import multiprocessing
import statistics
import time

import numpy as np

from loadtest.bench import generation_requests
from loadtest.client import LoadResult, load_part
from loadtest.servers import cpu_name, start_rnnserve
from loadtest.workloads import predict_body, texts

ALONE, BESIDE = "streams alone", "streams beside the classifier users"


def point(streams: LoadResult, classifier: LoadResult | None = None) -> dict:
    gaps = 1000 * np.array(streams.chunk_gaps_s or [0.0])
    return {"gap_p50_ms": float(np.percentile(gaps, 50)), "gap_p99_ms": float(np.percentile(gaps, 99)),
            "gap_max_ms": float(gaps.max()), "streams_per_s": len(streams.latencies_s) / streams.elapsed_s,
            "classifier_requests_per_s": len(classifier.latencies_s) / classifier.elapsed_s if classifier else 0.0,
            "errors": streams.errors + streams.lost + (classifier.errors + classifier.lost if classifier else 0)}


def mixed(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    server, port = start_rnnserve(args.repository, args.server_env)
    streams = ("127.0.0.1", port, generation_requests("generate", args.lm, max_tokens=200), args.streams, args.seconds)
    reviews = [(f"/v1/models/{args.model}:predict", predict_body(text)) for text in texts("long", 800, seed=5)]
    classifier = ("127.0.0.1", port, reviews, args.users, args.seconds)
    rounds = {ALONE: [], BESIDE: []}
    try:
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            for _ in range(args.repeats):
                for condition, loads in ((ALONE, [streams]), (BESIDE, [streams, classifier])):
                    measured = point(*pool.map(load_part, loads))
                    rounds[condition].append(measured)
                    print(f"{condition:36s} chunk gaps p50 {measured['gap_p50_ms']:.1f} ms, p99 "
                          f"{measured['gap_p99_ms']:.1f} ms, max {measured['gap_max_ms']:.1f} ms; "
                          f"{measured['streams_per_s']:.1f} streams/s, {measured['classifier_requests_per_s']:.0f} "
                          f"classifier req/s, {measured['errors']} errors", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    points = {condition: {key: statistics.median(p[key] for p in measured) for key in measured[0]}
              for condition, measured in rounds.items()}
    results = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "lm": args.lm,
               "streams": args.streams, "users": args.users, "server_env": args.server_env, "points": points,
               "raw": rounds}
    table = "\n".join([f"{results['machine']}; {results['date']}; {args.streams} streams of {args.lm}, {args.users} "
                       f"users of {args.model} (long reviews); medians of {args.repeats} rounds", "",
                       "| condition | chunk gap p50 ms | p99 ms | max ms | streams/s | classifier req/s | errors |",
                       "|---|---:|---:|---:|---:|---:|---:|"] + [
        f"| {condition} | {p['gap_p50_ms']:.1f} | {p['gap_p99_ms']:.1f} | {p['gap_max_ms']:.1f} | "
        f"{p['streams_per_s']:.1f} | {p['classifier_requests_per_s']:.0f} | {p['errors']:.0f} |"
        for condition, p in points.items()]) + "\n"
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table)
    print(table)
    return results
