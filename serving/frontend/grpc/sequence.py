"""Triton's sequences on ModelStreamInfer: the requests that name one sequence_id advance one state
of a language model, as a stateful model behind Triton's sequence batcher does, each answering the
next-token distribution after its text (the core's sessions, serving/frontend/core/sessions.py,
as REST's sessions are).

sequence_start begins the sequence at the zero state (one of that id that is live begins again),
sequence_end ends it after its step; a sequence idle for RNNSERVE_SESSION_IDLE_S ends too, and so
does every sequence of a version that is replaced. The id (uint64 or string, one namespace per
model) names the state on the engine that runs the model's generations, so a later request may
come on any stream, to any front-end; a stream runs its own requests of a sequence in the order
they came (stream.py). A request carries text_input (BYTES) and may ask for top_k (a request
parameter or in sampling_parameters; default 5, at most 100). It answers next_tokens (BYTES [k],
the most likely first), next_probabilities (FP32 [k]) and total_tokens (INT64 [1]: read by the
sequence so far).

So that a sequence goes on on any replica, a request may carry the state as a token (BYTES input
`state`, from the answer before) and start from it, on this replica (which opens the sequence if
it does not hold it); with it, or with the parameter return_state true, it also answers `state`
(BYTES [1]), the token after its step (serving/frontend/core/state_token.py).
"""
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from serving.frontend.core import sessions, tensors
from serving.frontend.core.front import Front
from serving.frontend.core.refused import Refused
from serving.frontend.grpc import inputs


def sequence_id(request: pb.ModelInferRequest) -> str | None:
    """The request's sequence_id, None outside a sequence (no id, 0 or "", as Triton reads it)."""
    if "sequence_id" not in request.parameters:
        return None
    p = request.parameters["sequence_id"]
    value = getattr(p, p.WhichOneof("parameter_choice") or "string_param")
    return None if value in (0, "") else str(value)


def flag(request: pb.ModelInferRequest, name: str) -> bool:
    return name in request.parameters and request.parameters[name].bool_param


def asked(request: pb.ModelInferRequest) -> tuple[str, int, str | None, bool]:
    """A sequence request's text, top_k, state token and return_state; anything else it asks for is
    a 400."""
    values = inputs.inputs(request)
    parameters = inputs.sampling(request, values)
    if other := sorted(set(values) - {"text_input", "state"}) + sorted(set(parameters) - {"top_k", "return_state"}):
        raise Refused(400, f"{other}: a sequence request reads text_input (and state) and answers the next token's "
                           "top_k; it does not generate (for that, send no sequence_id)")
    top_k = sessions.top_k_within(parameters.get("top_k", sessions.TOP_K))
    if type(return_state := parameters.get("return_state", False)) is not bool:
        raise Refused(400, f"return_state must be a boolean, not {return_state!r}")
    if not values.get("text_input"):
        raise Refused(400, "a sequence request needs text_input")
    return values["text_input"], top_k, values.get("state"), return_state


async def step(front: Front, request: pb.ModelInferRequest, sid: str, send):
    """Advance sequence `sid` over the request's text (opening it first, ending it after, as the
    request says) and send the next token's top k."""
    name = request.model_name
    text, top_k, state, return_state = asked(request)
    codec, version, _, stepped, token = await sessions.step_sequence(
        front, name, sid, request.model_version or None, text, top_k, flag(request, "sequence_start"),
        flag(request, "sequence_end"), state, return_state)
    best = sessions.most_likely(codec, stepped)
    tensor = pb.ModelInferResponse.InferOutputTensor
    outputs = [tensor(name="next_tokens", datatype="BYTES", shape=[len(best)]),
               tensor(name="next_probabilities", datatype="FP32", shape=[len(best)]),
               tensor(name="total_tokens", datatype="INT64", shape=[1])]
    contents = [tensors.serialized([t for t, _ in best]), np.array([p for _, p in best], "<f4").tobytes(),
                np.array([stepped.total_tokens], "<i8").tobytes()]
    if token is not None:
        outputs.append(tensor(name="state", datatype="BYTES", shape=[1]))
        contents.append(tensors.serialized([token]))
    send(pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
        model_name=name, model_version=str(version), id=request.id,
        parameters={"triton_final_response": pb.InferParameter(bool_param=True)},
        outputs=outputs, raw_output_contents=contents)))
