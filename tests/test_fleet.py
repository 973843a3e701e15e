"""Replicas behind a real load balancer: two python -m serving over copies of one repository,
sharing one state key, behind HAProxy on 127.0.0.1 (Debian's package, installed by
tests/tools/haproxy.sh), round robin with a new connection to a replica for every request, as a
Kubernetes Service with no session affinity spreads them. Sessions and Triton sequences go on
through it with their state tokens and answer, step by step, what one server answers. Replicas
stopped under load lose nothing (SIGTERM) or what they had in flight (SIGKILL); replicas polling
one shared repository all serve a version dropped into it, and model control through one replica
is that replica's own."""
import asyncio
import queue
import shutil
import signal
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from export.repository import export_run
from loadtest.servers import free_port
from serving.common.settings import Settings
from tests.serving_fixtures import FRONT_END, alone, local_session, same_steps, serve, session_step, tiny_repository
from tests.test_export import make_run

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
def haproxy() -> str:
    """The path of HAProxy, installed by tests/tools/haproxy.sh if it is missing."""
    found = subprocess.run(["sh", str(Path(__file__).parent / "tools" / "haproxy.sh")], capture_output=True, text=True)
    assert found.returncode == 0, f"HAProxy could not be installed: {found.stderr[-2000:]}"
    return found.stdout.strip()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, haproxy):
    """(the balancer's REST url, its gRPC port, the replicas' REST urls)."""
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
    balancer = subprocess.Popen([haproxy, "-db", "-f", str(config)], stderr=subprocess.DEVNULL)
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
    expected = [local_session(replicas[0], script) for script in SCRIPTS]
    moved = 0  # steps answered by another replica than the step before
    with httpx.Client(base_url=url) as client:
        for n in range(SESSIONS):
            script, got = SCRIPTS[n % len(SCRIPTS)], []
            opened = client.post("/v1/models/lm/sessions").json()
            sid, state, last = opened["session_id"], opened["state"], None
            for text in script:
                r = client.post(f"/v1/models/lm/sessions/{sid}:step", json={"text": text, "top_k": 10, "state": state})
                got.append(session_step(r))
                state, moved, last = r.json()["state"], moved + (last not in (None, r.headers[FRONT_END])), \
                    r.headers[FRONT_END]
            same_steps(got, expected[n % len(SCRIPTS)])
    assert moved >= SESSIONS  # each session went on on the other replica at least once (round robin: about half)


def test_stateless_steps_through_the_balancer_answer_what_one_server_answers(fleet):
    url, _, replicas = fleet
    expected = local_session(replicas[1], SCRIPTS[0])
    with httpx.Client(base_url=url) as client:
        for _ in range(10):
            state, got, seen = None, [], set()
            for text in SCRIPTS[0]:
                body = {"text": text, "top_k": 10} | ({"state": state} if state else {})
                r = client.post("/v1/models/lm:step", json=body)
                got.append(session_step(r))
                state = r.json()["state"]
                seen.add(r.headers[FRONT_END])
            same_steps(got, expected)
            assert len(seen) == 2


def test_triton_sequences_through_the_balancer_answer_what_one_server_answers(fleet):
    """tritonclient.grpc unchanged, a new connection (so, round robin, the other replica) for each
    request of the sequence, the state token carried from answer to answer."""
    url, grpc_port, replicas = fleet
    expected = local_session(replicas[0], SCRIPTS[0])
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
        same_steps(got, expected)


# A replica stopped under load. The balancer asks each replica's readiness every 500 ms and takes
# it out at the second 503 in a row (0.5 to 1 s after SIGTERM), as Kubernetes takes a terminating
# pod out of its Service (there, a few seconds after).
USERS = 16
CHECK_MS = 500
SERVE_S = Settings.model_fields["drain_serve_s"].default
NO_RETRY = "    retries 0\n"  # every failed request is the client's: most balancers do not retry a POST
RETRYING = """    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response 503
"""  # HAProxy's layer-7 retries, each on another replica
REDISPATCH = "    retries 3\n    option redispatch 1\n"  # only a connection that fails is tried on another replica


