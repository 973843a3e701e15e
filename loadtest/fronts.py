"""What a generation front costs: the same streamed generations through :generate and through
OpenAI's completions (/openai/v1/completions, stream: true), against one python -m serving.

    python -m loadtest fronts [--lm timemachine-gru --streams 64 --seconds 6 --repeats 3]

Each of --streams users streams 100 sampled tokens (the same prompts and seeds on both fronts,
temperature 1, no stop: every stream runs its whole length), then the next. The fronts alternate
within each round (the order turns every round); the median of --repeats is reported: tokens/s,
time to the first chunk, and the HTTP front-end's CPU per token; and the ratio of the fronts'
tokens/s in each round (its two points measured one after the other, so that a machine whose
speed drifts moves them together) and that ratio's median. Writes results.json and results.md
under --out.
"""
import json
import statistics
import time

from loadtest.bench import generation_point, median_point
from loadtest.servers import cpu_name, start_rnnserve

FRONTS = ("generate", "openai")


def fronts(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    proc, port = start_rnnserve(args.repository, args.server_env)
    raw: dict[str, list] = {front: [] for front in FRONTS}
    try:
        generation_point(proc.pid, port, args.lm, args.streams, 1, 1)  # warm up
        for round_ in range(args.repeats):
            for front in FRONTS[round_ % 2:] + FRONTS[: round_ % 2]:
                point = generation_point(proc.pid, port, args.lm, args.streams, args.seconds, 1, front)
                raw[front].append(point)
                print(f"{front:8s} {args.streams} streams: {point['tokens_per_s']:7.0f} tokens/s, first chunk p50 "
                      f"{point['ttft_p50_ms']:.1f} ms, front-end CPU {point['frontend_cpu_us_per_token']:.1f} us/token, "
                      f"errors {point['errors']}{'  (disturbed)' if point['disturbed'] else ''}")
    finally:
        proc.terminate()
        proc.wait(30)
    points = {front: median_point(v) for front, v in raw.items()}
    ratio = points["openai"]["tokens_per_s"] / points["generate"]["tokens_per_s"]
    rounds = [o["tokens_per_s"] / g["tokens_per_s"] for o, g in zip(raw["openai"], raw["generate"])]
    results = {"machine": {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}, "lm": args.lm,
               "streams": args.streams, "seconds_per_point": args.seconds, "repeats": args.repeats,
               "points": points, "openai_over_generate": ratio, "per_round": rounds,
               "per_round_median": statistics.median(rounds), "raw": raw}
    table = "\n".join(["| front | tokens/s | first chunk p50 ms | front-end CPU us/token | errors |",
                       "|---|---:|---:|---:|---:|"] + [
        f"| {front} | {p['tokens_per_s']:.0f} | {p['ttft_p50_ms']:.1f} | {p['frontend_cpu_us_per_token']:.1f} | "
        f"{p['errors']:.0f} |" for front, p in points.items()]) + (
        f"\n\nOpenAI / :generate tokens/s: {ratio:.3f} (medians); per round {', '.join(f'{r:.2f}' for r in rounds)}, "
        f"their median {statistics.median(rounds):.3f}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table)
    print(table)
    return results
