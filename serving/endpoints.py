"""Which inference endpoint, and which model, a raw request is for: read from its method and path
before any route runs, so that requests refused early (shed, too large, unauthorized, unknown
model) are counted and shed like the rest."""
import re

ENDPOINTS = [  # (method, path, endpoint); the groups are the path parameters
    ("POST", re.compile(r"/v1/models/(?P<name>[^/:]+):predict"), "v1_predict"),
    ("POST", re.compile(r"/v1/models/(?P<name>[^/:]+):generate"), "generate"),
    ("POST", re.compile(r"/v1/models/(?P<name>[^/:]+)/sessions"), "session_create"),
    ("POST", re.compile(r"/v1/models/(?P<name>[^/:]+)/sessions/(?P<sid>[^/:]+):step"), "session_step"),
    ("DELETE", re.compile(r"/v1/models/(?P<name>[^/:]+)/sessions/(?P<sid>[^/:]+)"), "session_end"),
    ("POST", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"), "v2_infer"),
]
ROUTES = {"v1_predict": "/v1/models/{name}:predict", "generate": "/v1/models/{name}:generate",  # http.route of spans
          "session_create": "/v1/models/{name}/sessions", "session_step": "/v1/models/{name}/sessions/{sid}:step",
          "session_end": "/v1/models/{name}/sessions/{sid}", "v2_infer": "/v2/models/{name}/infer"}


def endpoint_of(scope) -> tuple[str, dict] | None:
    """(endpoint, path parameters) of an inference request, else None."""
    path = scope["path"]
    if not path.startswith(("/v1/models/", "/v2/models/")):
        return None
    for method, pattern, endpoint in ENDPOINTS:
        if scope["method"] == method and (match := pattern.fullmatch(path)):
            return endpoint, {k: v for k, v in match.groupdict().items() if v is not None}
    return None
