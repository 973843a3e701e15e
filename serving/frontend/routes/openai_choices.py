"""The choices of one OpenAI request (serving/frontend/routes/openai.py), each a generation of the
core: started together (one refused, the others cancelled), read together as their text arrives,
and written as OpenAI writes them: whole choices, or stream chunks with the part of the text since
the chunk before, and where asked the log-probabilities of its tokens in the completions' shape
(tokens, token_logprobs, top_logprobs, text_offset) or the chat's (content[] of token, logprob,
bytes, top_logprobs)."""
import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from serving.frontend.core.front import Front
from serving.frontend.core.generation import Deltas, Generation, started
from serving.frontend.core.refused import Refused
from serving.frontend.openai_schemas import MAX_CHOICES
from serving.frontend.responses import json_encode, openai_error
from serving.frontend.routes import lm
from serving.frontend.schemas import GenerateRequest

DONE = b"data: [DONE]\n\n"
Run = tuple[Generation, AsyncIterator[list[str]], Callable[[], None]]


async def started_all(front: Front, name: str, asked: list[GenerateRequest]) -> list[Run]:
    """Every choice's generation under way (the core's started()); if one is refused, or the
    client leaves meanwhile, those already started are cancelled."""
    if len(asked) > MAX_CHOICES:
        raise Refused(400, f"{len(asked)} choices (prompts x n); at most {MAX_CHOICES}", param="n")
    if len(asked) == 1:
        return [await started(front, name, asked[0], length_name="max_tokens")]
    tasks = [asyncio.ensure_future(started(front, name, one, length_name="max_tokens")) for one in asked]
    try:
        await asyncio.wait(tasks)
    finally:  # cancelled: stop every start and cancel what started
        for task in tasks:
            task.cancel()
        ran = [task.result() for task in tasks if task.done() and not task.cancelled() and not task.exception()]
        if len(ran) < len(tasks):
            for _, _, cancel in ran:
                cancel()
    for task in tasks:
        task.result()  # the first refusal is the request's
    return ran


async def merged(runs: list[Run]) -> AsyncIterator[tuple[int, list[str]]]:
    """Every choice's pieces of text as they arrive, (its index, the pieces), until every choice
    has ended; one choice is read directly, several through a queue."""
    if len(runs) == 1:
        async for pieces in runs[0][1]:
            yield 0, pieces
        return
    queue = asyncio.Queue()

    async def read(index: int, pieces: AsyncIterator[list[str]]):
        try:
            async for new in pieces:
                queue.put_nowait((index, new))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    readers = [asyncio.ensure_future(read(i, pieces)) for i, (_, pieces, _) in enumerate(runs)]
    try:
        ended = 0
        while ended < len(runs):
            index, new = await queue.get()
            if isinstance(new, Exception):
                raise new
            if new is None:
                ended += 1
            else:
                yield index, new
    finally:
        for reader in readers:
            reader.cancel()


def cancel_all(runs: list[Run]) -> Callable[[], None]:
    def cancel():
        for _, _, each in runs:
            each()
    return cancel


def usage(generations: list[Generation], n: int) -> dict:
    """Tokens read (each prompt once, whatever n) and generated (every choice's)."""
    prompt = sum(len(g.prompt_ids) for g in generations[::n])
    completion = sum(g.tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_entries(generation: Generation) -> list[dict]:
    """The prompt's tokens as the core's logprobs entries ({"token", "logprob", "top"}): each its
    own only alternative (the engine scores the prompt's tokens, not others there); the first none."""
    pieces = [generation.codec.piece(token) for token in generation.prompt_ids]
    return [{"token": piece, "logprob": lp, "top": None if lp is None else [{"token": piece, "logprob": lp}]}
            for piece, lp in zip(pieces, generation.prompt_logprobs or [None] * len(pieces))]


class Legacy:
    """A completion choice's logprobs in OpenAI's completions shape, text_offset counted on from
    one part to the next."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def __call__(self, entries: list[dict]) -> dict:
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                                 for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[dict]) -> dict:
    """A chat choice's logprobs in OpenAI's chat shape."""
    def one(entry: dict) -> dict:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode())}
    return {"content": [one(e) | {"top_logprobs": [one(t) for t in e["top"]]} for e in entries]}


class Chunk:
    """One choice's stream chunks: the JSON around the text (or the chat's delta) encoded once per
    stream; a chunk with logprobs encodes them too."""

    def __init__(self, head: dict, index: int, field: str):
        self.head, self.index, self.field = head, index, field
        self.before = b"data: " + json_encode(head)[:-1] + b',"choices":[{"index":%d,"%s":' % (index, field.encode())
        self.after = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def event(self, delta, logprobs: dict | None = None) -> bytes:
        if logprobs is None:
            return self.before + json_encode(delta) + self.after
        return self.before + json_encode(delta) + b',"logprobs":' + json_encode(logprobs) + \
            b',"finish_reason":null}]}\n\n'

    def part(self, text: str, logprobs: dict | None = None) -> bytes:
        """A chunk of text (completions: the text; chat: a delta of content)."""
        return self.event(text if self.field == "text" else {"content": text}, logprobs)

    def last(self, text: str, finish_reason: str, logprobs: dict | None = None) -> bytes:
        delta = text if self.field == "text" else {"content": text} if text else {}
        choice = {"index": self.index, self.field: delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return b"data: " + json_encode(self.head | {"choices": [choice]}) + b"\n\n"


def stream(request: Request, model: str, runs: list[Run], chunks: list[Chunk], opening: bytes, n: int,
           include_usage: bool, shapes: list[Callable[[list[dict]], dict]] | None, endpoint: str):
    """Server-sent chunks: `opening`, then each choice's text as it arrives (less what a stop
    string may yet take back) with, where `shapes` (one per choice) write them, the
    log-probabilities of its tokens since; once every choice has ended, in one write, each one's
    last chunk (the rest of its text and its finish_reason), with include_usage a chunk of the
    usage and no choices, and [DONE]."""
    deltas = [Deltas(g) for g, _, _ in runs]
    opened = [opening]

    def scores(index: int) -> dict | None:
        return shapes[index](deltas[index].scores().get("logprobs", [])) if shapes else None

    def events_of(item: tuple[int, list[str]]) -> bytes:
        index, _ = item
        first = opened.pop() if opened else b""
        return first + chunks[index].part(part, scores(index)) if (part := deltas[index].next()) else first

    def last() -> bytes:
        ends = (opened.pop() if opened else b"") + b"".join(
            chunk.last(deltas[i].next(True), g.finish_reason, scores(i)) for i, (chunk, (g, _, _))
            in enumerate(zip(chunks, runs)))
        if include_usage:
            totals = usage([g for g, _, _ in runs], n)
            ends += b"data: " + json_encode(chunks[0].head | {"choices": [], "usage": totals}) + b"\n\n"
        return ends + DONE

    return lm.event_stream(request, model, merged(runs), cancel_all(runs), events_of, last, endpoint,
                           lambda e: lm.sse(openai_error(e)) + DONE)
