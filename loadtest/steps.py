"""What a generation step costs in one engine, no server: the whole step and its sampling alone.

    python -m loadtest.steps [--model timemachine-gru --repository model_repository --generations 64]

A LanguageModel (serving/engine/generation.py) over --model on the CPU starts --generations
generations (half greedy, half sampled with a seed each) of --tokens tokens and steps them to the
end, --rounds times; reported: the best round's milliseconds per step, and microseconds per step
spent in sampling (the best: on a shared machine the others measure the neighbours too) (LanguageModel.sampled: the penalties, the draw, the
log-probabilities, the messages). Each of the settings below is a run of its own: the defaults,
the penalties, logprobs; a setting this version does not have is skipped.
"""
import argparse
import time
from pathlib import Path

from core.repository import ServingConfig, latest
from serving.common.messages import Generate
from serving.common.settings import Settings
from serving.engine.generation import LanguageModel
from serving.engine.runner import Runner

SETTINGS = {
    "defaults": {},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "logprobs 5": {"logprobs": 5},
}


def run(runner: Runner, generations: int, tokens: int, settings: dict) -> tuple[float, float]:
    """One round: (ms per step, µs of sampling per step)."""
    lm = LanguageModel(runner, max_generations=generations, max_sessions=1, idle_s=60, max_new_tokens=tokens)
    sampled, spent = lm.sampled, []

    def timed(*args):
        started = time.perf_counter()
        try:
            return sampled(*args)
        finally:
            spent.append(time.perf_counter() - started)
    lm.sampled = timed
    for i in range(generations):
        temperature = 0.0 if i % 2 else 0.8
        lm.start(b"bench", Generate(i, runner.name, runner.version, [1 + i % 5, 2, 3], tokens, temperature, 0, 1.0, i,
                                    **settings))
    steps, started = 0, time.perf_counter()
    while lm.has_work():
        lm.step()
        steps += 1
    return (time.perf_counter() - started) / steps * 1e3, sum(spent) / len(spent) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timemachine-gru")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--generations", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runner = Runner.load(latest(args.repository, args.model), Settings(providers=["CPUExecutionProvider"]),
                         ServingConfig())
    for name, settings in SETTINGS.items():
        if any(field not in Generate.__struct_fields__ for field in settings):
            print(f"{name}: not in this version")
            continue
        rounds = [run(runner, args.generations, args.tokens, settings) for _ in range(args.rounds)]
        print(f"{name}: {min(r[0] for r in rounds):.3f} ms per step, "
              f"{min(r[1] for r in rounds):.1f} µs of it sampling "
              f"({args.generations} generations, {args.tokens} tokens, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
