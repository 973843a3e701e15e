"""V2 tensors however they travel, read and checked by one set of rules: JSON `data`, the binary
tensor extension's raw bytes after a JSON header (REST), and gRPC's raw_input_contents or typed
contents. Our models take input_ids (INT64 [B, T], right-padded) and lengths (INT64 [B], or [B, 1] as Triton's
clients send it from the model configuration's dims [1]); a classifier also takes text_input (BYTES [B] or
[B, 1], one UTF-8 text per row) instead, and answers probabilities (FP32 [B, C]) and label (BYTES [B])
beside logits.

A binary REST body is the JSON header, whose length the Inference-Header-Content-Length header
gives, then each input's raw little-endian row-major bytes in the order the JSON lists them, each
sized by the input's parameters.binary_data_size; BYTES elements are laid out as Triton serializes
them (each a 4-byte little-endian length, then the bytes), there and in gRPC's raw contents. Answers
are built the same way when asked for (serving/frontend/routes/v2.py).
"""
import math
import struct
from typing import NamedTuple

import msgspec
import numpy as np
from pydantic import ValidationError
from core.codec import softmax
from core.repository import Manifest, Version
from serving.common.messages import Rows
from serving.frontend.core.refused import Refused, invalid

HEADER_LENGTH = "Inference-Header-Content-Length"
IDS, TEXT = ["input_ids", "lengths"], "text_input"
CLASSIFIER_OUTPUTS = ["logits", "probabilities", "label"]


class Input(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list  # flat little-endian int64, BYTES elements, or JSON data (flat or nested)


class Output(NamedTuple):
    name: str
    datatype: str  # FP32 or BYTES
    values: np.ndarray | list[str]  # FP32 any shape, or BYTES [B]

    @property
    def shape(self) -> list[int]:
        return [len(self.values)] if self.datatype == "BYTES" else list(self.values.shape)

    def data(self) -> list:
        """The values as JSON data: flat, row-major."""
        return self.values if self.datatype == "BYTES" else self.values.ravel().tolist()

    def raw(self) -> bytes:
        """The values as raw bytes: little-endian FP32, or BYTES elements serialized."""
        return serialized(self.values) if self.datatype == "BYTES" else self.values.astype("<f4", copy=False).tobytes()


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


def from_bytes(name: str, datatype: str, shape: list[int], data: bytes) -> np.ndarray | list[bytes]:
    """One input's raw bytes as a flat int64 array, or its BYTES elements, if they are exactly shape x datatype."""
    if datatype not in ("INT64", "BYTES"):
        raise Refused(400, f"input {name}: datatype must be INT64 (input_ids, lengths) or BYTES (text_input), "
                           f"not {datatype}")
    if any(d < 0 for d in shape):
        raise Refused(400, f"input {name}: shape {shape} has a negative dimension")
    if datatype == "BYTES":
        if len(elements := unserialized(name, data)) != math.prod(shape):
            raise Refused(400, f"input {name}: {len(elements)} BYTES elements, but shape {shape} holds {math.prod(shape)}")
        return elements
    if len(data) != math.prod(shape) * 8:
        raise Refused(400, f"input {name}: {len(data)} bytes, but shape {shape} of INT64 is {math.prod(shape) * 8}")
    return np.frombuffer(data, "<i8")


def unserialized(name: str, data: bytes) -> list[bytes]:
    """BYTES elements as Triton serializes them: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data) or offset + 4 + (size := struct.unpack_from("<I", data, offset)[0]) > len(data):
            raise Refused(400, f"input {name}: BYTES element {len(elements)} runs past the tensor's bytes "
                               "(each element is a 4-byte little-endian length, then that many bytes)")
        elements.append(data[offset + 4: offset + 4 + size])
        offset += 4 + size
    return elements


def serialized(values: list[str]) -> bytes:
    """BYTES elements as Triton lays them out (and unserialized() reads them): each a 4-byte
    little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(data)) + data for data in (v.encode() for v in values))


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


def texts(t: Input) -> list[str]:
    """Check text_input (BYTES [B] or [B, 1]: the model configuration's dims [1]); its texts, one
    per row (their number and sizes are checked as V1's are: front.check_texts)."""
    if t.datatype != "BYTES":
        raise Refused(400, f"input {TEXT}: datatype must be BYTES (one UTF-8 text per row), not {t.datatype}")
    if not (len(t.shape) == 1 or len(t.shape) == 2 and t.shape[1] == 1) or t.shape[0] < 1:
        raise Refused(400, f"input {TEXT}: shape must be [B] (or [B, 1]) with B >= 1, got {t.shape}")
    values = flat(t.values)  # JSON: strings; raw or gRPC's bytes_contents: bytes
    if len(values) != t.shape[0]:
        raise Refused(400, f"input {TEXT}: {len(values)} elements do not match shape {t.shape}")
    if all(type(text) is str for text in values):
        return values
    try:
        return [text.decode() for text in values]
    except UnicodeDecodeError:
        raise Refused(400, f"input {TEXT}: an element is not UTF-8 text") from None
    except AttributeError:
        raise Refused(400, f"input {TEXT}: BYTES data must be strings") from None


def text_of(inputs: list[Input]) -> Input | None:
    """The text_input of a request that sends text, or None for one that sends ids; never both."""
    names = [t.name for t in inputs]
    if TEXT not in names:
        return None
    if names != [TEXT]:
        raise Refused(400, f"send either {TEXT} or {IDS[0]} and {IDS[1]}, not both, got inputs {names}")
    return inputs[0]


def outputs_named(manifest: Manifest, asked: list[str], text: bool) -> list[str]:
    """The outputs to answer: those asked for, each once, of the model's; none asked: every one for
    a text, logits alone for ids (as before text came)."""
    given = CLASSIFIER_OUTPUTS if manifest.task == "classifier" else CLASSIFIER_OUTPUTS[:1]
    if unknown := [name for name in asked if name not in given]:
        raise Refused(400, f"unknown outputs {unknown}; this model gives {given}")
    if len(set(asked)) != len(asked):
        raise Refused(400, f"outputs {asked}: each output may be asked for once")
    return asked or (given if text else given[:1])


def outputs_of(manifest: Manifest, logits: np.ndarray, names: list[str]) -> list[Output]:
    """The outputs named, from the logits: a classifier's probabilities are V1's softmax, and its
    label the class of the highest (the first of equals, as V1's)."""
    if names == ["logits"]:
        return [Output("logits", "FP32", logits)]
    p = softmax(logits, axis=1)  # (B, C)
    labels = [manifest.labels[i] for i in p.argmax(axis=1).tolist()]
    values = {"logits": logits, "probabilities": p, "label": labels}
    return [Output(name, "BYTES" if name == "label" else "FP32", values[name]) for name in names]


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
    if sorted(tensors) != IDS or len(inputs) != 2:
        raise Refused(400, f"expected inputs input_ids and lengths (or a classifier's text_input), "
                           f"got {[t.name for t in inputs]}")
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


def wants_binary(request, names: list[str]) -> list[bool]:
    """Which of the outputs named a REST request (schemas.InferRequest) asks for as raw bytes: each
    output's own parameters.binary_data, else the request's parameters.binary_data_output (booleans)."""
    default = (request.parameters or {}).get("binary_data_output", False)
    own = {o.name: o.parameters["binary_data"] for o in request.outputs or [] if o.parameters and "binary_data" in o.parameters}
    for name, value in [("binary_data_output", default), *(("binary_data", v) for v in own.values())]:
        if type(value) is not bool:
            raise Refused(400, f"{name} must be true or false, not {value!r}")
    return [own.get(name, default) for name in names]
