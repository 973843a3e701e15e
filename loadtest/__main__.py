"""Load tests and the benchmark harness.

    python -m loadtest run --host http://127.0.0.1:8000 --users 64 --spawn-rate 64 --duration 60s \\
        [--scenario predict|v2|generate|all] [--out results/run]
    python -m loadtest bench [--model imdb-bilstm --lm timemachine-gru --repository model_repository --runs runs]
    python -m loadtest soak [--model imdb-gru --lm timemachine-gru --minutes 10 --users 32 --reload-every-s 60]
    python -m loadtest swaps [--model imdb-gru --lm timemachine-gru --swaps 10 --every-s 3 --users 8]
    python -m loadtest ipc [--messages 20000]
    python -m loadtest protocols [--model imdb-gru --rows 32 --users 64]
    python -m loadtest gpu [--quick] [--model imdb-gru --lm timemachine-gru --encoder NAME]
    python -m loadtest loop [--model imdb-gru]
    python -m loadtest engine [--model imdb-gru --seconds 5 --repeats 3]
    python -m loadtest fronts [--lm timemachine-gru --streams 64 --seconds 6 --repeats 3]
    python -m loadtest mixed [--model imdb-gru --lm timemachine-gru --streams 16 --users 64 --repeats 2]
    python -m loadtest tune MODEL [--p99-ms 100 --users 64 --texts 1 --minutes 10 --write]
    python -m loadtest state [--lm timemachine-gru --users 16 --seconds 5 --repeats 3]
    python -m loadtest profile [--model imdb-gru --users 1,64 --texts 1 --seconds 8]

`run` drives Locust headless against any host and writes its CSV and HTML reports plus a
summary (requests/s, p50/p95/p99, failures) as JSON and markdown. `bench`: see loadtest/bench.py;
`soak`: loadtest/soak.py; `swaps`: an engine's memory over hot swaps (loadtest/swaps.py); `ipc`: what the front-end <-> engine transport costs (loadtest/ipc.py);
`protocols`: V2 JSON vs binary vs gRPC, tracing off vs on, and V1 predict vs V2 text_input
(loadtest/protocols.py); `gpu`: the
CUDA tests and the GPU goals' operating points in one command (loadtest/gpu.py); `loop`: what the
largest bodies cost a front-end's event loop (loadtest/loop.py); `engine`: the engine's host work
per request and row, and the whole stack against a minimal app, with negligible compute
(loadtest/engine.py); `fronts`: :generate's streams against the same through OpenAI's completions
(loadtest/fronts.py); `mixed`: the streams' pace alone and beside classifier users
(loadtest/mixed.py); `tune`: the model's best serving config on this machine, measured and
written to its config.json (loadtest/tune.py); `state`: what a session's state token costs, in
bytes, microseconds and steps/s against a step by session id (loadtest/state.py); `profile`: py-spy
flame graphs of the front-end and the engine under load (loadtest/profile.py).
"""
import argparse
import sys
from pathlib import Path

from loadtest.bench import bench as run_bench
from loadtest.engine import engine as run_engine
from loadtest.fronts import fronts as run_fronts
from loadtest.gpu import gpu as run_gpu
from loadtest.headless import SCENARIOS, run_locust
from loadtest.ipc import ipc as run_ipc
from loadtest.loop import loop as run_loop
from loadtest.mixed import mixed as run_mixed
from loadtest.profile import profile as run_profile
from loadtest.protocols import protocols as run_protocols
from loadtest.soak import soak as run_soak
from loadtest.state import state as run_state
from loadtest.swaps import swaps as run_swaps
from loadtest.tune import tune as run_tune

