"""What every request meets before its route or method, on every transport, written once: its id,
the bearer token where one is asked for (model control closed unless it is opened), shedding when
its model's queue is full, its span, and its count in /metrics with the status it was answered
with. A client that left is counted here, once, as 499."""
import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from serving.common import metrics, tracing
from serving.common.logs import start_request
from serving.frontend.access import NEEDS_TOKEN, bearer_matches, control_closed, token_of
from serving.frontend.client import EngineClient
from serving.frontend.core.front import ANSWERING, Front
from serving.frontend.core.refused import Refused, busy, unexpected

LEFT = 499  # the status a request is counted with when its client left before it was answered


@dataclass
class Outcome:
    request_id: str
    endpoint: str = ""  # an inference endpoint's name in /metrics; "" for a request not counted
    status: int | None = None  # the HTTP status it was answered with (gRPC: the status its code stands for)
    answered: bool = False  # the transport has begun its answer: an error now cannot change it
    model: str = ""  # its model label in /metrics (counted() sets it; named() where the body names the model)
    version: str = metrics.NO_VERSION  # the version that answered it (front.served() sets it), its label in /metrics


@contextmanager
def counted(client: EngineClient | None, name: str, outcome: Outcome):
    """A request counted once, however it is answered: in flight while it runs, then its status
    and latency in /metrics under the version that answered it; one that ended unanswered, its
    client gone (e.g. before it sent its whole body), as 499."""
    outcome.model, started = label(client, name), time.perf_counter()
    answering = ANSWERING.set(outcome)  # for front.served(), where its version is chosen
    metrics.of(metrics.IN_FLIGHT, outcome.model).inc()
    try:
        yield outcome
    finally:
        ANSWERING.reset(answering)
        metrics.of(metrics.IN_FLIGHT, outcome.model).dec()
        labels = outcome.model, outcome.version, outcome.endpoint
        metrics.of(metrics.REQUESTS, *labels, str(outcome.status or LEFT)).inc()
        metrics.of(metrics.REQUEST_LATENCY, *labels).observe(time.perf_counter() - started)


def label(client: EngineClient | None, name: str) -> str:
    """A request's model label: the name if a model is deployed under it, else NOT_DEPLOYED."""
    return name if client and client.deployed(name) else metrics.NOT_DEPLOYED


def named(client: EngineClient | None, outcome: Outcome | None, name: str):
    """A counted request whose model is named in its body, not its path (OpenAI's): counted under
    that model from now on, in flight and when it is answered, and its span says which."""
    tracing.set_attributes(**{"rnnserve.model": name})
    if outcome and outcome.endpoint and (model := label(client, name)) != outcome.model:
        metrics.of(metrics.IN_FLIGHT, outcome.model).dec()
        outcome.model = model
        metrics.of(metrics.IN_FLIGHT, model).inc()


def shed(client: EngineClient | None, name: str):
    """A 503 for a model whose queue is full at every engine serving it, before its body is read."""
    if client and (limit := client.full(name)):
        raise busy(f"model {name!r} has {limit} or more requests waiting; retry shortly")


def admit(front: Front, guard: str | None, authorization: bytes):
    """403 for model control while it is closed; 401 without the token where `guard` asks for it
    ("control", or "inference" with token_for_inference)."""
    settings = front.settings
    if guard == "control" and (closed := control_closed(settings)):
        raise Refused(403, closed)
    guarded = guard == "control" or (guard == "inference" and settings.token_for_inference)
    if guarded and (token := token_of(settings)) and not bearer_matches(token, authorization):
        raise Refused(401, NEEDS_TOKEN)


def begun(request_id: str, endpoint: str = "") -> Outcome:
    """A request's Outcome, its id set for every log line it causes (the client's if sane, else a
    new one); endpoint: its name in /metrics, "" for a request not counted."""
    return Outcome(start_request(request_id), endpoint)


@contextmanager
def entered(front: Front, outcome: Outcome, span: str, carrier: dict, authorization: bytes, guard: str | None = None,
            model: str = "", queued: bool = False, counted_as: Callable[[int], int] = int, **attributes
            ) -> Iterator[Outcome]:
    """A request (begun()) inside its envelope: admitted, shed if `queued` and its model's queue is full, inside its span if it has one (its parent the caller's, from
    `carrier`: HTTP headers or gRPC metadata), and counted under its endpoint if it has one. The transport sets
    outcome.status as it answers; a Refused sets it here and goes on to the transport, anything
    unexpected before an answer began becomes a Refused 500, and a cancelled request not answered
    is counted as 499.
    counted_as: the status a refusal's is counted as (gRPC: the one its code stands for)."""
    count = counted(front.engines, model, outcome) if outcome.endpoint else nullcontext(outcome)
    traced = tracing.server_span(span, carrier, **attributes, **{"rnnserve.request_id": outcome.request_id}) \
        if span else nullcontext()
    with count, traced:
        front.in_flight += 1
        try:
            admit(front, guard, authorization)
            if queued:
                shed(front.engines, model)
            yield outcome
        except Refused as e:
            if not outcome.answered:
                outcome.status = counted_as(e.status)
            raise
        except asyncio.CancelledError:
            outcome.status = outcome.status or LEFT
            raise
        except Exception as e:
            if outcome.answered:  # e.g. the client went while it was sent: the transport's to handle
                raise
            outcome.status = counted_as(500)
            raise unexpected(e) from None
        finally:
            front.in_flight -= 1
            tracing.set_attributes(**{"http.response.status_code": outcome.status or LEFT})