def checked_config(rest_port: int, ports: list[int], retries: str) -> str:
    servers = "\n".join(f"    server r{i} 127.0.0.1:{port} check inter {CHECK_MS} fall 2 rise 2"
                        for i, port in enumerate(ports))
    return f"""global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend rest
    bind 127.0.0.1:{rest_port}
    default_backend replicas
backend replicas
    balance roundrobin
    option http-server-close
    http-reuse never
    option httpchk GET /v2/health/ready
{retries}{servers}
"""


@contextmanager
def balanced(folder: Path, haproxy: str, retries: str, shared: Path | None = None, **settings):
    """Two replicas (one engine, one front-end each: its pid is the replica's FRONT_END header)
    behind HAProxy checking their readiness, each over its copy of the tiny repository or both over
    `shared`: (the balancer's url, the replicas' processes, their REST urls)."""
    replicas, ports, urls = [], [], []
    try:
        for i in range(2):
            process, url = serve(shared or tiny_repository(folder / f"replica-{i}"), engines=1, workers=1, **settings)
            replicas.append(process)
            urls.append(url)
            ports.append(int(url.rsplit(":", 1)[1]))
        rest_port = free_port()
        (folder / "haproxy.cfg").write_text(checked_config(rest_port, ports, retries))
        balancer = subprocess.Popen([haproxy, "-db", "-f", str(folder / "haproxy.cfg")], stderr=subprocess.DEVNULL)
        try:
            url, seen, deadline = f"http://127.0.0.1:{rest_port}", set(), time.time() + 30
            while len(seen) < 2:  # both replicas in the balancer's rotation
                assert time.time() < deadline, f"the balancer reached {seen} only"
                try:
                    seen.add(httpx.get(f"{url}/v2/health/ready").headers.get(FRONT_END))
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield url, replicas, urls
        finally:
            balancer.terminate()
            balancer.wait(10)
    finally:
        for process in replicas:
            process.kill()
            process.wait(30)


def under_load(url: str, stop) -> tuple[list[tuple[float, str, str | None]], float, int]:
    """USERS clients posting V1 predict through the balancer without pause; after a second,
    stop() (a coroutine function: it stops a replica and returns once it is gone). Returns every
    request's (sent, status or the error's name, the FRONT_END that answered), when stop began
    (perf_counter) and how many requests were in flight then."""
    outcomes, in_flight, done = [], [0], asyncio.Event()

    async def user(client: httpx.AsyncClient):
        while not done.is_set():
            sent = time.perf_counter()
            in_flight[0] += 1
            try:
                r = await client.post("/v1/models/clf:predict", json={"instances": ["good film"]})
                outcomes.append((sent, str(r.status_code), r.headers.get(FRONT_END)))
            except httpx.HTTPError as e:
                outcomes.append((sent, type(e).__name__, None))
            finally:
                in_flight[0] -= 1

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=USERS)) as client:
            users = [asyncio.create_task(user(client)) for _ in range(USERS)]
            await asyncio.sleep(1)
            stopped, flying = time.perf_counter(), in_flight[0]
            await stop()
            await asyncio.sleep(1)  # and on, on the replica left
            done.set()
            await asyncio.gather(*users)
            return stopped, flying

    stopped, flying = asyncio.run(scenario())
    return outcomes, stopped, flying


def sigterm_under_load(url: str, replica: subprocess.Popen) -> tuple[dict, int, float]:
    """SIGTERM to a replica under load: (the outcomes counted, the requests that replica answered
    after the signal, how long it took to exit)."""
    async def stop():
        replica.send_signal(signal.SIGTERM)
        await asyncio.to_thread(replica.wait, 60)

    outcomes, stopped, _ = under_load(url, stop)
    exited = time.perf_counter() - stopped  # under_load slept 1 s after the exit
    counts = Counter(status for _, status, _ in outcomes)
    after = sum(sent > stopped and by == str(replica.pid) for sent, _, by in outcomes)
    return counts, after, exited - 1