def server_under_test(parser: argparse.ArgumentParser, name: str):
    """The options of a benchmark of one python -m serving (loadtest/servers.py's start_rnnserve)."""
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--server-env", nargs="*", default=[], metavar="RNNSERVE_X=VALUE",
                        help="settings for the server under test")
    parser.add_argument("--out", type=Path, default=Path(f"results/{name}"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Locust, headless")
    run.add_argument("--host", default="http://127.0.0.1:8000")
    run.add_argument("--users", type=int, default=64)
    run.add_argument("--spawn-rate", type=float, default=64)
    run.add_argument("--duration", default="60s")
    run.add_argument("--scenario", choices=list(SCENARIOS), default="predict")
    run.add_argument("--out", type=Path, default=Path("results/locust"))
    bench = commands.add_parser("bench", help="the benchmark harness (loadtest/bench.py)")
    bench.add_argument("--model", default="imdb-bilstm", help="classifier in the repository, and its run in --runs")
    bench.add_argument("--lm", default="timemachine-gru", help="language model in the repository")
    bench.add_argument("--repository", type=Path, default=Path("model_repository"))
    bench.add_argument("--runs", type=Path, default=Path("runs"))
    bench.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="for every stack and ceiling")
    bench.add_argument("--users", default="1,16,64", help="concurrent users, comma-separated (up to 1024)")
    bench.add_argument("--texts", default="1", help="texts per request, comma-separated, e.g. 1,32")
    bench.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    bench.add_argument("--ceiling-batches", default="1,8,32,64", help="batch sizes of the in-process ceiling")
    bench.add_argument("--streams", default="1,8,64", help="concurrent generation streams, comma-separated")
    bench.add_argument("--generation-batches", default="1,8,64", help="batch sizes of the in-process greedy loop")
    bench.add_argument("--compare", type=Path, help="another checkout whose python -m serving (over its own "
                       "model_repository) is measured beside this one's")
    bench.add_argument("--seconds", type=float, default=6.0, help="per measured point")
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--out", type=Path, default=Path("results/bench"))
    bench.add_argument("--server-env", nargs="*", default=[], metavar="RNNSERVE_X=VALUE",
                       help="settings for the rnnserve server under test")
    swapped = commands.add_parser("swaps", help="one engine's RSS over hot swaps under load (loadtest/swaps.py)")
    swapped.add_argument("--model", default="imdb-gru")
    swapped.add_argument("--lm", help="a language model to swap too, with streams running")
    swapped.add_argument("--repository", type=Path, default=Path("model_repository"))
    swapped.add_argument("--swaps", type=int, default=10)
    swapped.add_argument("--every-s", type=float, default=3.0, help="seconds between swaps")
    swapped.add_argument("--users", type=int, default=8, help="concurrent predict clients")
    swapped.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE",
                         help="environment of the server under test (e.g. MALLOC_ARENA_MAX=2)")
    swapped.add_argument("--out", type=Path, default=Path("results/swaps"))
    soak = commands.add_parser("soak", help="mixed load for minutes, swaps, a killed engine, memory (loadtest/soak.py)")
    soak.add_argument("--model", default="imdb-gru")
    soak.add_argument("--lm", default="timemachine-gru", help="language model for generations and sessions")
    soak.add_argument("--kill-engine-at", type=float, default=0.5, help="when to SIGKILL engine 0, as a fraction "
                      "of the run; 0: never")
    soak.add_argument("--repository", type=Path, default=Path("model_repository"))
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--users", type=int, default=32)
    soak.add_argument("--window-s", type=float, default=30.0, help="one row of figures per window")
    soak.add_argument("--reload-every-s", type=float, default=60.0, help="reload the model under load; 0: never")
    soak.add_argument("--out", type=Path, default=Path("results/soak"))
    transport = commands.add_parser("ipc", help="the front-end <-> engine transport's cost: the Unix sockets, and "
                                                "ZeroMQ, the transport before them (loadtest/ipc.py)")
    transport.add_argument("--messages", type=int, default=20000)
    wire = commands.add_parser("protocols", help="V2 JSON vs binary vs gRPC; tracing off vs on; V1 vs V2 text "
                                                   "(loadtest/protocols.py)")
    wire.add_argument("--model", default="imdb-gru")
    wire.add_argument("--repository", type=Path, default=Path("model_repository"))
    wire.add_argument("--rows", type=int, default=32, help="pre-tokenized rows per V2 request")
    wire.add_argument("--users", type=int, default=64)
    wire.add_argument("--seconds", type=float, default=5.0, help="per measured point")
    wire.add_argument("--repeats", type=int, default=3)
    wire.add_argument("--protocols", action=argparse.BooleanOptionalAction, default=True, help="measure part 1")
    wire.add_argument("--tracing", action=argparse.BooleanOptionalAction, default=True, help="measure part 2")
    wire.add_argument("--baseline", type=Path, help="part 2 of another checkout (e.g. main's) too, interleaved")
    wire.add_argument("--texts", action=argparse.BooleanOptionalAction, default=True,
                      help="measure part 3: V1 predict vs V2 text_input")
    wire.add_argument("--text-points", type=lambda s: s.split(","), default=["64x1", "16x32"],
                      help="part 3's points, USERSxTEXTS per request, comma-separated")
    wire.add_argument("--modes", type=lambda s: s.split(","), default=["every request", "1 in 10 sampled", "nothing sampled"],
                      help="part 2's traced points besides off, comma-separated")
    wire.add_argument("--out", type=Path, default=Path("results/protocols"))
    device = commands.add_parser("gpu", help="the CUDA tests and the GPU goals, one table (loadtest/gpu.py)")
    device.add_argument("--repository", type=Path, default=Path("model_repository"))
    device.add_argument("--model", default="imdb-gru", help="classifier for the text points and the ceiling")
    device.add_argument("--lm", default="timemachine-gru", help="language model for generation")
    device.add_argument("--encoder", help="the encoder model (default: the repository's first WordPiece classifier)")
    device.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="cpu: a rehearsal on the CPU")
    device.add_argument("--quick", action="store_true", help="fewer points, 3 s each: about 2 minutes")
    device.add_argument("--seconds", type=float, help="per measured point (default 8, --quick 3)")
    device.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True, help="run tests/test_cuda.py first")
    device.add_argument("--out", type=Path, default=Path("results/gpu"))
    bodies = commands.add_parser("loop", help="what the largest bodies cost the event loop (loadtest/loop.py)")
    bodies.add_argument("--model", default="imdb-gru")
    bodies.add_argument("--repository", type=Path, default=Path("model_repository"))
    bodies.add_argument("--out", type=Path, default=Path("results/loop"))
    host = commands.add_parser("engine", help="the engine's host cost with no inference (loadtest/engine.py)")
    host.add_argument("--model", default="imdb-gru", help="its codec, vocabulary and labels")
    host.add_argument("--repository", type=Path, default=Path("model_repository"))
    host.add_argument("--seconds", type=float, default=5.0, help="per measured point")
    host.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the whole stack")
    host.add_argument("--stack", action=argparse.BooleanOptionalAction, default=True,
                      help="also the whole stack against the minimal FastAPI app")
    host.add_argument("--out", type=Path, default=Path("results/engine"))
    front = commands.add_parser("fronts", help=":generate vs OpenAI's completions, streamed (loadtest/fronts.py)")
    front.add_argument("--lm", default="timemachine-gru", help="language model in the repository")
    front.add_argument("--streams", type=int, default=64, help="concurrent streams")
    front.add_argument("--seconds", type=float, default=6.0, help="per measured point")
    front.add_argument("--repeats", type=int, default=3)
    server_under_test(front, "fronts")
    beside = commands.add_parser("mixed", help="streams alone and beside classifier users (loadtest/mixed.py)")
    beside.add_argument("--model", default="imdb-gru", help="classifier in the repository")
    beside.add_argument("--lm", default="timemachine-gru", help="language model in the repository")
    beside.add_argument("--streams", type=int, default=16, help="concurrent streams")
    beside.add_argument("--users", type=int, default=64, help="concurrent classifier users")
    beside.add_argument("--seconds", type=float, default=5.0, help="per measured point")
    beside.add_argument("--repeats", type=int, default=2)
    server_under_test(beside, "mixed")
    tuner = commands.add_parser("tune", help="the model's best serving config, measured (loadtest/tune.py)")
    tuner.add_argument("model", help="a model of the repository")
    tuner.add_argument("--repository", type=Path, default=Path("model_repository"))
    tuner.add_argument("--p99-ms", type=float, default=100.0, help="the latency budget")
    tuner.add_argument("--users", type=int, default=64, help="concurrent clients")
    tuner.add_argument("--texts", type=int, default=1, help="texts per request")
    tuner.add_argument("--minutes", type=float, default=10.0, help="when the search stops")
    tuner.add_argument("--seconds", type=float, default=4.0, help="per measured point")
    tuner.add_argument("--max-accuracy-loss", type=float, default=0.5,
                       help="accuracy points a variant (int8) may lose against fp32 to be tried")
    tuner.add_argument("--confirm", type=int, default=2, help="measure the best point and the defaults this many "
                       "more times each, alternately, before choosing")
    tuner.add_argument("--write", action="store_true", help="write the winner to the model's config.json")
    tuner.add_argument("--out", type=Path, default=Path("results/tune"))
    carried = commands.add_parser("state", help="a state token's cost; a step with it vs by session id "
                                  "(loadtest/state.py)")
    carried.add_argument("--lm", default="timemachine-gru")
    carried.add_argument("--repository", type=Path, default=Path("model_repository"))
    carried.add_argument("--users", type=int, default=16, help="concurrent chains of steps")
    carried.add_argument("--seconds", type=float, default=5.0, help="per measured point")
    carried.add_argument("--repeats", type=int, default=3)
    carried.add_argument("--out", type=Path, default=Path("results/state"))
    spied = commands.add_parser("profile", help="py-spy flame graphs of the front-end and the engine under load "
                                "(loadtest/profile.py)")
    spied.add_argument("--model", default="imdb-gru")
    spied.add_argument("--repository", type=Path, default=Path("model_repository"))
    spied.add_argument("--users", type=lambda s: [int(u) for u in s.split(",")], default=[1, 64],
                       help="concurrent users, comma-separated: one point each")
    spied.add_argument("--texts", type=int, default=1, help="texts per request")
    spied.add_argument("--seconds", type=float, default=8.0, help="per point")
    spied.add_argument("--rate", type=int, default=1000, help="samples per second")
    spied.add_argument("--top", type=int, default=12, help="functions listed per process")
    spied.add_argument("--out", type=Path, default=Path("results/profile"))
    spied.add_argument("--tree", type=Path, help="another checkout whose python -m serving is profiled instead")
    args = p.parse_args(argv)
    if args.command == "profile":
        return run_profile(args)
    if args.command == "state":
        return run_state(args)
    if args.command == "tune":
        return run_tune(args)
    if args.command == "engine":
        return run_engine(args)
    if args.command == "fronts":
        return run_fronts(args)
    if args.command == "mixed":
        return run_mixed(args)
    if args.command == "loop":
        return run_loop(args)
    if args.command == "gpu":
        return run_gpu(args)
    if args.command == "protocols":
        return run_protocols(args)
    if args.command == "ipc":
        return run_ipc(args)
    if args.command == "swaps":
        return run_swaps(args)
    if args.command == "soak":
        return run_soak(args)
    if args.command == "run":
        return run_locust(args.host, args.users, args.spawn_rate, args.duration, args.scenario, args.out)
    return run_bench(args)


if __name__ == "__main__":
    summary = main()
    if isinstance(summary, int):  # tune: 1 when no config met the budget
        sys.exit(summary)
    if isinstance(summary, dict) and any(e["failures"] for e in summary.get("endpoints", {}).values()):
        sys.exit(1)
