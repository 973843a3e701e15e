"""Serve the model repository over HTTP.

    python -m serving --repository model_repository [--host 0.0.0.0] [--port 8000] [--workers N]

Every setting can also come from the environment as RNNSERVE_<NAME> (serving/settings.py).
With --workers N, N server processes share the port, each with its models and batchers: the
event loop (HTTP, JSON, tokenizing) is one core's work per process, so on a CPU host one worker
per core is what lets the server use them all. Their metrics are summed at /metrics, and a
model-control call taken by one is followed by the others (serving/repository.py).

SIGTERM drains: readiness turns false, new requests get 503, the listening socket closes,
requests in flight are answered (at most RNNSERVE_SHUTDOWN_GRACE_S), then the process exits.
"""
import argparse
import logging
import os
import shutil
import tempfile

import uvicorn

from serving.app import LOG_FORMAT
from serving.settings import Settings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", help="model repository folder (RNNSERVE_REPOSITORY)")
    p.add_argument("--host", help="RNNSERVE_HOST, default 0.0.0.0")
    p.add_argument("--port", type=int, help="RNNSERVE_PORT, default 8000")
    p.add_argument("--workers", type=int, help="RNNSERVE_WORKERS, default: one per CPU core (one with a GPU)")
    args = p.parse_args(argv)
    for name, value in vars(args).items():  # the workers read their settings from the environment
        if value is not None:
            os.environ[f"RNNSERVE_{name.upper()}"] = str(value)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    workers = settings.workers or default_workers(settings)
    created = []  # removed when the server exits, SIGTERM included
    if workers > 1:  # shared by the workers: metrics to sum, model-control calls to follow
        for variable, prefix in (("PROMETHEUS_MULTIPROC_DIR", "rnnserve-metrics-"), ("RNNSERVE_CONTROL_DIR", "rnnserve-control-")):
            if variable not in os.environ:
                created.append(os.environ.setdefault(variable, tempfile.mkdtemp(prefix=prefix)))
    try:
        uvicorn.run("serving.app:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=workers, log_level="info", access_log=False, limit_concurrency=settings.max_connections,
                    timeout_graceful_shutdown=settings.shutdown_grace_s)
    finally:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)


def default_workers(settings: Settings) -> int:
    """One process per CPU core on a CPU host (measured: docs/benchmarks.md); one per GPU."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in settings.providers and "CUDAExecutionProvider" in ort.get_available_providers():
        return 1
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
