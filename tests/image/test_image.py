"""The serving images, built and run for real with podman (make image-test; CI runs it too).

Builds the Dockerfile twice on the local Debian base (../shared/tools/container-engine.sh): as it
ships (the GPU image: its own ORT_PACKAGE, ONNX Runtime's GPU wheel with the CUDA 13 and cuDNN 9
wheels) and with ORT_PACKAGE=onnxruntime of the same version (the CPU image: nothing of CUDA, at
most 1 GB). Every check below runs against each: the GPU image's CUDA provider resolves every
library but the driver (which only the NVIDIA container runtime brings) after the server's own
CUDA preparation, the CPU image has no CUDA at all; each runs over a small exported model
repository, where no GPU is visible, so the CPU serves and says so; again with a device node
standing in for a GPU, where neither may quietly serve on the CPU; seconds from `run` to ready are
measured and logged; answers are checked against the same models outside the container, under a
short Locust load; each container is stopped by id.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.serving_fixtures import Server, free_port, tiny_repository

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT.parent / "shared" / "tools" / "container-engine.sh"
PODMAN = ["podman", "--runtime", "runc"]
CPU_IMAGE_MAX_BYTES = 1_000_000_000
READY_WITHIN_S = 60  # generous on a shared 2-core box; docs/benchmarks.md has the measured figure


def sh(*command, **kw) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout.strip()


def ca_secret() -> list[str]:
    """This machine reaches PyPI through a proxy whose CA pip is told of (PIP_CERT): hand it to the build."""
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return ["--secret", f"id=pip_ca,src={ca}"] if ca and Path(ca).exists() else []


def shipped_package() -> str:
    """The Dockerfile's ORT_PACKAGE: what the GPU image is built with here too."""
    return re.search(r'^ARG ORT_PACKAGE="([^"]+)"', (ROOT / "Dockerfile").read_text(), re.M).group(1)


def cpu_package() -> str:
    """The CPU image's ORT_PACKAGE: ONNX Runtime's CPU wheel of the GPU wheel's version."""
    return "onnxruntime==" + shipped_package().split("==")[1]


@dataclass(frozen=True)
class Image:
    variant: str  # "gpu" (the Dockerfile as it ships) or "cpu"
    package: str  # its ORT_PACKAGE
    tag: str
    size: int  # bytes, as podman image inspect says

    @property
    def gpu(self) -> bool:
        return self.variant == "gpu"


@pytest.fixture(scope="module")
def repo():
    """A small exported model repository, baked into both images (.image-test/repo)."""
    shutil.rmtree(ROOT / ".image-test", ignore_errors=True)
    tiny_repository(ROOT / ".image-test")  # writes .image-test/runs and .image-test/repo
    return ROOT / ".image-test" / "repo"


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def image(request, repo):
    sh("bash", str(ENGINE))
    package = shipped_package() if request.param == "gpu" else cpu_package()
    tag = f"localhost/rnnserve:image-test-{request.param}"
    started = time.time()
    sh(*PODMAN, "build", "--network", "host", "--build-arg", "BASE_IMAGE=localhost/debian:bookworm",
       "--build-arg", f"ORT_PACKAGE={package}", "--build-arg", "MODEL_REPOSITORY=.image-test/repo", *ca_secret(),
       "-t", tag, str(ROOT), timeout=3600)
    size = int(sh(*PODMAN, "image", "inspect", tag, "--format", "{{.Size}}"))
    print(f"\nbuilt {tag} with {package} in {time.time() - started:.0f}s: {size / 1e6:.0f} MB")
    return Image(request.param, package, tag, size)


@contextmanager
def running(image: Image, *options: str, wait_for: str = "/v2/health/ready"):
    """A container of the image, answering 200 on wait_for: (url, id, gRPC port); stopped by id.
    Logs the seconds from `podman run` to that first 200."""
    port, grpc_port = free_port(), free_port()
    started = time.time()
    cid = sh(*PODMAN, "run", "-d", "--network", "host", "-e", f"RNNSERVE_PORT={port}", "-e",
             f"RNNSERVE_GRPC_PORT={grpc_port}", *options, image.tag)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the HEALTHCHECK's endpoint
            try:
                if httpx.get(f"{url}{wait_for}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"container never answered {wait_for}:\n" + logs(cid))
        print(f"\n{image.tag}: {wait_for} answered 200 {time.time() - started:.1f}s after run ({' '.join(options)})")
        yield url, cid, grpc_port
    finally:
        subprocess.run([*PODMAN, "stop", "-t", "10", cid], capture_output=True)
        subprocess.run([*PODMAN, "rm", "-f", cid], capture_output=True)


def ok(r: httpx.Response, status: int = 200) -> httpx.Response:
    """The response, once it has the status asked for."""
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:1000]}"
    return r


