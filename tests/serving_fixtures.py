"""A real uvicorn server on 127.0.0.1 over a repository of tiny exported models."""
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import uvicorn

from core.codec import softmax
from core.repository import read_version
from export.repository import export_run
from loadtest.servers import free_port
from serving.app import create_app
from serving.settings import Settings
from tests.test_export import make_run


def tiny_repository(folder: Path) -> Path:
    """A BiLSTM classifier (labels neg, pos; word tokens; max_len 12) and a char GRU LM."""
    export_run(make_run(folder / "runs" / "clf", "classifier", "bilstm"), folder / "repo", cases=5)
    export_run(make_run(folder / "runs" / "lm", "lm", "gru"), folder / "repo", cases=5)
    return folder / "repo"


def alone(repository: Path, text: str, name: str = "clf", version: int = 1) -> np.ndarray:
    """The reference: one version's exported graph run on this one text, no server, no batch
    -> (num_labels,) probabilities."""
    read = read_version(repository / name / str(version))
    ids, _ = read.codec.encode(text)
    sess = ort.InferenceSession(read.graph_bytes(), providers=["CPUExecutionProvider"])
    return softmax(sess.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0])


class Server:
    """uvicorn in a thread; .url, .app (to look inside), and stop()."""

    def __init__(self, repository: Path, **settings):
        self.app = create_app(Settings(repository=repository, **settings))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
