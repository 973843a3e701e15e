"""Prometheus metrics of the server, served at GET /metrics (every inference request is counted
once, whatever answered it: serving/frontend/core/envelope.py's counted(), for REST and gRPC alike).

A language model's steps are recorded under the model label "<model>:step": its time per step and
step batch size are the inference-time and batch-size histograms under that name.

The request counters and latency histograms carry the version that answered (a rollout is watched by
the share of answers per version): only versions served take that label, and a request refused
before a version was chosen (an unknown model or version, a bad body, a full queue) is "none"."""
import functools

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

NOT_DEPLOYED = "_not_deployed"  # the model label of requests for names no model is deployed under
NO_VERSION = "none"  # the version label of requests refused before a version was chosen
REQUESTS = Counter("rnnserve_requests_total", "Inference requests by model, the version that answered, endpoint "
                   "and HTTP status, refused ones included", ["model", "version", "endpoint", "status"])
REQUEST_LATENCY = Histogram("rnnserve_request_latency_seconds", "Time from request to the end of its response "
                            "(a stream's last event)", ["model", "version", "endpoint"], buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("rnnserve_time_to_first_token_seconds", "Generation: request to first token",
                                ["model", "version"], buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("rnnserve_queue_time_seconds", "Time a request waited before its batch ran",
                       ["model"], buckets=LATENCY_BUCKETS)
INFERENCE_TIME = Histogram("rnnserve_inference_time_seconds", "Time of one batch's ONNX Runtime calls",
                           ["model"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("rnnserve_batch_size", "Rows per ONNX Runtime call", ["model"],
                       buckets=tuple(2 ** i for i in range(12)))  # 1 .. 2048: calls on a GPU reach 1,024 rows and more
PADDING_RATIO = Histogram("rnnserve_padding_ratio", "Padding tokens / real tokens per ONNX Runtime call (0: none)",
                          ["model"], buckets=(0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4))
QUEUE_DEPTH = Gauge("rnnserve_queue_depth", "Rows waiting in the model's queues, counted as they arrive and "
                    "as batches are taken: it rises under load before latency does", ["model"],
                    multiprocess_mode="livesum")
MODEL_INFO = Gauge("rnnserve_model_info", "1 for each model version an engine serves, with its execution provider, "
                   "device and graph variant", ["model", "version", "provider", "device", "variant"],
                   multiprocess_mode="livemax")
IN_FLIGHT = Gauge("rnnserve_requests_in_flight", "Requests taken and not yet answered (generations included)",
                  ["model"], multiprocess_mode="livesum")
ACTIVE_GENERATIONS = Gauge("rnnserve_active_generations", "Generations in progress", ["model"],
                           multiprocess_mode="livesum")
TOKENS_GENERATED = Counter("rnnserve_tokens_generated_total", "Tokens generated", ["model"])
LIVE_SESSIONS = Gauge("rnnserve_live_sessions", "Sequence sessions alive", ["model"],
                      multiprocess_mode="livesum")


@functools.cache
def of(metric, *labels: str):
    """metric.labels(*labels), looked up once: the hot paths count every request."""
    return metric.labels(*labels)
