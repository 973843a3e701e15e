"""Who may call what, for HTTP and gRPC alike: RNNSERVE_CONTROL_TOKEN as a bearer token on model
control (and on inference with RNNSERVE_TOKEN_FOR_INFERENCE); model control closed without a
token unless RNNSERVE_CONTROL=open, like Triton's --model-control-mode=none."""
import secrets

from serving.common.settings import Settings

NEEDS_TOKEN = "this endpoint needs Authorization: Bearer <RNNSERVE_CONTROL_TOKEN>"


def token_of(settings: Settings) -> bytes | None:
    return settings.control_token.get_secret_value().encode() if settings.control_token else None


def bearer_matches(token: bytes, authorization: bytes) -> bool:
    """Whether an Authorization value ("Bearer <token>") carries this token (compared in constant time)."""
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), token)


def control_closed(settings: Settings) -> str | None:
    """Why model control answers 403, or None where it is open (to the token's holders, or to all)."""
    if settings.control_token is None and settings.control != "open":
        return ("model control is closed: set RNNSERVE_CONTROL_TOKEN (bearer token) "
                "or RNNSERVE_CONTROL=open (trusted networks only)")
    return None
