"""State tokens: a language model's RNN state handed to the client, signed, so that a session can
go on on any replica that holds the same key (RNNSERVE_STATE_KEY), with no store and no affinity.

    token = base64url(format | key id | version | tokens read | len(model) | model | state | HMAC-SHA256)

The format byte comes first so that the layout can change; the key id (4 bytes of an HMAC of a
fixed text under the key) tells a token signed with another key from one tampered with; the state
is every state input's (layers, H) float32 as the engine keeps it (engine/generation.py). The MAC
covers everything before it. A 1-layer GRU of 256 units: 1,024 bytes of state, a token of 1,452
characters for timemachine-gru (docs/benchmarks.md: `python -m loadtest state`).
"""
import binascii
import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

from serving.frontend.core.refused import Refused

FORMAT = 1
HEADER = struct.Struct("<B4sIQB")  # format, key id, version, tokens read, len(model name)
MAC_BYTES = 32  # HMAC-SHA256, whole
TO_URLSAFE, FROM_URLSAFE = bytes.maketrans(b"+/", b"-_"), bytes.maketrans(b"-_", b"+/")  # base64url <-> base64
LOCAL_ONLY = ("this server keeps session state only locally: RNNSERVE_STATE_KEY is not set, so it neither "
              "signs nor reads state tokens (use a session's id, on the replica that holds it)")


@dataclass(frozen=True, slots=True)
class Carried:
    """What a token carries."""
    model: str
    version: int
    tokens: int  # read so far
    state: bytes  # every state input's (layers, H) float32, one after another


@functools.lru_cache(maxsize=4)
def key_id(key: bytes) -> bytes:
    return hmac.digest(key, b"rnnserve state key id", "sha256")[:4]


def seal(key: bytes, carried: Carried) -> str:
    """The token for `carried`, signed with `key`."""
    model = carried.model.encode()
    body = HEADER.pack(FORMAT, key_id(key), carried.version, carried.tokens, len(model)) + model + carried.state
    signed = body + hmac.digest(key, body, "sha256")
    return binascii.b2a_base64(signed, newline=False).translate(TO_URLSAFE).rstrip(b"=").decode()


def unseal(key: bytes, token: str, model: str) -> Carried:
    """What a token carries, if it is whole, signed with `key` and for `model`; else a 400 saying
    which it is not."""
    try:  # strict: a character outside the alphabet is refused, never skipped
        raw = binascii.a2b_base64(token.encode().translate(FROM_URLSAFE) + b"=" * (-len(token) % 4), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise Refused(400, "state: malformed token (not base64url)") from None
    if len(raw) < HEADER.size + MAC_BYTES:
        raise Refused(400, f"state: malformed token (too short: {len(raw)} bytes)")
    if raw[0] != FORMAT:
        raise Refused(400, f"state: malformed token (format {raw[0]}; this server reads format {FORMAT})")
    _, signer, version, tokens, length = HEADER.unpack_from(raw)
    body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if signer != key_id(key):
        raise Refused(400, "state: the token was signed with another key (RNNSERVE_STATE_KEY differs between "
                           "the replicas, or was changed)")
    if not hmac.compare_digest(mac, hmac.digest(key, body, "sha256")):
        raise Refused(400, "state: the token was tampered with (its signature does not match)")
    name = body[HEADER.size: HEADER.size + length].decode()
    if name != model:
        raise Refused(400, f"state: the token is for model {name!r}, not {model!r}")
    return Carried(name, version, tokens, body[HEADER.size + length:])
