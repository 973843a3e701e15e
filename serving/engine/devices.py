"""The devices an engine may run on, and what ONNX Runtime's CUDA execution provider needs there.

    python -m serving.engine.devices     # JSON: providers, GPUs visible, CUDA libraries still missing

ONNX Runtime's GPU wheel does not look for the CUDA and cuDNN libraries that its `nvidia-*`
wheels install (site-packages/nvidia/...): without help its CUDA provider fails to load and every
session lands on the CPU. prepare_cuda() loads them first (onnxruntime.preload_dlls: the wheels,
else the system's CUDA), in every engine before its first session, in the image and on a host
alike. What then still does not resolve is named by missing_libraries(): in a container without
a GPU, only the driver's libcuda.so.1, which the NVIDIA container runtime mounts under --gpus.
"""
import ctypes
import json
import logging
import os
import subprocess
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DRIVER = "libcuda.so.1"


def visible_gpus() -> int:
    """GPUs this process may use: the device nodes the driver (or the container runtime) exposes,
    at most as many as CUDA_VISIBLE_DEVICES names."""
    devices = len(list(Path("/dev").glob("nvidia[0-9]*")))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and devices:
        return min(devices, len([d for d in visible.split(",") if d.strip()]))
    return devices


def on_the_cpu_because(providers) -> str:
    """The rule "is CUDA usable here", written once: why an engine with these providers runs on the
    CPU, "" where it runs on a GPU (CUDA asked for, this ONNX Runtime has it, a GPU visible).
    Whether CUDA's libraries load, each engine finds when it opens a session (why_not_cuda)."""
    if CUDA not in providers or not cuda_built():
        return "RNNSERVE_PROVIDERS or this ONNX Runtime build asks for no CUDA"
    if not visible_gpus():
        return "no GPU is visible to this process"
    return ""


def usable_gpus(providers=(CUDA,)) -> int:
    """The GPUs an engine with these providers runs on (0: it runs on the CPU)."""
    return 0 if on_the_cpu_because(providers) else visible_gpus()


def cuda_built() -> bool:
    """Whether this ONNX Runtime has the CUDA execution provider (the GPU wheel)."""
    return CUDA in ort.get_available_providers()


def provider_library() -> Path:
    return Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"


def prepare_cuda():
    """Make the CUDA and cuDNN libraries loadable before the first session (a no-op without the GPU
    build). preload_dlls prints what it could not load; missing_libraries() says it again, by name."""
    if cuda_built():
        ort.preload_dlls(cuda=True, cudnn=True)


def missing_libraries() -> list[str]:
    """The shared libraries the CUDA provider needs that this process cannot load now ([] when it
    loads). ldd lists the provider's dependencies; each it cannot find is tried by name here,
    where prepare_cuda() may have loaded it already."""
    library = provider_library()
    if not library.exists():
        return [library.name]
    try:
        ctypes.CDLL(str(library))
        return []
    except OSError as e:
        first = str(e).split(":")[0]
    try:
        listed = subprocess.run(["ldd", str(library)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return [first]
    missing = []
    for line in listed.splitlines():
        if "not found" in line:
            name = line.split()[0]
            try:
                ctypes.CDLL(name)
            except OSError:
                missing.append(name)
    return missing or [first]


def gpu_name(device: int) -> str:
    """The GPU's model as nvidia-smi names it ("" where it cannot be asked)."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device}"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return listed.stdout.strip() if listed.returncode == 0 else ""


def why_not_cuda() -> str:
    """Why a session asked to run on CUDA did not, as far as this process can tell."""
    if not cuda_built():
        return f"this ONNX Runtime ({ort.__version__}) has no CUDA execution provider: install onnxruntime-gpu"
    if missing := missing_libraries():
        return f"the CUDA execution provider cannot load {', '.join(missing)}"
    return "the CUDA execution provider loads, but ONNX Runtime did not place the session on the GPU (see its log)"


def report() -> dict:
    prepare_cuda()
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "visible_gpus": visible_gpus(),
            "cuda_built": cuda_built(), "missing_libraries": missing_libraries() if cuda_built() else None}


if __name__ == "__main__":
    print(json.dumps(report()))
