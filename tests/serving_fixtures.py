"""A real server on 127.0.0.1 over a repository of tiny exported models: in this process (an
engine in a thread and a uvicorn front-end in another, talking over a Unix socket as the
processes of python -m serving do), or python -m serving itself where its processes are tested."""
import atexit
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import uvicorn

from core.codec import softmax
from core.repository import read_version
from export.repository import export_run
from loadtest.servers import free_port
from serving.frontend.app import create_app
from serving.engine import devices
from serving.engine.engine import Engine
from serving.common.settings import Settings
from tests.test_export import make_run


def device_here() -> tuple[str, str]:
    """(execution provider, device) a server with the default settings runs its models on here."""
    gpu = devices.usable_gpus(Settings().providers) > 0
    return ("CUDAExecutionProvider", "cuda:0") if gpu else ("CPUExecutionProvider", "cpu")


@functools.cache
def tiny_models() -> Path:
    """tiny_repository's runs and exports, made (with their parity checks) once per test session
    in a folder removed when it ends; every test gets its own copy."""
    folder = Path(tempfile.mkdtemp(prefix="rnnserve-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    export_run(make_run(folder / "runs" / "clf", "classifier", "bilstm"), folder / "repo", cases=5)
    export_run(make_run(folder / "runs" / "lm", "lm", "gru"), folder / "repo", cases=5)
    return folder


def tiny_repository(folder: Path) -> Path:
    """A BiLSTM classifier (labels neg, pos; word tokens; max_len 12) and a char GRU LM: their runs
    under folder/runs and the repository folder/repo, returned (a copy: tests may change it)."""
    for part in ("runs", "repo"):
        shutil.copytree(tiny_models() / part, folder / part)
    return folder / "repo"


def alone(repository: Path, text: str, name: str = "clf", version: int = 1) -> np.ndarray:
    """The reference: one version's exported graph run on this one text, no server, no batch
    -> (num_labels,) probabilities."""
    read = read_version(repository / name / str(version))
    ids, _ = read.codec.encode(text)
    sess = ort.InferenceSession(read.graph_bytes(), providers=["CPUExecutionProvider"])
    return softmax(sess.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0])


@functools.lru_cache(maxsize=32)
def cpu_session(graph: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


def graph_logits(repository, name: str, ids: np.ndarray, lengths: np.ndarray, version: int = 1) -> np.ndarray:
    """The exported graph alone on these padded rows, on the CPU (a language model from its zero
    state, zero past each row's length as the server answers)."""
    sess = cpu_session(Path(repository) / name / str(version) / "model.onnx")
    feed = {"input_ids": ids, "lengths": lengths}
    for state in sess.get_inputs()[2:]:  # h0 [layers, batch, hidden]
        feed[state.name] = np.zeros([len(ids) if isinstance(d, str) else d for d in state.shape], np.float32)
    logits = sess.run(None, feed)[0]
    if logits.ndim == 3:
        logits[np.arange(logits.shape[1]) >= lengths[:, None]] = 0
    return logits


def sample(text: str, series: str) -> float:
    """One sample's value in Prometheus text (0 when absent)."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def slowed(server, model: str, seconds: float) -> list[int]:
    """Make each of the model's ONNX Runtime calls on `server` (a Server) take `seconds` longer;
    returns the list the lengths of the rows it runs are appended to."""
    runner = server.deployment(model).runner
    run_call, seen = runner.run_call, []

    def slow(ids, lengths):
        seen.extend(lengths.tolist())
        time.sleep(seconds)
        return run_call(ids, lengths)

    runner.run_call = slow
    return seen


def slowed_steps(server, model: str, seconds: float):
    """Make each generation step of `model` on `server` (a Server) take `seconds` longer."""
    runner = server.deployment(model).runner
    advance = runner.advance
    runner.advance = lambda *a: (time.sleep(seconds), advance(*a))[1]


def streams_gone(server, model: str, timeout_s: float = 10) -> float:
    """Seconds until `model`'s engine on `server` (a Server) holds no generation (at most timeout_s)."""
    lm, started = server.deployment(model).lm, time.monotonic()
    while lm.streams and time.monotonic() - started < timeout_s:
        time.sleep(0.01)
    return time.monotonic() - started


class Server:
    """.url, .engine and .app to look inside, and stop(). Returns once wait_for answers 200."""

    def __init__(self, repository: Path, wait_for: str = "/v2/health/ready", **settings):
        self.runtime = tempfile.mkdtemp(prefix="rnnserve-test-")
        address = f"{self.runtime}/engine-0.sock"
        self.settings = Settings(repository=repository, engine_addresses=[address], **settings)
        self.engine = Engine(self.settings, address)
        self.engine_thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        self.engine_thread.start()
        self.app = create_app(self.settings)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline and self.engine_thread.is_alive():
            try:
                if httpx.get(self.url + wait_for).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server never answered {wait_for} with 200")

    def deployment(self, name: str):
        """The engine's deployment now serving `name`."""
        return self.engine.deployments.current[name]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()
        self.engine_thread.join(10)
        shutil.rmtree(self.runtime, ignore_errors=True)


def serve(repository: Path, *args: str, log=subprocess.DEVNULL, wait_for: str = "/v2/health/ready",
          ready_timeout_s: float = 60, **settings) -> tuple[subprocess.Popen, str]:
    """python -m serving over `repository` on a free port, with command-line `args` and
    RNNSERVE_<NAME> settings; returns once wait_for answers 200 (within ready_timeout_s). Without a
    drain window unless one is asked for: the tests that stop it do not wait one out."""
    port = free_port()
    settings = {"drain_serve_s": 0, "drain_s": 0} | settings
    env = os.environ | {f"RNNSERVE_{k.upper()}": str(v) for k, v in settings.items()}
    process = subprocess.Popen([sys.executable, "-m", "serving", "--repository", str(repository), "--host", "127.0.0.1",
                                "--port", str(port), *args], env=env, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready_timeout_s, wait_for)
    except RuntimeError:  # not left running behind a failed fixture
        process.terminate()
        process.wait(30)
        raise
    return process, url


def wait_ready(url: str, timeout_s: float = 60, path: str = "/v2/health/ready"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}{path}").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered {path} with 200")


def raw_http(url: str, method: str, target: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request sent byte for byte as given (httpx would normalise `..` and encodings away):
    (status, body) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n%s" % (method.encode(), target, len(body), body))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


FRONT_END = "x-rnnserve-frontend"  # the pid of the front-end process that answered


def by_front_end(url: str, path: str, front_ends: int = 2, answers_each: int = 10,
                 timeout_s: float = 60) -> dict[str, list[httpx.Response]]:
    """GET path on a new connection each time (the kernel spreads them over the front-ends that
    share the port) until each of `front_ends` processes has answered `answers_each` times:
    their answers by pid."""
    answers, deadline = {}, time.time() + timeout_s
    while len(answers) < front_ends or min(map(len, answers.values())) < answers_each:
        if time.time() > deadline:
            raise RuntimeError(f"{timeout_s}s of new connections reached only {sorted(answers)} "
                               f"({ {pid: len(a) for pid, a in answers.items()} } answers)")
        r = httpx.get(url + path, headers={"Connection": "close"})
        answers.setdefault(r.headers[FRONT_END], []).append(r)
    return answers


@contextmanager
def client_of(url: str, pid: str, timeout_s: float = 60):
    """A client whose one kept-alive connection is to the front-end process `pid` (check each
    answer's FRONT_END header: a connection the server closed is reopened wherever the kernel says)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as client:
            if client.get("/v2/health/live").headers[FRONT_END] == pid:
                yield client
                return
    raise RuntimeError(f"no connection reached front-end {pid} in {timeout_s}s")


def local_session(url: str, texts: list[str], top_k: int = 10) -> list[tuple[list[str], list[float], int]]:
    """One server's local session over `texts`: (tokens, probabilities, total tokens) per step."""
    sid = httpx.post(f"{url}/v1/models/lm/sessions").json()["session_id"]
    answers = [session_step(httpx.post(f"{url}/v1/models/lm/sessions/{sid}:step", json={"text": t, "top_k": top_k}))
               for t in texts]
    httpx.delete(f"{url}/v1/models/lm/sessions/{sid}")
    return answers


def session_step(r: httpx.Response) -> tuple[list[str], list[float], int]:
    """A session step's answer, which must be 200: (next tokens, their probabilities, total tokens)."""
    assert r.status_code == 200, r.text
    body = r.json()
    return [n["token"] for n in body["next"]], [n["probability"] for n in body["next"]], body["total_tokens"]


def same_steps(got: list, expected: list):
    """Step by step: the same tokens, probabilities within 1e-6, the same count."""
    assert len(got) == len(expected)
    for (tokens, p, total), (tokens_1, p_1, total_1) in zip(got, expected):
        assert (tokens, total) == (tokens_1, total_1)
        assert np.abs(np.array(p) - p_1).max() <= 1e-6