def logs(cid: str) -> str:
    done = subprocess.run([*PODMAN, "logs", cid], capture_output=True, text=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def container(image):
    with running(image) as started:
        yield started


NVIDIA_WHEELS = ("import importlib.metadata as m; "
                 "print(sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia')))")


def test_the_gpu_image_lacks_only_the_driver_and_the_cpu_image_has_no_cuda(image, container):
    """What `docker run --gpus all` needs: every CUDA and cuDNN library the provider links against
    resolves inside the GPU image, from the nvidia-* wheels, once the server has prepared them; the
    driver's libcuda.so.1 is the one left, which the NVIDIA container runtime mounts. The CPU image
    has no CUDA provider and no nvidia-* wheel, and is at most 1 GB."""
    _, cid, _ = container
    report = json.loads(sh(*PODMAN, "exec", cid, "python3", "-m", "serving.engine.devices"))
    wheels = sh(*PODMAN, "exec", cid, "python3", "-c", NVIDIA_WHEELS)
    print(report, wheels, f"{image.size / 1e6:.0f} MB")
    assert report["visible_gpus"] == 0
    if image.gpu:
        assert report["cuda_built"] and "CUDAExecutionProvider" in report["providers"]
        assert report["missing_libraries"] == ["libcuda.so.1"]
        assert "nvidia-cudnn-cu13" in wheels
    else:
        assert not report["cuda_built"] and "CUDAExecutionProvider" not in report["providers"]
        assert wheels == "[]"
        assert image.size <= CPU_IMAGE_MAX_BYTES


def test_the_image_is_ready_soon_after_run_with_the_default_models(image):
    """Seconds from `podman run` to /v2/health/ready answering 200, logged: over the default models
    (model_repository/, from make models) mounted at /models where they exist, else over the
    baked-in small repository."""
    models = ROOT / "model_repository"
    mount = ("-v", f"{models}:/models:ro") if any(models.glob("*/*/model.onnx")) else ()
    started = time.time()
    with running(image, *mount) as (url, _, _):
        ready_s = time.time() - started
        names = {m["name"] for m in ok(httpx.get(f"{url}/v1/models")).json()["models"]}
    print(f"{image.tag}: ready {ready_s:.1f}s after run, serving {sorted(names)}")
    assert names and ready_s < READY_WITHIN_S


@pytest.fixture(scope="module")
def outside(repo):
    s = Server(repo)
    yield s.url
    s.stop()


REQUESTS = [
    ("/v1/models/clf:predict", {"instances": ["good film", "awful plot the the a", "great"]}),
    ("/v2/models/clf/infer", {"inputs": [{"name": "input_ids", "shape": [2, 3], "datatype": "INT64",
                                          "data": [2, 3, 4, 5, 6, 0]},
                                         {"name": "lengths", "shape": [2], "datatype": "INT64", "data": [3, 2]}]}),
    ("/v1/models/lm:generate", {"prompt": "the time", "max_new_tokens": 30, "temperature": 0}),
]


@pytest.mark.parametrize("path,body", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_the_container_answers_as_the_same_models_outside_it(container, outside, path, body):
    url, _, _ = container
    inside, out = ok(httpx.post(url + path, json=body)).json(), ok(httpx.post(outside + path, json=body)).json()
    assert json.dumps(inside, sort_keys=True) == json.dumps(out, sort_keys=True) or close(inside, out), (inside, out)


def test_the_containers_grpc_port_answers_tritons_client_as_rest_does(container):
    url, _, grpc_port = container
    ids, lengths = np.array([[2, 3, 4], [5, 6, 0]], np.int64), np.array([3, 2], np.int64)
    inputs = [triton.InferInput("input_ids", [2, 3], "INT64"), triton.InferInput("lengths", [2], "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(lengths)
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert client.is_server_ready() and client.is_model_ready("clf")
    rest = ok(httpx.post(f"{url}/v2/models/clf/infer", json=REQUESTS[1][1])).json()["outputs"][0]["data"]
    assert np.abs(client.infer("clf", inputs).as_numpy("logits").ravel() - np.array(rest)).max() < 1e-6


def close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) < 1e-5
    return a == b


def test_without_a_gpu_the_container_serves_on_the_cpu_and_says_so(image, container):
    url, cid, _ = container
    info = ok(httpx.get(f"{url}/v1/models/clf")).json()
    assert (info["provider"], info["device"]) == ("CPUExecutionProvider", "cpu")
    parameters = ok(httpx.get(f"{url}/v2/models/clf")).json()["parameters"]
    assert parameters == {"provider": "CPUExecutionProvider", "device": "cpu"}
    metrics = ok(httpx.get(f"{url}/metrics")).text
    assert 'rnnserve_model_info{device="cpu",model="clf",provider="CPUExecutionProvider"' in metrics
    text = logs(cid)
    if image.gpu:
        assert "no GPU visible (the CUDA execution provider cannot load libcuda.so.1): running on the CPU" in text, text[-3000:]
        assert "engine 0: on the CPU: no GPU is visible to this process" in text
    else:
        assert "has no CUDA execution provider: install onnxruntime-gpu): running on the CPU" in text, text[-3000:]
        assert "engine 0: on the CPU: RNNSERVE_PROVIDERS or this ONNX Runtime build asks for no CUDA" in text
    assert sh(*PODMAN, "exec", cid, "python3", "-c",
              "import importlib.util as u; print(u.find_spec('torch') is None)") == "True"  # no PyTorch inside
    assert sh(*PODMAN, "exec", cid, "id", "-u") == "10001"


def test_with_a_gpu_visible_but_unusable_the_container_refuses_the_cpu_and_says_why(image):
    """A device node stands in for a GPU (/dev/null as /dev/nvidia0: no GPU exists here, and no
    driver comes with it): CUDA is asked for by default and a GPU is visible, so no model may
    quietly run on the CPU. The server stays up and unready; the index and the log name the
    library that is missing (the GPU image) or that this ONNX Runtime has no CUDA (the CPU image)."""
    missing = "libcuda.so.1" if image.gpu else "has no CUDA execution provider"
    with running(image, "--device", "/dev/null:/dev/nvidia0", "-e", "RNNSERVE_CONTROL_TOKEN=t0ken",
                 wait_for="/v2/health/live") as (url, cid, _):
        deadline, auth = time.time() + 60, {"Authorization": "Bearer t0ken"}
        index = ok(httpx.post(f"{url}/v2/repository/index", headers=auth))
        while not all(missing in r["reason"] for r in index.json()) and time.time() < deadline:
            time.sleep(0.5)  # until the engine has tried every model
            index = ok(httpx.post(f"{url}/v2/repository/index", headers=auth))
        ok(httpx.get(f"{url}/v2/health/ready"), 503)
        assert index.json() and all(r["state"] == "UNAVAILABLE" and missing in r["reason"]
                                    and "1 GPU(s) visible" in r["reason"] for r in index.json()), index.json()
        text = logs(cid)
        placement = "owns CUDA device 0 of the 1 visible" if image.gpu else "on the CPU: RNNSERVE_PROVIDERS or this"
        assert f"engine 0: {placement}" in text and "not served on the CPU instead" in text, text[-3000:]


def test_with_a_gpu_visible_rnnserve_providers_cpu_serves_on_the_cpu(image):
    """What the CPU manifests set, and what the refusal above tells the operator to set: asked for
    the CPU, either image serves there with a GPU visible."""
    with running(image, "--device", "/dev/null:/dev/nvidia0", "-e", 'RNNSERVE_PROVIDERS=["CPUExecutionProvider"]') as (url, _, _):
        info = ok(httpx.get(f"{url}/v1/models/clf")).json()
        assert (info["provider"], info["device"]) == ("CPUExecutionProvider", "cpu")


PROCESSES = """
import json, pathlib
rows = []
for proc in pathlib.Path('/proc').glob('[0-9]*'):
    try:
        command = (proc / 'cmdline').read_bytes().replace(b'\\0', b' ').decode()
        onnxruntime = 'onnxruntime' in (proc / 'maps').read_text()
    except OSError:
        continue
    if 'python' in command:
        rows.append({'command': command, 'onnxruntime': onnxruntime})
print(json.dumps(rows))
"""


def test_the_container_runs_engines_and_front_ends_apart(container):
    """Inside the image: the inference engines (python -m serving.engine) hold ONNX Runtime; the
    HTTP front-end workers (uvicorn's, spawned) do not even load it."""
    _, cid, _ = container
    rows = json.loads(sh(*PODMAN, "exec", cid, "python3", "-c", PROCESSES))
    engines = [r for r in rows if "serving.engine" in r["command"]]
    front_ends = [r for r in rows if "multiprocessing" in r["command"] and "spawn" in r["command"]]
    assert engines and all(r["onnxruntime"] for r in engines), rows
    assert front_ends and not any(r["onnxruntime"] for r in front_ends), rows


def test_a_short_locust_load_against_the_container_has_zero_failures(container, tmp_path):
    url, _, grpc_port = container
    env = os.environ | {"RNNSERVE_LOADTEST_MODEL": "clf", "RNNSERVE_LOADTEST_LM": "lm",
                        "RNNSERVE_LOADTEST_GRPC": f"127.0.0.1:{grpc_port}"}
    done = subprocess.run([sys.executable, "-m", "loadtest", "run", "--host", url, "--users", "8", "--spawn-rate", "8",
                           "--duration", "5s", "--scenario", "all", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())["endpoints"]
    assert summary["Aggregated"]["requests"] > 0 and summary["Aggregated"]["failures"] == 0