@pytest.mark.parametrize("retries", [NO_RETRY, RETRYING], ids=["no-retry", "retrying"])
def test_a_replica_stopped_with_sigterm_under_load_loses_nothing(tmp_path, haproxy, retries):
    """SIGTERM to one of two replicas under 16 users: it serves on, readiness 503, while the
    balancer takes it out (RNNSERVE_DRAIN_SERVE_S), then refuses, closes and exits; every request
    is answered 200, with a balancer that retries and with one that does not."""
    with balanced(tmp_path, haproxy, retries, drain_serve_s=SERVE_S, drain_s=5) as (url, replicas, _):
        counts, after, exited_s = sigterm_under_load(url, replicas[0])
    print(f"SIGTERM under {USERS} users ({'no retries' if retries == NO_RETRY else 'retrying'}): {dict(counts)}; "
          f"{after} served by the stopping replica after the signal; it exited {exited_s:.1f} s after it")
    assert set(counts) == {"200"}, counts
    assert after > 0  # the balancer sent it requests before it saw it unready: served, not refused
    assert SERVE_S <= exited_s < SERVE_S + 5 + 5


def test_without_the_serving_window_a_balancer_that_does_not_retry_fails_requests(tmp_path, haproxy):
    """What the window is for: with RNNSERVE_DRAIN_SERVE_S=0 (the drain before it) the requests the
    balancer sends before its next check are answered 503, and it passes them on."""
    with balanced(tmp_path, haproxy, NO_RETRY, drain_serve_s=0, drain_s=5) as (url, replicas, _):
        counts, after, _ = sigterm_under_load(url, replicas[0])
    print(f"SIGTERM under {USERS} users, no serving window, no retries: {dict(counts)}")
    assert counts["503"] > 0 and set(counts) == {"200", "503"}, counts


def test_a_replica_killed_under_load_loses_at_most_what_it_had_in_flight(tmp_path, haproxy):
    """SIGKILL to one of two replicas under 16 users, behind a balancer that sends a request whose
    connection fails to the other replica (HAProxy's retries for connection failures): the
    requests the killed one was answering fail (their connection closed unanswered, or 502 from
    the balancer), no others."""
    with balanced(tmp_path, haproxy, REDISPATCH) as (url, replicas, _):
        async def stop():
            replicas[0].kill()
            await asyncio.to_thread(replicas[0].wait, 10)
        outcomes, _, flying = under_load(url, stop)
    counts = Counter(status for _, status, _ in outcomes)
    failed = len(outcomes) - counts["200"]
    print(f"SIGKILL under {USERS} users: {dict(counts)}; {failed} failed, {flying} in flight at the kill")
    assert failed <= flying <= USERS, (counts, flying)


# One repository that every replica polls (a shared volume): the source of truth for what the fleet
# serves. A new version is published as export does: copied in under a name that is not a version,
# then renamed, so that no replica ever reads half of it.
POLL_S = 1.0
TEXTS = ["good film", "the plot was awful", "a", "great great good film the plot"]


def shared_repository(folder: Path) -> tuple[Path, Path]:
    """(the shared repository, with clf version 1; a staging one whose clf/2 has other weights)."""
    staged = tiny_repository(folder / "staging")
    export_run(make_run(folder / "runs" / "clf2", "classifier", "bilstm", seed=1), staged, name="clf", cases=5)
    return tiny_repository(folder / "shared"), staged


def publish(version: Path, repository: Path, number: int):
    """Copy a version folder into the repository as that version, atomically: beside it, then renamed."""
    partial = repository / version.parent.name / f".{number}.partial"
    shutil.copytree(version, partial)
    partial.rename(repository / version.parent.name / str(number))


def served(url: str) -> str | None:
    """The version of clf a replica serves now (None: none)."""
    r = httpx.get(f"{url}/v1/models/clf")
    return r.json()["version"] if r.status_code == 200 else None


def infer(client: httpx.AsyncClient | httpx.Client):
    return client.post("/v2/models/clf/infer", json={
        "inputs": [{"name": "text_input", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}],
        "outputs": [{"name": "probabilities"}]})


