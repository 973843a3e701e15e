"""Prometheus metrics: GET /metrics, every process's (front-ends and engines) when several share
the machine (serving/common/metrics.py)."""
import os

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess


async def prometheus() -> Response:
    registry = None
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry) if registry else generate_latest(), media_type=CONTENT_TYPE_LATEST)
