"""The inputs and parameters of a request on Triton's stream (ModelStreamInfer) as its LLM
backends take them: text_input (BYTES), stream and exclude_input_in_output (BOOL),
sampling_parameters (BYTES, a JSON object), one element each; the sampling parameters may also be
the request's own parameters. Read here for generation (stream.py) and sequences
(sequence.py) alike.
"""
import json

from tritonclient.grpc import service_pb2 as pb

from serving.frontend.core import tensors
from serving.frontend.core.refused import Refused

LLM_INPUTS = {"text_input": "BYTES", "sampling_parameters": "BYTES", "stream": "BOOL", "exclude_input_in_output": "BOOL",
              "state": "BYTES"}  # state: a sequence's state token (sequence.py)
READ_FACTOR = 2  # gRPC reads messages up to this many times max_body_bytes; within() refuses past 1x
NOT_SAMPLING = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                "triton_enable_empty_final_response"}  # request parameters that tritonclient sets itself


def within(request, limit: int):
    """413 (RESOURCE_EXHAUSTED, with the request id as every refusal) for a message over `limit`
    bytes (RNNSERVE_MAX_BODY_BYTES). gRPC itself reads messages up to twice that (READ_FACTOR) so
    that this answer is ours; past that, its own RESOURCE_EXHAUSTED has no request id."""
    if (size := request.ByteSize()) > limit:
        raise Refused(413, f"a message of {size} bytes; at most {limit} (RNNSERVE_MAX_BODY_BYTES)")


def element(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None):
    """The one element of a BYTES or BOOL input, from its raw bytes (BYTES as Triton serializes
    them: tensors.unserialized) or its typed contents."""
    if LLM_INPUTS.get(t.name) != t.datatype:
        raise Refused(400, f"input {t.name}: a language model takes {sorted(LLM_INPUTS)}; "
                                 f"{t.name} must be {LLM_INPUTS.get(t.name, 'none of them')}")
    if [d for d in t.shape if d != 1]:
        raise Refused(400, f"input {t.name}: one element per request, not shape {list(t.shape)}")
    if t.datatype == "BOOL":
        if raw is None:
            return bool(t.contents.bool_contents[0]) if t.contents.bool_contents else None
        if len(raw) != 1:
            raise Refused(400, f"input {t.name}: one BOOL is 1 byte, not {len(raw)}")
        return raw != b"\0"
    if raw is None:
        value = t.contents.bytes_contents[0] if t.contents.bytes_contents else None
    elif len(elements := tensors.unserialized(t.name, raw)) != 1:
        raise Refused(400, f"input {t.name}: one BYTES element per request, not {len(elements)}")
    else:
        value = elements[0]
    try:
        return None if value is None else value.decode()
    except UnicodeDecodeError:
        raise Refused(400, f"input {t.name} is not UTF-8 text") from None


def inputs(request: pb.ModelInferRequest) -> dict:
    """A stream request's inputs, each its one element, by name."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise Refused(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    return {t.name: element(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}


def sampling(request: pb.ModelInferRequest, values: dict) -> dict:
    """The sampling parameters: the sampling_parameters input's JSON object and the request's own
    parameters (each given once)."""
    parameters = {name: getattr(p, p.WhichOneof("parameter_choice")) for name, p in request.parameters.items()
                  if name not in NOT_SAMPLING}
    try:
        asked = json.loads(values.pop("sampling_parameters", None) or "{}")
    except json.JSONDecodeError as e:
        raise Refused(400, f"sampling_parameters is not JSON: {e}") from None
    if not isinstance(asked, dict):
        raise Refused(400, "sampling_parameters must be a JSON object")
    if twice := sorted(set(asked) & set(parameters)):
        raise Refused(400, f"{twice} given both in sampling_parameters and as request parameters")
    return asked | parameters
