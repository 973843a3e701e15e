"""State tokens (serving/frontend/core/state_token.py): a language model's state handed to the
client, signed, so that a session or a Triton sequence goes on on any replica with the same key.
Two real servers over copies of one tiny repository stand for two replicas; every step alternates
between them and must answer what one server's local session answers."""
import base64
import queue
import shutil
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from core.repository import ServingConfig
from loadtest.servers import free_port
from serving.common.messages import Step
from serving.common.settings import Settings
from serving.engine.generation import LanguageModel
from serving.engine.runner import Runner
from serving.frontend.core.state_token import FORMAT, HEADER, Carried, seal, unseal
from serving.frontend.core.refused import Refused
from tests.serving_fixtures import Server, local_session, same_steps, session_step, tiny_repository

KEY, OTHER_KEY = "a-state-key-every-replica-has", "another-key-of-another-fleet"
TEXTS = ["the time traveller", " (for so it will", " be convenient to speak", " of him) was expounding"]
TOP_K = 12


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two servers with the same key, each over its own copy of one repository, with gRPC."""
    servers = [Server(tiny_repository(tmp_path_factory.mktemp(f"replica-{i}")), state_key=KEY,
                      grpc_port=free_port()) for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def alone(replicas):
    """What one server's local session answers to TEXTS: (tokens, probabilities, total tokens) per step."""
    return local_session(replicas[0].url, TEXTS, TOP_K)


def test_a_stateless_step_goes_on_on_either_replica(replicas, alone):
    state, got = None, []
    for i, text in enumerate(TEXTS):
        r = httpx.post(f"{replicas[i % 2].url}/v1/models/lm:step",
                       json={"text": text, "top_k": TOP_K} | ({"state": state} if state else {}))
        got.append(session_step(r))
        state = r.json()["state"]
    same_steps(got, alone)
    for s in replicas:  # each step's slot was freed after it, and no session was left behind
        lm = s.deployment("lm").lm
        assert not lm.sessions and len(lm.free) == lm.max_generations + lm.max_sessions


def test_a_session_goes_on_on_the_replica_that_does_not_hold_it(replicas, alone):
    """Opened on one replica; each step with the last answer's token, on the other replica in turn
    (which opens the session under the same id); the id alone keeps working where it lives."""
    sid = httpx.post(f"{replicas[0].url}/v1/models/lm/sessions").json()["session_id"]
    r = httpx.post(f"{replicas[0].url}/v1/models/lm/sessions/{sid}:step",
                   json={"text": TEXTS[0], "top_k": TOP_K, "return_state": True})
    got, state = [session_step(r)], r.json()["state"]
    for i, text in enumerate(TEXTS[1:], 1):
        r = httpx.post(f"{replicas[i % 2].url}/v1/models/lm/sessions/{sid}:step",
                       json={"text": text, "top_k": TOP_K, "state": state})
        got.append(session_step(r))
        assert r.json()["session_id"] == sid
        state = r.json()["state"]
    same_steps(got, alone)
    plain = httpx.post(f"{replicas[1].url}/v1/models/lm/sessions/{sid}:step", json={"text": "x"})
    assert plain.status_code == 200 and "state" not in plain.json()  # replica 1 holds it now, by the same id
    for s in replicas:
        assert httpx.delete(f"{s.url}/v1/models/lm/sessions/{sid}").status_code == 200


def test_a_new_sessions_zero_state_token_lets_its_first_step_reach_any_replica(replicas, alone):
    opened = httpx.post(f"{replicas[0].url}/v1/models/lm/sessions").json()
    assert unseal(KEY.encode(), opened["state"], "lm") == Carried("lm", 1, 0, bytes(4 * 2 * 12))  # 2 layers x 12
    r = httpx.post(f"{replicas[1].url}/v1/models/lm/sessions/{opened['session_id']}:step",
                   json={"text": TEXTS[0], "top_k": TOP_K, "state": opened["state"]})
    same_steps([session_step(r)], alone[:1])
    r = httpx.post(f"{replicas[1].url}/v1/models/lm/sessions/7.1.{opened['session_id'][4:]}:step",
                   json={"text": TEXTS[0], "top_k": TOP_K, "state": opened["state"]})  # engine 7: a larger replica's
    same_steps([session_step(r)], alone[:1])


def tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[HEADER.size + 10] ^= 1  # one bit of the state
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_tokens_that_are_not_this_servers_are_400_saying_why(replicas):
    url = replicas[0].url
    token = httpx.post(f"{url}/v1/models/lm:step", json={"text": "the"}).json()["state"]
    state = unseal(KEY.encode(), token, "lm").state
    unknown_format = base64.urlsafe_b64encode(bytes([FORMAT + 1]) + bytes(100)).decode()
    cases = {
        tampered(token): "tampered with",
        seal(OTHER_KEY.encode(), Carried("lm", 1, 3, state)): "signed with another key",
        seal(KEY.encode(), Carried("other-lm", 1, 3, state)): "for model 'other-lm', not 'lm'",
        seal(KEY.encode(), Carried("lm", 1, 3, state[:8])): "malformed token (8 bytes of state",
        "not a token!": "malformed token (not base64url)",
        token[:20]: "malformed token (too short: 15 bytes)",
        unknown_format: f"malformed token (format {FORMAT + 1}",
    }
    for bad, why in cases.items():
        for path, body in (("lm:step", {}), ("lm/sessions/0.1.abc:step", {})):
            r = httpx.post(f"{url}/v1/models/{path}", json={"text": "x", "state": bad} | body)
            assert r.status_code == 400 and why in r.json()["error"], (why, r.text)
    r = httpx.post(f"{url}/v1/models/lm:step", json={"text": "x", "state": 7})
    assert r.status_code == 400 and "body.state" in r.json()["error"]
    assert httpx.post(f"{url}/v1/models/clf:step", json={"text": "x", "state": token}).status_code == 400
    assert httpx.post(f"{url}/v1/models/nope:step", json={"text": "x", "state": token}).status_code == 404


def test_a_token_of_a_version_no_longer_served_is_410_naming_it(tmp_path):
    repository = tiny_repository(tmp_path)
    s = Server(repository, state_key=KEY, control="open")
    try:
        token = httpx.post(f"{s.url}/v1/models/lm:step", json={"text": "the"}).json()["state"]
        shutil.copytree(repository / "lm" / "1", repository / "lm" / "2")
        assert httpx.post(f"{s.url}/v2/repository/models/lm/load").json()["version"] == "2"
        for path in ("lm:step", "lm/sessions/0.1.abc:step"):
            r = httpx.post(f"{s.url}/v1/models/{path}", json={"text": "x", "state": token})
            assert r.status_code == 410, r.text
            assert "version 1, which is not served here (serving 2)" in r.json()["error"]
        r = httpx.post(f"{s.url}/v1/models/lm:step", json={"text": "x"})  # a new state goes on on version 2
        assert r.status_code == 200 and unseal(KEY.encode(), r.json()["state"], "lm").version == 2
    finally:
        s.stop()


def test_without_a_key_state_stays_local_and_a_token_is_409(tmp_path):
    s = Server(tiny_repository(tmp_path), grpc_port=free_port())
    try:
        _, error = sequence_steps([s], ["the"], 7, return_state=True)
        assert "keeps session state only locally" in error
        opened = httpx.post(f"{s.url}/v1/models/lm/sessions").json()
        sid, token = opened["session_id"], seal(KEY.encode(), Carried("lm", 1, 0, bytes(4 * 64)))
        assert "state" not in opened
        for path, body in (("lm:step", {}), (f"lm/sessions/{sid}:step", {"return_state": True}),
                           (f"lm/sessions/{sid}:step", {"state": token})):
            r = httpx.post(f"{s.url}/v1/models/{path}", json={"text": "the"} | body)
            assert r.status_code == 409 and "keeps session state only locally" in r.json()["error"], r.text
        r = httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "the"})
        assert r.status_code == 200 and r.json()["total_tokens"] == 3 and "state" not in r.json()
    finally:
        s.stop()


