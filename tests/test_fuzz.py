"""`python -m pytest tests/test_fuzz.py`: schemathesis fuzzes every operation of a real uvicorn
server's /openapi.json (over the tiny models) with valid and invalid requests, most of them with
the real path parameters (clf, lm, version 1, a live session), and OpenAI's bodies naming lm, so
that they reach inference, not only 404s; model control too (what an unload takes away is loaded again). V2 infer also gets
well-formed random tensors, which random JSON never makes. Checks: not_a_server_error (no 5xx,
whatever the request), status_code_conformance (every status is documented: 200, or 4XX/5XX with
the {"error", "request_id"} body), response_schema_conformance (a status answers its documented
body) and content_type_conformance. After every request a plain prediction must still be right.
derandomize: every run fuzzes the same cases; the too_slow health check is off, as it times
generation on a machine that may be busy.
"""
import re
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from serving.frontend.app import create_app
from serving.common.settings import Settings
from tests.serving_fixtures import Server, tiny_repository

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
# One test per operation, named from the app's schema; the cases come from the running server's.
# (schemathesis.pytest.from_fixture does not run on pytest 9: it sets Function._nodeid, gone in pytest 9.)
PATHS = create_app(Settings(repository=Path("."))).app.openapi()["paths"]
OPERATIONS = [f"{method.upper()} {path}" for path, methods in PATHS.items() for method in methods]
ROWS = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=30), min_size=1, max_size=4)  # ids in both vocabs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_repository(tmp_path_factory.mktemp("fuzz")), max_queue_delay_ms=1, control="open")
    yield s
    s.stop()


@pytest.fixture(scope="module", autouse=True)
def subnormal_floats():
    """Hypothesis draws subnormal floats, which the flush-to-zero mode of conftest.py would erase."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def v2_request(rows: list[list[int]]) -> dict:
    """Right-padded input_ids and their lengths, as a V2 client sends them."""
    seq = max(map(len, rows))
    return {"inputs": [{"name": "input_ids", "shape": [len(rows), seq], "datatype": "INT64",
                        "data": [r + [0] * (seq - len(r)) for r in rows]},
                       {"name": "lengths", "shape": [len(rows)], "datatype": "INT64", "data": list(map(len, rows))}]}


def with_model(case):
    """An OpenAI request's case naming the language model, so that it reaches generation."""
    if isinstance(case.body, dict):
        case.body["model"] = "lm"
    return case


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzed_requests_get_documented_answers(api, server, label):
    operation = api.find_operation_by_label(label)
    sid = httpx.post(server.url + "/v1/models/lm/sessions").json()["session_id"]
    names = re.findall(r"\{(\w+)\}", operation.path)
    real = [{name: {"name": model, "model": model, "version": "1", "sid": sid}[name] for name in names}
            for model in ("clf", "lm")]
    cases = [operation.as_strategy(mode, path_parameters=fixed) for mode in GenerationMode
             for fixed in ([None, *real] if names else [None])]
    if operation.path.startswith("/openai/") and operation.method.upper() == "POST":  # the model is in the body
        cases += [operation.as_strategy(mode).map(with_model) for mode in GenerationMode]
    if operation.path.endswith("/infer"):
        cases += [ROWS.map(lambda rows, fixed=fixed: operation.Case(
            path_parameters=fixed, body=v2_request(rows), media_type="application/json")) for fixed in real]

    @given(case=st.one_of(cases))
    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    def fuzz(case):
        response = case.call_and_validate(checks=CHECKS, timeout=30)
        if operation.path.endswith("/unload") and response.status_code == 200:  # it unloaded a model: put it back
            name = case.path_parameters["name"]
            assert httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=30).status_code == 200
        r = httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": ["good film"]}, timeout=30)
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        assert p["label"] in ("neg", "pos") and abs(sum(p["probabilities"].values()) - 1) < 1e-5

    fuzz()
