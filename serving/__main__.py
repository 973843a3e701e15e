"""Serve the model repository over HTTP: inference engines and HTTP front-ends.

    python -m serving --repository model_repository [--host 0.0.0.0] [--port 8000] [--workers N] [--engines N]

Every setting can also come from the environment as RNNSERVE_<NAME> (serving/common/settings.py).
The processes on the machine:
- engines (python -m serving.engine), one per CUDA device, else one per CPU core: each owns the
  ONNX Runtime sessions on its device, the batching and the generation loop
  (serving/engine/engine.py);
- HTTP front-ends (uvicorn workers, each on a socket of its own on the port): parse, validate,
  tokenize and answer, and reach the engines over Unix sockets (serving/frontend/client.py);
- this one: it starts them, restarts an engine that dies (the front-ends send what was in flight
  there to another engine serving its model, else answer it 503 at once), and on SIGTERM drains
  the front-ends (readiness false and every answer closing its connection; requests still served
  for RNNSERVE_DRAIN_SERVE_S while a load balancer takes the replica out, then answered 503 for
  RNNSERVE_DRAIN_S, then the port closed and the requests in flight answered within
  RNNSERVE_SHUTDOWN_GRACE_S), then stops the engines and removes its runtime folder.
"""
import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from serving.common.frames import socket_path
from serving.common.logs import configure_logging
from serving.common.settings import Settings

log = logging.getLogger("serving")


class Engines:
    """The engine processes: started, watched, restarted when one dies, stopped at the end."""

    def __init__(self, addresses: list[str], devices: list[int]):
        self.addresses, self.devices = addresses, devices
        self.processes: list[subprocess.Popen | None] = [None] * len(addresses)
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="engines", daemon=True)

    def spawn(self, i: int):
        command = [sys.executable, "-m", "serving.engine", "--address", self.addresses[i], "--index", str(i),
                   "--device", str(self.devices[i])]
        # a session of its own: a signal to the server's process group (Ctrl-C, `timeout`, a process manager)
        # stops the server, which drains and then stops its engines, instead of stopping them mid-drain
        self.processes[i] = subprocess.Popen(command, start_new_session=True)
        log.info("engine %d started (pid %d) on %s", i, self.processes[i].pid, self.addresses[i])

    def start(self):
        for i in range(len(self.addresses)):
            self.spawn(i)
        self.watcher.start()

    def watch(self):
        while not self.stopping.wait(0.2):
            for i, process in enumerate(self.processes):
                if process.poll() is not None and not self.stopping.is_set():
                    log.error("engine %d (pid %d) exited with %s: restarting it", i, process.pid, process.returncode)
                    mark_dead(process.pid)
                    self.spawn(i)

    def stop(self, grace_s: float):
        self.stopping.set()
        self.watcher.join()  # its restart in progress ends first: the engine it starts gets the SIGTERM too
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for i, process in enumerate(self.processes):
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.error("engine %d (pid %d) has not stopped %gs after SIGTERM: its threads' stacks follow; "
                          "killing it", i, process.pid, grace_s)
                process.send_signal(signal.SIGUSR1)  # faulthandler's dump (serving/engine/__main__.py)
                time.sleep(0.5)
                process.kill()


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several front-ends, each listening on a socket of its own bound to
    the port with SO_REUSEPORT, so that the kernel spreads new connections over them evenly. On one
    shared socket the front-end awake first took a whole burst: 16 keep-alive clients landed all on
    one of two front-ends in 7 of 12 tries (docs/benchmarks.md), the other idle. A front-end the
    supervisor restarts listens on every socket, its predecessor's among them (the connections
    waiting there are served). When it stops them it lets go of its copies of the sockets: the
    port then closes when the last front-end closes its own after its drain, and new connections
    are refused instead of waiting in the kernel's queue to be reset when this process exits."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config, sockets=listeners(config.host, config.port, config.workers))

    def init_processes(self):
        for listener in self.sockets:
            process = Process(self.config, [listener])
            process.start()
            self.processes.append(process)

    def terminate_all(self):
        for listener in self.sockets:
            listener.close()
        super().terminate_all()


def listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` TCP sockets bound to host:port with SO_REUSEPORT (port 0: a free port), not yet
    listening (each front-end listens on its own). The port is first bound alone: a port another
    process holds, with SO_REUSEPORT or not (another server left running), is refused (OSError)
    rather than shared with it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as alone:
        alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        alone.bind((host, port))
        port = alone.getsockname()[1]
    bound = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        bound.append(sock)
    return bound


def serve_http(**options):
    """The HTTP front-ends (uvicorn.run's options): in this process when there is one (its port
    closes with its server), else under the supervisor. A SIGTERM outside uvicorn's own handling
    (before it starts, or re-raised by it once it has stopped) ends this process through its
    clean-up, not past it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if options["workers"] == 1:
        uvicorn.run(**options)
    else:
        try:
            supervisor = Supervisor(uvicorn.Config(**options))
        except OSError as e:  # the port is taken, or the host is not this machine's
            sys.exit(f"python -m serving: cannot listen on {options['host']}:{options['port']}: {e.strerror}")
        supervisor.run()


def mark_dead(pid: int):
    """Drop a dead process's live gauges from the metrics the front-ends serve."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def process_counts(settings: Settings) -> tuple[int, int]:
    """(engines, HTTP front-ends) as the settings ask, else one engine per GPU and the other cores'
    front-ends; on the CPU one engine per core (their ONNX Runtime calls run side by side) and one
    front-end per core."""
    gpus, cores = cuda_devices(settings), len(os.sched_getaffinity(0))
    engines = settings.engines or gpus or cores
    return engines, settings.workers or (max(1, cores - engines) if gpus else cores)


def cuda_devices(settings: Settings) -> int:
    """GPUs to start an engine on: those visible, where CUDA is asked for and this ONNX Runtime has
    it (whether its libraries load, each engine checks: serving/engine/devices.py)."""
    from serving.engine import devices  # ONNX Runtime: in this process, not in the front-ends
    return devices.usable_gpus(settings.providers)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", help="model repository folder (RNNSERVE_REPOSITORY)")
    p.add_argument("--host", help="RNNSERVE_HOST, default 0.0.0.0")
    p.add_argument("--port", type=int, help="RNNSERVE_PORT, default 8000")
    p.add_argument("--workers", type=int, help="RNNSERVE_WORKERS: HTTP front-end processes")
    p.add_argument("--engines", type=int, help="RNNSERVE_ENGINES: inference engine processes")
    args = p.parse_args(argv)
    for name, value in vars(args).items():  # the front-ends and engines read their settings from the environment
        if value is not None:
            os.environ[f"RNNSERVE_{name.upper()}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as e:  # refuse to start, saying which setting and why
        sys.exit(f"python -m serving: {e}")
    configure_logging()
    gpus, (engines, workers) = cuda_devices(settings), process_counts(settings)
    runtime = tempfile.mkdtemp(prefix="rnnserve-")  # the engines' sockets and the metrics files; removed at exit
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", runtime)
    os.environ["RNNSERVE_RUNTIME_DIR"] = runtime
    try:
        addresses = [socket_path(f"{runtime}/engine-{i}.sock") for i in range(engines)]
    except ValueError as e:  # TMPDIR too deep for a Unix socket's path: refuse to start, saying so
        shutil.rmtree(runtime, ignore_errors=True)
        sys.exit(f"python -m serving: {e}")
    os.environ["RNNSERVE_ENGINE_ADDRESSES"] = json.dumps(addresses)
    log.info("%d engine(s)%s, %d HTTP front-end(s)", engines, f" on {gpus} CUDA device(s)" if gpus else "", workers)
    processes = Engines(addresses, [i % max(1, gpus) for i in range(engines)])
    processes.start()
    try:
        serve_http(app="serving.frontend.app:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
                   log_level="info", access_log=False,
                   limit_concurrency=settings.max_connections + 1,  # uvicorn counts the connection asking: L serves L - 1
                   timeout_graceful_shutdown=settings.shutdown_grace_s, proxy_headers=False)
    finally:
        processes.stop(settings.shutdown_grace_s)
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
