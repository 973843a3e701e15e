"""The benchmark harness's report (python -m loadtest bench): results.md, the tables of one run.
The numbers come from loadtest/bench.py; the plot is loadtest/plot.py's."""
WORKLOADS = ("short", "long")


def markdown(r: dict) -> str:
    p, c, m = r["points"], r["ceiling"], r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; provider {m['provider']}; ONNX Runtime {m['onnxruntime']}; "
             f"{m['date']}. Model {r['model']}; {r['seconds_per_point']} s per point, median of {r['repeats']}; load "
             f"from {r['client_procs']} process(es); rnnserve settings: {' '.join(r['server_env']) or 'defaults'}.", "",
             "| stack | workload | texts/request | users | req/s | sequences/s | p50 ms | p99 ms | front-end CPU ms/req "
             "| engine CPU ms/req | CPU server / generator / other (s) | disturbed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in p.items():
        if key.startswith("generate"):
            continue
        stack, w, n, users = key.split("|")
        lines.append(f"| {stack} | {w} | {n} | {users} | {v['requests_per_s']:.0f} | {v['sequences_per_s']:.0f} | "
                     f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['frontend_cpu_ms_per_request']:.3f} | "
                     f"{v['engine_cpu_ms_per_request']:.3f} | {v['cpu_server_s']:.1f} / {v['cpu_generator_s']:.1f} / "
                     f"{v['cpu_other_s']:.1f} | {'yes' if v['disturbed'] else 'no'} |")
    batches = sorted({k.split("|")[1] for t in c.values() for k in t if "|" in k}, key=int)
    lines += ["", "| in-process ceiling: sequences/s (ms per call) | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    for name, table in c.items():
        if name.startswith("pytorch"):
            cells = [f"{table[b]['sequences_per_s']:.0f}" if b in table else "" for b in batches]
            lines.append(f"| {name}, eager | " + " | ".join(cells) + " |")
            continue
        for mode in ("run", "iobinding"):
            cells = [f"{table[f'{mode}|{b}']['sequences_per_s']:.0f} ({table[f'{mode}|{b}']['ms_per_call_p50']:.2f})"
                     for b in batches]
            lines.append(f"| {name}, {mode} | " + " | ".join(cells) + " |")
    top, n0 = r["users"][-1], r["texts_per_request"][0]
    lines += ["", "| ratio, one run | short | long |", "|---|---|---|"]
    for stack in [s for s in {k.split("|")[0] for k in p} if s != "rnnserve" and not s.startswith("generate")]:
        cells = [f"{p[f'rnnserve|{w}|{n0}|{top}']['requests_per_s'] / p[k]['requests_per_s']:.2f}x"
                 if (k := f"{stack}|{w}|{n0}|{top}") in p else "" for w in WORKLOADS]
        lines.append(f"| rnnserve / {stack}, {top} users, {n0} text(s) per request (req/s) | " + " | ".join(cells) + " |")
    best = {w: max(v["sequences_per_s"] for k, t in c.items() if k.startswith(f"onnxruntime|{w}") for v in t.values())
            for w in WORKLOADS}
    lines.append(f"| rnnserve {top} users / best in-process ceiling (sequences/s) | " + " | ".join(
        f"{max(v['sequences_per_s'] for k, v in p.items() if k.startswith(f'rnnserve|{w}|')) / best[w]:.2f}"
        for w in WORKLOADS) + " |")
    g = r.get("generation_ceiling", {})
    lines += ["", "| generation | streams | tokens/s | time to first token p50 ms | p50 request ms (100 tokens) | "
              "in-process greedy loop at that batch, tokens/s | ratio |", "|---|---|---|---|---|---|---|"]
    for key, v in p.items():
        if key.startswith("generate"):
            n = key.split("|")[3]
            loop = g.get(n, {}).get("tokens_per_s")
            lines.append(f"| {r['lm']} | {n} | {v['tokens_per_s']:.0f} | {v['ttft_p50_ms']:.1f} | {v['p50_ms']:.0f} | "
                         + (f"{loop:.0f} | {v['tokens_per_s'] / loop:.2f} |" if loop else " | |"))
    if "locust_check" in r:
        lc = r["locust_check"]
        lines += ["", f"Locust check (rnnserve, short, {lc['users']} users): Locust {lc['locust_requests_per_s']:.0f} "
                      f"req/s (p50 {lc['locust_p50_ms']:.0f} ms, p99 {lc['locust_p99_ms']:.0f} ms) vs the asyncio client "
                      f"{lc['asyncio_requests_per_s']:.0f} req/s."]
    lines.append(f"\nWall time of the whole run: {r['wall_s']} s.")
    return "\n".join(lines) + "\n"
