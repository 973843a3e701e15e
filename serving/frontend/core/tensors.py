"""V2 tensors however they travel, read and checked by one set of rules: JSON `data`, the binary
tensor extension's raw bytes after a JSON header (REST), and gRPC's raw_input_contents or typed
contents. Our models take input_ids (INT64 [B, T], right-padded) and lengths (INT64 [B], or [B, 1] as Triton's
clients send it from the model configuration's dims [1]).

A binary REST body is the JSON header, whose length the Inference-Header-Content-Length header
gives, then each input's raw little-endian row-major bytes in the order the JSON lists them, each
sized by the input's parameters.binary_data_size. Answers are built the same way when asked for
(serving/frontend/routes/v2.py).
"""
import math
from typing import NamedTuple

import msgspec
import numpy as np
from pydantic import ValidationError
from core.repository import Version
from serving.common.messages import Rows
from serving.frontend.core.refused import Refused, invalid

HEADER_LENGTH = "Inference-Header-Content-Length"


class Input(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list  # flat little-endian int64, or JSON data (flat or nested)


def split(body: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    """(the JSON header, the binary part) of a V2 REST request body."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit():
        raise Refused(400, f"{HEADER_LENGTH} must be a number of bytes, not {header_length[:40].decode('latin-1')!r}")
    if int(header_length) > len(body):
        raise Refused(400, f"{HEADER_LENGTH} is {int(header_length)} but the body has {len(body)} bytes")
    return body[: int(header_length)], body[int(header_length):]


def unsplit(error: ValidationError, body: bytes) -> Refused:
    """Why a body sent without the Inference-Header-Content-Length header was refused: one that is
    not JSON was meant as a binary body, which needs the header; else the fields wrong."""
    if any(e["type"] == "json_invalid" for e in error.errors()):
        return Refused(400, f"the body is not JSON ({len(body)} bytes): a binary body (the JSON header, then raw "
                            f"tensor bytes) needs the {HEADER_LENGTH} header, the JSON header's length in bytes")
    return invalid(error)


def from_bytes(name: str, datatype: str, shape: list[int], data: bytes) -> np.ndarray:
    """One input's raw bytes as a flat int64 array, if they are exactly shape x datatype."""
    if datatype != "INT64":
        raise Refused(400, f"input {name}: datatype must be INT64, not {datatype}")
    if any(d < 0 for d in shape):
        raise Refused(400, f"input {name}: shape {shape} has a negative dimension")
    if len(data) != math.prod(shape) * 8:
        raise Refused(400, f"input {name}: {len(data)} bytes, but shape {shape} of INT64 is {math.prod(shape) * 8}")
    return np.frombuffer(data, "<i8")


def inputs_of(tensors: list, binary: bytes) -> list[Input]:
    """The inputs of a REST request (schemas.TensorInput): each takes the next binary_data_size
    bytes of the binary part, or its JSON data; the sizes must account for every byte."""
    inputs, offset = [], 0
    for t in tensors:
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            if t.data is None:
                raise Refused(400, f"input {t.name} has neither data nor parameters.binary_data_size")
            inputs.append(Input(t.name, t.datatype, t.shape, t.data))
            continue
        if type(size) is not int or size < 0:
            raise Refused(400, f"input {t.name}: binary_data_size must be a whole number of bytes, not {size!r}")
        if offset + size > len(binary):
            raise Refused(400, f"input {t.name}: binary_data_size {size} runs past the body "
                                     f"({len(binary) - offset} bytes left after the JSON header)")
        inputs.append(Input(t.name, t.datatype, t.shape, from_bytes(t.name, t.datatype, t.shape, binary[offset: offset + size])))
        offset += size
    if offset != len(binary):
        raise Refused(400, f"the body has {len(binary)} bytes after the JSON header but the inputs' "
                                 f"binary_data_size add up to {offset}")
    return inputs


def flat(data: list) -> list:
    while data and isinstance(data[0], list):
        data = [x for row in data for x in row]
    return data


def integers(t: Input) -> np.ndarray:
    """A tensor's values as flat int64: raw bytes are; JSON data must hold integers and nothing
    else (a float or a boolean is refused, never truncated)."""
    if not isinstance(t.values, list):
        return t.values
    try:
        return np.asarray(msgspec.convert(flat(t.values), list[int]), np.int64)
    except (msgspec.ValidationError, OverflowError) as e:
        raise Refused(400, f"input {t.name}: INT64 data must be integers: {e}") from None


def rows_within(inputs: list[Input], version: Version, max_instances: int, max_response_bytes: int) -> Rows:
    """The rows of a V2 request, checked, within the model's rules, the same for every transport:
    a classifier reads at most max_len tokens of a row, and a longer row is refused (V1 cuts a
    text there, but a tensor is never changed); a language model's answer, rows x length x
    vocabulary floats, must fit in max_response_bytes."""
    manifest, vocab = version.manifest, len(version.codec.vocab)
    rows = rows_from(inputs, vocab, max_instances)
    longest = int(rows.lengths.max())
    if manifest.task == "classifier" and longest > manifest.max_len:
        raise Refused(400, f"input_ids: a row of {longest} tokens; this model reads at most max_len "
                                 f"{manifest.max_len} (cut rows to it, as V1 cuts texts)")
    if manifest.task == "lm" and (size := rows.count * longest * vocab * 4) > max_response_bytes:
        raise Refused(413, f"the answer would be {size} bytes ({rows.count} rows x {longest} tokens x {vocab} "
                                 f"logits); at most {max_response_bytes} (RNNSERVE_MAX_RESPONSE_BYTES)")
    return rows


def rows_from(inputs: list[Input], vocab_size: int, max_instances: int) -> Rows:
    """Check input_ids and lengths; the rows of input_ids without their padding, end to end."""
    tensors = {t.name: t for t in inputs}
    if sorted(tensors) != ["input_ids", "lengths"] or len(inputs) != 2:
        raise Refused(400, f"expected inputs input_ids and lengths, got {[t.name for t in inputs]}")
    for t in inputs:
        if t.datatype != "INT64":
            raise Refused(400, f"input {t.name}: datatype must be INT64, not {t.datatype}")
    ids_t, len_t = tensors["input_ids"], tensors["lengths"]
    if len(len_t.shape) == 2 and len_t.shape[1] == 1:  # [B, 1]: the model configuration's dims [1]
        len_t = len_t._replace(shape=len_t.shape[:1])
    if len(ids_t.shape) != 2 or len(len_t.shape) != 1 or ids_t.shape[0] != len_t.shape[0]:
        raise Refused(400, f"shapes must be input_ids [B, T] and lengths [B], got {ids_t.shape} and {len_t.shape}")
    batch, seq = ids_t.shape
    if batch < 1 or seq < 1:
        raise Refused(400, f"empty input_ids shape {ids_t.shape}")
    if batch > max_instances:
        raise Refused(413, f"{batch} rows; at most {max_instances} per request")
    ids, lengths = integers(ids_t), integers(len_t)
    if ids.ndim != 1 or ids.size != batch * seq or lengths.ndim != 1 or lengths.size != batch:
        raise Refused(400, f"data lengths {ids.size} and {lengths.size} do not match shapes {ids_t.shape} and {len_t.shape}")
    if lengths.min() < 1 or lengths.max() > seq:
        raise Refused(400, f"lengths must be within 1..{seq}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise Refused(400, f"token ids must be within 0..{vocab_size - 1}")
    ids = ids.reshape(batch, seq)
    return Rows(ids[np.arange(seq) < lengths[:, None]].astype(np.int32), lengths.astype(np.int32))


def wants_binary(request) -> bool:
    """Whether a REST request (schemas.InferRequest) asks for its output as raw bytes: the output's
    own parameters.binary_data, else the request's parameters.binary_data_output (a boolean)."""
    asked = next((o.parameters for o in request.outputs or [] if o.parameters and "binary_data" in o.parameters), None)
    name, value = ("binary_data", asked["binary_data"]) if asked else \
        ("binary_data_output", (request.parameters or {}).get("binary_data_output", False))
    if type(value) is not bool:
        raise Refused(400, f"{name} must be true or false, not {value!r}")
    return value
