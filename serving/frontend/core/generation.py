"""A generation as the front-end follows it, for every transport: started on the engine that runs
the model's generations, its first tokens awaited (until then a refusal is the request's status),
then its text piece by piece until the length or a stop string ends it. The engine advances the
states, applies the penalties, samples and takes log-probabilities; the front-end encodes the
prompt, decodes tokens and finds stop strings (none before min_tokens, as vLLM's stop checker)."""
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from core.codec import TextCodec
from serving.common import metrics, tracing
from serving.common.messages import Generate
from serving.frontend.client import EngineClient, Link, Stream
from serving.frontend.core.front import Front, check_text, engines, served
from serving.frontend.core.inference import GONE, Left, on_the_current_version
from serving.frontend.core.refused import Refused
from serving.frontend.schemas import GenerateRequest, TritonGenerateRequest


@dataclass
class Generation:
    """One generate request as the front-end follows it: the text so far and why it ended."""
    codec: TextCodec
    body: GenerateRequest
    prompt_ids: list[int]
    version: int  # the model version generating
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)  # when asked: {"token", "logprob", "top"} per token
    prompt_logprobs: list[float | None] | None = None  # when asked: one per prompt token, the first None

    def add(self, tokens: list[int], last: bool, logprobs: list[tuple[float, list]] | None = None) -> list[str]:
        """The pieces of text these tokens make, up to a stop string (from the min_tokens-th token
        on) or the last token; logprobs: the engine's (log-probability, alternatives) of each."""
        new = []
        for i, token in enumerate(tokens):
            piece = self.codec.piece(token)
            self.tokens += 1
            self.text += piece
            new.append(piece)
            if logprobs:
                self.logprobs.append(self.logprob(piece, *logprobs[i]))
            if self.tokens < self.body.min_tokens:
                continue
            stop = next((s for s in self.body.stop if s and self.completed(s, piece) >= 0), None)
            if stop:
                self.text, self.finish_reason = self.text[: self.completed(stop, piece)], "stop"
                break
        if last and not self.finish_reason:
            self.finish_reason = "length"
        return new

    def completed(self, stop: str, piece: str) -> int:
        """Where `stop` starts if the last piece completed it (it ends within the piece), else -1
        (vLLM's stop checker: an earlier one, kept by min_tokens, stays in the text)."""
        return self.text.find(stop, max(0, len(self.text) - len(piece) - len(stop) + 1))

    def logprob(self, piece: str, logprob: float, top: list) -> dict:
        """One generated token's entry: its text, log-probability and most likely alternatives."""
        return {"token": piece, "logprob": logprob,
                "top": [{"token": self.codec.piece(t), "logprob": lp} for t, lp in top]}

    def scores(self) -> dict:
        """The log-probabilities asked for, by the names of the fields that asked for them."""
        return ({"logprobs": self.logprobs} if self.body.logprobs is not None else {}) | (
            {"prompt_logprobs": self.prompt_logprobs} if self.body.prompt_logprobs else {})

    def summary(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_ids),
                "unknown_prompt_tokens": self.prompt_ids.count(self.codec.vocab.unk_id)} | self.scores()


class Deltas:
    """A generation's text in parts, each what arrived since the part before, less the end that a
    stop string may yet take back: the parts add up to the whole text exactly (Triton's streams)."""

    def __init__(self, generation: Generation):
        self.generation, self.sent, self.scored, self.prompt_scored = generation, 0, 0, False
        self.held = max(map(len, generation.body.stop), default=1) - 1

    def next(self, final: bool = False) -> str:
        text = self.generation.text
        end = len(text) if final or self.generation.finish_reason else max(self.sent, len(text) - self.held)
        part, self.sent = text[self.sent: end], end
        return part

    def scores(self) -> dict:
        """The log-probabilities asked for that no part before carried: those of the tokens since
        (they add up to the whole answer's), and the prompt's with the first part; {} if none."""
        generation, new = self.generation, {}
        if generation.body.logprobs is not None and len(generation.logprobs) > self.scored:
            new["logprobs"], self.scored = generation.logprobs[self.scored:], len(generation.logprobs)
        if generation.body.prompt_logprobs and not self.prompt_scored:
            new["prompt_logprobs"], self.prompt_scored = generation.prompt_logprobs, True
        return new


class GenerationFailed(Refused):
    """The engine failed a generation after its first token (500), or the next token did not come
    within the deadline (504)."""