def test_a_version_dropped_into_the_shared_repository_is_served_by_every_replica_within_the_poll(tmp_path, haproxy):
    """Two replicas polling one repository every POLL_S behind HAProxy, 4 users posting V2 infer
    through it: version 2 published into the repository is served by each replica within the poll
    interval (plus its load and warm-up), and every answer meanwhile is exactly one version's."""
    shared, staged = shared_repository(tmp_path)
    expected = {v: np.array([alone(staged, t, version=v) for t in TEXTS]) for v in (1, 2)}
    with balanced(tmp_path, haproxy, NO_RETRY, shared=shared, repository_poll_s=POLL_S,
                  control_sync_s=0.1) as (url, _, replicas):
        assert [served(r) for r in replicas] == ["1", "1"]
        answers, done = [], asyncio.Event()

        async def user(client: httpx.AsyncClient):
            while not done.is_set():
                r = await infer(client)
                answers.append((r.status_code, r.json()))

        async def scenario() -> list[float]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                users = [asyncio.create_task(user(client)) for _ in range(4)]
                await asyncio.sleep(1)
                published, took = time.perf_counter(), {}
                await asyncio.to_thread(publish, staged / "clf" / "2", shared, 2)
                while len(took) < len(replicas) and time.perf_counter() - published < POLL_S + 20:
                    for replica in replicas:
                        if replica not in took and await asyncio.to_thread(served, replica) == "2":
                            took[replica] = time.perf_counter() - published
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1)  # and on, on version 2 everywhere
                done.set()
                await asyncio.gather(*users)
                return [took.get(r, float("inf")) for r in replicas]

        took = asyncio.run(scenario())
    by_version = Counter(body.get("model_version") for _, body in answers)
    print(f"version 2 served by each replica {', '.join(f'{s:.2f}' for s in took)} s after it was published "
          f"(polling every {POLL_S} s); answers by version: {dict(by_version)}")
    assert max(took) <= POLL_S + 5, took
    assert {status for status, _ in answers} == {200}
    assert set(by_version) == {"1", "2"}
    for _, body in answers:  # each answer is all one version's, the one it names
        got = np.array(body["outputs"][0]["data"]).reshape(len(TEXTS), 2)
        assert np.abs(got - expected[int(body["model_version"])]).max() < 1e-5


def test_control_through_one_replica_is_that_replicas_own(tmp_path, haproxy):
    """A load (pinned) or unload through replica A's control API changes what A serves, not B:
    replicas share no control; B goes on serving what the repository says (its latest version),
    and each reports its own truthfully. A load without a version unpins A, which follows the
    repository again."""
    shared, staged = shared_repository(tmp_path)
    publish(staged / "clf" / "2", shared, 2)
    with balanced(tmp_path, haproxy, NO_RETRY, shared=shared, repository_poll_s=POLL_S, control_sync_s=0.1,
                  control="open") as (url, _, (a, b)):
        assert [served(a), served(b)] == ["2", "2"]
        assert httpx.post(f"{a}/v2/repository/models/clf/load", json={"parameters": {"version": "1"}}).status_code == 200
        time.sleep(2 * POLL_S)  # polls go by: A stays pinned, B does not follow A
        assert [served(a), served(b)] == ["1", "2"]
        ready = lambda replica: {(r["name"], r["version"]) for r in
                                 httpx.post(f"{replica}/v2/repository/index", json={"ready": True}).json()}
        assert ready(a) == {("clf", "1"), ("lm", "1")} and ready(b) == {("clf", "2"), ("lm", "1")}
        with httpx.Client(base_url=url) as client:  # the balancer's answers: A's and B's
            assert Counter(infer(client).json()["model_version"] for _ in range(10)) == {"1": 5, "2": 5}

        assert httpx.post(f"{a}/v2/repository/models/clf/unload").status_code == 200
        time.sleep(2 * POLL_S)  # polling leaves a model unloaded by a call alone
        assert [served(a), served(b)] == [None, "2"]
        with httpx.Client(base_url=url) as client:
            assert Counter(infer(client).status_code for _ in range(10)) == {404: 5, 200: 5}

        assert httpx.post(f"{a}/v2/repository/models/clf/load").json()["version"] == "2"  # the latest, unpinned
        publish(staged / "clf" / "1", shared, 3)
        deadline = time.time() + POLL_S + 10
        while [served(a), served(b)] != ["3", "3"] and time.time() < deadline:
            time.sleep(0.1)
        assert [served(a), served(b)] == ["3", "3"]  # both follow the repository again