def test_a_carried_step_frees_its_slot_when_it_is_cancelled_or_late(tmp_path):
    """In one engine's language model, no server: a step alone takes a slot, and frees it when it
    has run, is cancelled before it runs, or is past its deadline when it would; a state of the
    wrong size is refused."""
    version = tiny_repository(tmp_path) / "lm" / "1"
    runner = Runner.load(version, Settings(providers=["CPUExecutionProvider"]), ServingConfig())
    lm = LanguageModel(runner, max_generations=2, max_sessions=2, idle_s=60, max_new_tokens=8)
    slots, state = len(lm.free), bytes(lm.state_bytes)

    def carried(rid: int, deadline_s: float = 60, data: bytes = state) -> Step:
        return Step(rid, "", [3, 4], time.monotonic() + deadline_s, 3, data, 0, "lm", 1, return_state=True)
    assert lm.step_carried(b"f", carried(1)) is None
    assert len(lm.free) == slots - 1 and len(lm.sessions) == 1
    lm.cancel(b"f", [1])
    assert len(lm.free) == slots and not lm.sessions and not lm.stepping
    assert lm.step_carried(b"f", carried(2, deadline_s=-1)) is None
    assert lm.step() == [] and len(lm.free) == slots and not lm.sessions
    assert lm.step_carried(b"f", carried(3)) is None
    [(_, stepped)] = lm.step()
    assert stepped.total_tokens == 2 and len(stepped.state) == lm.state_bytes
    assert len(lm.free) == slots and not lm.sessions
    wrong = lm.step_carried(b"f", carried(4, data=state[:-4]))
    assert wrong.status == 400 and f"keeps {lm.state_bytes}" in wrong.error
    for rid in (5, 6):  # a step alone counts among max_sessions while it waits
        assert lm.step_carried(b"f", carried(rid)) is None
    assert lm.step_carried(b"f", carried(7)).status == 503


def sequence_steps(replicas, texts, sequence_id, state=None, **parameters):
    """Each text as one request of Triton's sequence, on the replicas in turn, each carrying the last
    answer's state: (tokens, probabilities, total tokens) per step, and the last token (or errors)."""
    got = []
    for i, text in enumerate(texts):
        client = triton.InferenceServerClient(f"127.0.0.1:{replicas[i % len(replicas)].settings.grpc_port}")
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        inputs = [triton.InferInput("text_input", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        if state is not None:
            inputs.append(triton.InferInput("state", [1], "BYTES"))
            inputs[1].set_data_from_numpy(np.array([state.encode() if isinstance(state, str) else state],
                                                   dtype=np.object_))
        client.async_stream_infer("lm", inputs, sequence_id=sequence_id, sequence_start=i == 0 and state is None,
                                  parameters={"top_k": TOP_K} | parameters)
        result, error = answers.get(timeout=60)
        client.stop_stream()
        client.close()
        if error is not None:
            return got, error.message()
        got.append(([t.decode() for t in result.as_numpy("next_tokens")],
                    result.as_numpy("next_probabilities").tolist(), int(result.as_numpy("total_tokens")[0])))
        state = result.as_numpy("state")[0].decode()
    return got, state


def test_a_triton_sequence_goes_on_on_either_replica(replicas, alone):
    got, token = sequence_steps(replicas, TEXTS, 42, return_state=True)
    same_steps(got, alone)
    assert unseal(KEY.encode(), token, "lm").tokens == alone[-1][2]
    _, error = sequence_steps(replicas, ["x"], 43, state=tampered(token))
    assert "tampered with" in error
    _, error = sequence_steps(replicas, ["x"], 43, state=token, return_state="yes")
    assert "return_state must be a boolean" in error