async def first_tokens(front: Front, name: str, body: GenerateRequest,
                       asked_version: str | None = None) -> tuple[Link, Stream, Generation, list[int]]:
    """Start the generation on an engine and wait for its first token(s): until then a refusal or
    the deadline (504) is the request's status. A version swapped out meanwhile (410), or an engine
    gone before the first token while another serves the model, is tried once more."""
    client, timeout_s = engines(front), front.settings.request_timeout_s
    started = time.perf_counter()

    async def attempt():
        link, version = served(front, name, asked_version, task="lm", together=True)
        if body.top_k > len(version.codec.vocab):
            raise Refused(400, f"top_k is at most the vocabulary size {len(version.codec.vocab)}")
        with tracing.span("tokenize"):
            prompt = version.codec.ids(body.prompt)
        if not prompt:
            raise Refused(400, "the prompt has no tokens")
        rid = client.next_id()
        stream = client.generate(link, Generate(
            rid, name, version.number, prompt, body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed,
            body.presence_penalty, body.frequency_penalty, body.repetition_penalty,
            -1 if body.logprobs is None else body.logprobs, body.prompt_logprobs))
        try:
            tokens = await stream.next(timeout_s)
        except TimeoutError:
            client.cancel(link, rid)
            raise Refused(504, f"no first token within the deadline of {timeout_s:g}s") from None
        except asyncio.CancelledError:
            client.cancel(link, rid)
            raise
        if stream.failed and not tokens:  # a failure after them goes in the stream
            return stream.failed
        generation = Generation(version.codec, body, prompt, version.number, prompt_logprobs=stream.prompt_logprobs)
        return link, stream, generation, tokens

    begun = await on_the_current_version(front, name, attempt)
    metrics.of(metrics.TIME_TO_FIRST_TOKEN, name, str(begun[2].version)).observe(time.perf_counter() - started)
    return begun


async def rest(client: EngineClient, link: Link, stream: Stream, generation: Generation, tokens: list[int],
               timeout_s: float, interval_s: float):
    """Yields the text pieces of the tokens that arrived, the first ones at once, then at most
    every interval_s (what arrives meanwhile goes together: one write for several tokens), until
    the generation ends; each token must come within timeout_s of the one before."""
    loop = asyncio.get_running_loop()
    span = tracing.start("generation")
    try:
        while True:
            logprobs = stream.take_logprobs(len(tokens)) if generation.body.logprobs is not None else None
            last = stream.last and not stream.tokens and not stream.failed  # none waits
            pieces = generation.add(tokens, last, logprobs)
            if generation.finish_reason == "stop":
                client.cancel(link, stream.id)
            written = loop.time()
            yield pieces
            if stream.failed:
                raise GenerationFailed(500, stream.failed.error)
            if generation.finish_reason:
                return
            if (pause := written + interval_s - loop.time()) > 0 and not stream.last:
                await asyncio.sleep(pause)
            try:
                tokens = await stream.next(timeout_s)
            except TimeoutError:
                client.cancel(link, stream.id)
                raise GenerationFailed(504, f"no next token within the deadline of {timeout_s:g}s") from None
    finally:
        if span:
            span.set_attributes({"rnnserve.tokens": generation.tokens, "rnnserve.finish_reason": generation.finish_reason or "cut off"})
            span.end()


async def started(front: Front, name: str, body: GenerateRequest, version: str | None = None,
                  length_name: str = "max_new_tokens") -> tuple[Generation, AsyncIterator[list[str]], Callable[[], None]]:
    """A generation checked and under way: its first tokens arrived (until then a refusal is the
    request's status), the pieces of text to come, and how to cancel it. length_name: what the
    client called max_new_tokens (Triton's max_tokens), for its refusals."""
    settings, client = front.settings, engines(front)
    check_text(front, body.prompt, "prompt")
    if body.max_new_tokens > settings.max_new_tokens:
        raise Refused(400, f"{length_name} is at most {settings.max_new_tokens}")
    if body.max_new_tokens == 0 and not body.prompt_logprobs:
        raise Refused(400, f"{length_name} is at least 1 (0 only with prompt_logprobs, to score the prompt)")
    if body.min_tokens > body.max_new_tokens:
        raise Refused(400, f"min_tokens ({body.min_tokens}) is at most {length_name} ({body.max_new_tokens})")
    link, stream, generation, tokens = await first_tokens(front, name, body, version)
    pieces = rest(client, link, stream, generation, tokens, settings.request_timeout_s,
                  settings.stream_interval_ms / 1000)
    return generation, pieces, lambda: client.cancel(link, stream.id)


def from_triton(body: TritonGenerateRequest) -> GenerateRequest:
    """Triton's generate request (REST's generate extension, gRPC's stream) as :generate's body."""
    p = body.parameters
    return GenerateRequest(prompt=body.text_input, max_new_tokens=p.max_tokens, temperature=p.temperature,
                           top_k=max(p.top_k, 0), top_p=p.top_p, seed=p.seed,
                           stop=[p.stop] if isinstance(p.stop, str) else p.stop,
                           presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                           repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens, logprobs=p.logprobs,
                           prompt_logprobs=p.prompt_logprobs)


async def started_triton(front: Front, name: str, body: TritonGenerateRequest, version: str | None = None):
    """started() for Triton's generate request, its refusals naming its fields."""
    return await started(front, name, from_triton(body), version, "max_tokens")


def whole(body: TritonGenerateRequest, generation: Generation) -> str:
    """A whole answer's text_output: the prompt and the text after it, or the text alone."""
    return ("" if body.parameters.exclude_input_in_output else body.text_input) + generation.text


async def to_the_end(pieces: AsyncIterator[list[str]], cancel: Callable[[], None], left: Left | None = None):
    """Run a generation to its end for one whole answer: 499 if the client leaves first (left()
    returns), 504 if a token misses its deadline, 500 if the engine fails it."""
    async def run():
        async for _ in pieces:
            pass

    task = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(left()) if left else None
    try:
        done, _ = await asyncio.wait({task, gone} - {None}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise Refused(499, GONE)
        task.result()
    finally:
        task.cancel()
        if gone:
            gone.cancel()
        cancel()
