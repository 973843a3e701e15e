"""Server settings: one pydantic-settings class, every field also RNNSERVE_<NAME> in the environment.

    python -m serving.common.settings > docs/settings.md    # the reference (a test keeps it in step)
"""
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

INT32_MAX = 2**31 - 1  # gRPC's channel arguments are C ints


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_")

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    grpc_port: int = Field(0, ge=0, description="KServe V2 over gRPC on this port (Triton's is 8001); 0: off, so "
                                                "that nothing listens unasked and local servers do not collide "
                                                "on a second fixed port (the image sets 8001)")
    workers: int = Field(0, ge=0, description="HTTP front-end processes on the port (a socket each: SO_REUSEPORT); "
                                              "0: one per CPU core (with GPUs, less one per engine)")
    engines: int = Field(0, ge=0, description="inference engine processes, each owning the sessions on its device; "
                                              "0: one per CUDA device, else one per CPU core")
    engine_addresses: list[str] = Field([], description="the engines' Unix socket paths (python -m serving sets them)")
    runtime_dir: Path | None = Field(None, description="the server's own folder for what its processes share: sockets, "
                                                       "metrics, what model control asked of each engine (python -m "
                                                       "serving sets it)")
    repository: Path = Field(Path("model_repository"), description="every model folder in it is loaded at start-up")
    model_versions: dict[str, int] = Field({}, description='pinned versions, e.g. {"imdb-gru": 1}; otherwise the latest')

    # model control (/v2/repository) and shutdown
    control: Literal["closed", "open"] = Field(
        "closed", description="closed: /v2/repository/* answers 403 unless control_token is set; open: anyone who "
                              "reaches the port may load and unload (trusted networks only)")
    control_token: SecretStr | None = Field(None, description="bearer token for /v2/repository/*; set, it opens model "
                                                              "control to its holders")
    @field_validator("control_token")
    @classmethod
    def not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        """An empty token (a Kubernetes secret marked optional can give one) would ask for none."""
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("RNNSERVE_CONTROL_TOKEN is empty: it would open model control to anyone; give it a "
                             "token, or unset it (model control then stays closed)")
        return token

    state_key: SecretStr | None = Field(None, description="signs the state tokens that let a language model's "
                                                          "session go on on any replica (HMAC-SHA256; the same on "
                                                          "every replica, e.g. from a Kubernetes Secret; at least 16 "
                                                          "characters); unset: sessions keep their state only here, "
                                                          "and a step that asks for a token is a 409")

    @field_validator("state_key")
    @classmethod
    def long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        """A short key (an empty one from an optional secret included) would sign tokens anyone can forge."""
        if key is not None and len(key.get_secret_value().strip()) < 16:
            raise ValueError("RNNSERVE_STATE_KEY has fewer than 16 characters: give it a long random one "
                             "(e.g. openssl rand -hex 32), or unset it (sessions then keep their state locally)")
        return key

    token_for_inference: bool = Field(False, description="also require the token on /v1/models* and /v2/models* "
                                                         "(health, /v2 and /metrics stay open)")
    repository_poll_s: float = Field(0.0, ge=0, description="look for new model versions this often and deploy them; "
                                                            "0: only on a load call")
    control_sync_s: float = Field(1.0, gt=0, description="how often each engine expires idle sessions, checks the "
                                                         "poll and releases retired versions")
    drain_serve_s: float = Field(5.0, ge=0, description="on SIGTERM, how long readiness answers 503 (gRPC ServerReady "
                                                        "false) while every request is still served, its answer "
                                                        "closing its connection: the time a load balancer takes to "
                                                        "see the replica unready, or Kubernetes to take a terminating "
                                                        "pod out of its Service (a preStop sleep's usual 5 s); most "
                                                        "balancers do not retry a POST, so a 503 meanwhile would be "
                                                        "a failed request; 0: no such window")
    drain_s: float = Field(5.0, ge=0, description="then how long the port stays open while every answer closes "
                                                  "its connection and new requests get 503 with Retry-After (an "
                                                  "answer, not a reset); 5 as uvicorn's keep-alive timeout, so that "
                                                  "every connection idle at SIGTERM is closed by then; 0: close the "
                                                  "port at once")
    shutdown_grace_s: float = Field(30.0, ge=0, description="after the drain (and when a swapped-out version drains), "
                                                            "how long the requests in flight may take")

    tracing: Literal["off", "otlp"] = Field("off", description="otlp: OpenTelemetry spans from every process, "
                                                            "exported as the standard OTEL_* variables say "
                                                            "(serving/common/tracing.py)")

    # ONNX Runtime
    providers: list[str] = Field(["CUDAExecutionProvider", "CPUExecutionProvider"],
                                 description="the first available one is used, and shown in each model's metadata; "
                                             "with CUDA first and a GPU visible, a model that cannot run on it is "
                                             "not served (set [\"CPUExecutionProvider\"] to serve on the CPU)")
    provider_options: dict[str, dict[str, str]] = Field(
        {}, description="options per execution provider, merged option by option over the defaults "
                        "(CUDA: use_tf32 0, which keeps rows exact to 1e-5) and under a model's config.json")
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads per model (on 2 cores one thread "
                                                       "leaves the other to the event loop)")
    spin_wait: bool = Field(False, description="spinning intra-op threads (they compete with the event loop)")
    engine_spin_us: float = Field(1000.0, ge=0, description="after a request that came alone, from a front-end with "
                                                            "nothing else in flight (a user waiting for each answer), "
                                                            "how long the engine keeps polling before it sleeps, so "
                                                            "that the next one starts without a wake-up (at most "
                                                            "50 ms); 0: it sleeps at once")
    device_thread: bool | None = Field(None, description="run classifier calls on a thread beside the engine's loop, "
                                                         "which forms the next batch meanwhile; unset: on with a GPU, "
                                                         "off on the CPU (slower on 2 cores: docs/benchmarks.md)")

    # dynamic batching
    max_batch_size: int | None = Field(None, ge=1, description="rows per ONNX Runtime call; unset: 16 on the CPU, "
                                                               "1024 on CUDA (docs/benchmarks.md)")
    max_batch_tokens: int | None = Field(None, ge=1, description="rows x padded length per call; unset: 4096 on the "
                                                                 "CPU, 262144 on CUDA")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="how long a batch waits for more rows after its first")
    max_queue_size: int = Field(1024, ge=1, description="waiting requests per model; beyond it 503 with Retry-After")
    request_timeout_s: float = Field(30.0, ge=0, description="queue plus inference (a generation: each token); "
                                                             "beyond it 504")

    # language models
    max_new_tokens: int = Field(1000, ge=1, description="the most a generate request may ask for")
    stream_interval_ms: float = Field(5.0, ge=0, description="a generation's tokens are written at most this often "
                                                             "(those that arrive meanwhile go in one write); the "
                                                             "first at once; 0: each as it arrives. The only "
                                                             "pacing: engines send every step's tokens at once")
    max_generations: int = Field(256, ge=1, description="concurrent generations per model; beyond it 503")
    max_sessions: int = Field(1024, ge=1, description="live sequence sessions per model; beyond it 503")
    session_idle_s: float = Field(300.0, ge=0, description="a session unused this long expires")
    prompt_cache_mb: float = Field(64.0, ge=0, description="per language model: the states after the prompts seen "
                                                           "last, and their next-token logits; a generation whose "
                                                           "prompt is one of them skips its prefill (0: off)")

    # request limits
    max_instances: int = Field(256, ge=1, description="texts (or V2 rows) per request; beyond it 413")
    max_text_chars: int = Field(100_000, ge=1, description="characters per text, prompt or session step; "
                                                           "beyond it 413")
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1, description="a language model's V2 answer (rows x length "
                                                                      "x vocabulary floats); beyond it 413")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="request body, counted as it arrives (chunked "
                                                                   "too); beyond it 413")
    body_timeout_s: float = Field(10.0, gt=0, description="the whole body must arrive within this; else 408")
    max_connections: int = Field(1024, ge=1, description="per worker, open connections and requests (1: one at a "
                                                         "time); beyond them "
                                                         "uvicorn answers 503")

    # gRPC connections (docs/api.md#connections-and-limits)
    grpc_max_concurrent_rpcs: int = Field(1024, ge=1, description="per front-end, gRPC calls in progress; beyond "
                                                                  "them RESOURCE_EXHAUSTED at once (max_connections "
                                                                  "is HTTP's)")
    grpc_keepalive_time_ms: int = Field(60_000, ge=1, le=INT32_MAX, description=(
        "ping a connection that has been quiet this long, busy or idle; one that does not answer within "
        "grpc_keepalive_timeout_ms is closed (gRPC's own 2 h keeps a vanished client's connection that long)"))
    grpc_keepalive_timeout_ms: int = Field(20_000, ge=1, le=INT32_MAX, description="how long a keepalive ping waits "
                                                                                   "for its answer (gRPC's default)")
    grpc_min_client_ping_interval_ms: int = Field(10_000, ge=0, le=INT32_MAX, description=(
        "clients may ping this often, with calls in flight or none (grpc-go's never ping more often); "
        "a client that pings faster is sent GOAWAY (gRPC's own: every 5 min, never without a call)"))
    grpc_max_connection_age_ms: int = Field(300_000, ge=1, le=INT32_MAX, description=(
        "a connection this old (±10%) is sent GOAWAY and its client reconnects, through the load balancer, "
        "perhaps to another replica or front-end; without it a client stays on the replica it first reached"))
    grpc_max_connection_age_grace_ms: int = Field(30_000, ge=0, le=INT32_MAX, description=(
        "calls in flight on a connection past its age may take this long (request_timeout_s's default); then "
        "it is closed"))


def reference() -> str:
    """docs/settings.md: every setting, its environment variable, default and meaning."""
    lines = ["# Settings", "",
             "Every setting of `python -m serving` comes from the environment as `RNNSERVE_<NAME>` "
             "(`serving/common/settings.py`; this page is its output: `python -m serving.common.settings > docs/settings.md`).", "",
             "| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = str(field.default) if isinstance(field.default, Path) else field.default
        shown = "unset" if default is None else f"`{default if isinstance(default, str) else json.dumps(default)}`"
        lines.append(f"| `RNNSERVE_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
