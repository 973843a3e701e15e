"""Which inference endpoint, and which model, a raw request is for: read from its method and path
before any route runs, so that requests refused early (shed, too large, unauthorized, unknown
model) are counted and shed like the rest."""
import re

ENDPOINTS = [  # (method, path, endpoint); group 1 is the model's name
    ("POST", re.compile(r"/v1/models/([^/:]+):predict"), "v1_predict"),
    ("POST", re.compile(r"/v1/models/([^/:]+):generate"), "generate"),
    ("POST", re.compile(r"/v1/models/([^/:]+)/sessions"), "session_create"),
    ("POST", re.compile(r"/v1/models/([^/:]+)/sessions/[^/:]+:step"), "session_step"),
    ("DELETE", re.compile(r"/v1/models/([^/:]+)/sessions/[^/:]+"), "session_end"),
    ("POST", re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer"), "v2_infer"),
]
QUEUED = {"v1_predict", "v2_infer"}  # the endpoints whose requests wait in the model's queue


def endpoint_of(scope) -> tuple[str, str] | None:
    """(endpoint, model name) of an inference request, else None."""
    path = scope["path"]
    if not path.startswith(("/v1/models/", "/v2/models/")):
        return None
    for method, pattern, endpoint in ENDPOINTS:
        if scope["method"] == method and (match := pattern.fullmatch(path)):
            return endpoint, match[1]
    return None
