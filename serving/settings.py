"""Server settings: one pydantic-settings class, every field also RNNSERVE_<NAME> in the environment."""
from pathlib import Path

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_")

    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 0  # server processes sharing the port; 0: one per CPU core on a CPU host, one with a GPU
    repository: Path = Path("model_repository")
    model_versions: dict[str, int] = {}  # pin a version per model, e.g. {"imdb-gru": 1}; else the latest

    # model control (/v2/repository) and shutdown
    control_token: SecretStr | None = None  # bearer token for /v2/repository/*; unset: open (bind to a private network)
    token_for_inference: bool = False  # also ask inference and metadata routes for it (health and /metrics stay open)
    repository_poll_s: float = 0.0  # look for new versions this often and load them; 0: only on a load call
    control_dir: Path | None = None  # where several workers share load/unload calls (python -m serving sets it)
    control_sync_s: float = 1.0  # how often a worker reads that and the repository poll is checked
    shutdown_grace_s: float = 30.0  # on SIGTERM, or an unload, how long accepted requests may take to finish

    # ONNX Runtime
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # the first available wins
    intra_op_threads: int = 1  # per model; on 2 cores one thread leaves the other to the event loop
    spin_wait: bool = False  # spinning intra-op threads compete with the event loop for the CPU

    # dynamic batching
    max_batch_size: int = 64  # rows per ONNX Runtime call
    max_batch_tokens: int = 4096  # rows x padded length per call
    max_queue_delay_ms: float = 0.0  # how long a batch may wait for more rows after its first (see README)
    max_queue_size: int = 1024  # requests waiting; beyond it 503 at once
    request_timeout_s: float = 30.0  # per request, queue and inference; 504 beyond it

    # language models
    max_new_tokens: int = 1000  # the most a generate request may ask for
    max_generations: int = 256  # concurrent generations per model; beyond it 503
    max_sessions: int = 1024  # live sequence sessions per model; beyond it 503
    session_idle_s: float = 300.0  # a session unused this long expires

    # request limits
    max_instances: int = 256  # texts or rows per request; beyond it 413
    max_text_chars: int = 100_000  # per text, prompt or session step; beyond it 413
    max_body_bytes: int = 4 * 1024 * 1024  # beyond it 413
    body_timeout_s: float = 10.0  # the whole body must arrive within this; else 408 (slow clients)
    max_connections: int = 1024  # per worker, open connections and requests together; beyond them 503

    @field_validator("max_batch_size", "max_batch_tokens", "max_queue_size", "max_instances", "max_body_bytes",
                     "intra_op_threads", "max_new_tokens", "max_generations", "max_sessions", "max_text_chars",
                     "max_connections")
    @classmethod
    def positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("max_queue_delay_ms", "request_timeout_s", "session_idle_s", "repository_poll_s",
                     "shutdown_grace_s")
    @classmethod
    def not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("control_sync_s", "body_timeout_s")
    @classmethod
    def positive_seconds(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value
