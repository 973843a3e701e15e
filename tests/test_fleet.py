"""Replicas behind a real load balancer: two python -m serving over copies of one repository,
sharing one state key, behind HAProxy on 127.0.0.1 (Debian's package, installed by
tests/tools/haproxy.sh), round robin with a new connection to a replica for every request, as a
Kubernetes Service with no session affinity spreads them. Sessions and Triton sequences go on
through it with their state tokens and answer, step by step, what one server answers."""
import queue
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from loadtest.servers import free_port
from tests.serving_fixtures import FRONT_END, serve, tiny_repository

KEY = "one-state-key-for-the-whole-fleet"
SCRIPTS = [["the time traveller", " (for so it will", " be convenient", " to speak of him)"],
           ["was expounding", " a recondite", " matter to us."],
           ["his grey eyes shone", " and twinkled"]]
SESSIONS = 100
ONE_OF_EACH = {"engines": 1, "workers": 1, "state_key": KEY}


def haproxy_config(rest_port: int, grpc_port: int, replicas: list[tuple[int, int]]) -> str:
    servers = lambda which: "\n".join(f"    server r{i} 127.0.0.1:{ports[which]}" for i, ports in enumerate(replicas))
    return f"""global
    maxconn 512
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend rest
    mode http
    bind 127.0.0.1:{rest_port}
    default_backend rest_replicas
backend rest_replicas
    mode http
    balance roundrobin
    option http-server-close
    http-reuse never
{servers(0)}
frontend grpc
    mode tcp
    bind 127.0.0.1:{grpc_port}
    default_backend grpc_replicas
backend grpc_replicas
    mode tcp
    balance roundrobin
{servers(1)}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(the balancer's REST url, its gRPC port, the replicas' REST urls)."""
    haproxy = subprocess.run(["sh", str(Path(__file__).parent / "tools" / "haproxy.sh")], capture_output=True,
                             text=True)
    assert haproxy.returncode == 0, f"HAProxy could not be installed: {haproxy.stderr[-2000:]}"
    replicas, urls, ports = [], [], []
    for i in range(2):
        grpc_port = free_port()
        process, url = serve(tiny_repository(tmp_path_factory.mktemp(f"replica-{i}")), grpc_port=grpc_port,
                             **ONE_OF_EACH)
        replicas.append(process)
        urls.append(url)
        ports.append((int(url.rsplit(":", 1)[1]), grpc_port))
    rest_port, grpc_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(haproxy_config(rest_port, grpc_port, ports))
    balancer = subprocess.Popen([haproxy.stdout.strip(), "-db", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{rest_port}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url, grpc_port, urls
    finally:
        balancer.terminate()
        balancer.wait(10)
        for process in replicas:
            process.terminate()
            process.wait(30)


def steps_of(url: str, script: list[str]) -> list[tuple[list[str], list[float], int]]:
    """One server's local session over a script: (tokens, probabilities, total tokens) per step."""
    sid = httpx.post(f"{url}/v1/models/lm/sessions").json()["session_id"]
    answers = [answer(httpx.post(f"{url}/v1/models/lm/sessions/{sid}:step", json={"text": text, "top_k": 10}))
               for text in script]
    httpx.delete(f"{url}/v1/models/lm/sessions/{sid}")
    return answers


def answer(r: httpx.Response) -> tuple[list[str], list[float], int]:
    assert r.status_code == 200, r.text
    return [n["token"] for n in r.json()["next"]], [n["probability"] for n in r.json()["next"]], r.json()["total_tokens"]


def same(got: list, expected: list):
    assert [(tokens, total) for tokens, _, total in got] == [(tokens, total) for tokens, _, total in expected]
    assert max(np.abs(np.array(p) - q).max() for (_, p, _), (_, q, _) in zip(got, expected)) <= 1e-6


def test_the_balancer_spreads_a_sessions_steps_so_its_id_alone_is_lost(fleet):
    """What the tokens are for: without one, every other step reaches the replica that does not
    hold the session."""
    url, _, _ = fleet
    with httpx.Client(base_url=url) as client:
        sid = client.post("/v1/models/lm/sessions").json()["session_id"]
        statuses = [client.post(f"/v1/models/lm/sessions/{sid}:step", json={"text": "the"}).status_code
                    for _ in range(6)]
    assert sorted(statuses) == [200] * 3 + [404] * 3


def test_a_hundred_sessions_through_the_balancer_answer_what_one_server_answers(fleet):
    url, _, replicas = fleet
    expected = [steps_of(replicas[0], script) for script in SCRIPTS]
    moved = 0  # steps answered by another replica than the step before
    with httpx.Client(base_url=url) as client:
        for n in range(SESSIONS):
            script, got = SCRIPTS[n % len(SCRIPTS)], []
            opened = client.post("/v1/models/lm/sessions").json()
            sid, state, last = opened["session_id"], opened["state"], None
            for text in script:
                r = client.post(f"/v1/models/lm/sessions/{sid}:step", json={"text": text, "top_k": 10, "state": state})
                got.append(answer(r))
                state, moved, last = r.json()["state"], moved + (last not in (None, r.headers[FRONT_END])), \
                    r.headers[FRONT_END]
            same(got, expected[n % len(SCRIPTS)])
    assert moved >= SESSIONS  # each session went on on the other replica at least once (round robin: about half)


def test_stateless_steps_through_the_balancer_answer_what_one_server_answers(fleet):
    url, _, replicas = fleet
    expected = steps_of(replicas[1], SCRIPTS[0])
    with httpx.Client(base_url=url) as client:
        for _ in range(10):
            state, got, seen = None, [], set()
            for text in SCRIPTS[0]:
                body = {"text": text, "top_k": 10} | ({"state": state} if state else {})
                r = client.post("/v1/models/lm:step", json=body)
                got.append(answer(r))
                state = r.json()["state"]
                seen.add(r.headers[FRONT_END])
            same(got, expected)
            assert len(seen) == 2


def test_triton_sequences_through_the_balancer_answer_what_one_server_answers(fleet):
    """tritonclient.grpc unchanged, a new connection (so, round robin, the other replica) for each
    request of the sequence, the state token carried from answer to answer."""
    url, grpc_port, replicas = fleet
    expected = steps_of(replicas[0], SCRIPTS[0])
    for sequence in range(1, 6):
        state, got = None, []
        for i, text in enumerate(SCRIPTS[0]):
            client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            answers = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            inputs = [triton.InferInput("text_input", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            if state is not None:
                inputs.append(triton.InferInput("state", [1], "BYTES"))
                inputs[1].set_data_from_numpy(np.array([state], dtype=np.object_))
            client.async_stream_infer("lm", inputs, sequence_id=sequence, sequence_start=i == 0,
                                      parameters={"top_k": 10, "return_state": True})
            result, error = answers.get(timeout=60)
            client.stop_stream()
            client.close()
            assert error is None, error
            got.append(([t.decode() for t in result.as_numpy("next_tokens")],
                        result.as_numpy("next_probabilities").tolist(), int(result.as_numpy("total_tokens")[0])))
            state = result.as_numpy("state")[0]
        same(got, expected)
