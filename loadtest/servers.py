"""Processes the load tests measure: servers started and awaited, ports, CPU and memory read
from /proc, the machine's name."""
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rnnserve(repository: Path, server_env: list[str]) -> tuple[subprocess.Popen, int]:
    """python -m serving over `repository` on a free port of 127.0.0.1, in its default layout with
    the RNNSERVE_X=VALUE settings of --server-env, ready: the process and its port."""
    port = free_port()
    env = {"RNNSERVE_REPOSITORY": str(repository), **dict(kv.split("=", 1) for kv in server_env)}
    return start("rnnserve", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port)], env, port,
                 "/v2/health/ready"), port


def cpu_by_role(pid: int) -> dict[str, float]:
    """utime + stime (all threads) of a server process and its children, split into its inference
    engines (python -m serving.engine) and the rest: the HTTP front-ends (and a supervisor)."""
    roles = {"frontend": 0.0, "engine": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            roles["engine" if b"serving.engine" in command else "frontend"] += (int(fields[11]) + int(fields[12])) / TICK
    return roles


def machine_busy_s() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # all but idle and iowait


def start(name: str, command: list[str], env: dict, port: int, ready_path: str, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server and wait until GET ready_path answers 200 (every worker loaded). Its log
    goes to a file (a pipe nobody reads would fill and stop it; proc.log_path); the error shows its tail."""
    log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd)
    proc.log_path = Path(log.name)  # for harnesses that wait on what the server logs
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
    time.sleep(1)  # the other processes of a multi-process server finish loading
    print(f"started {name} on :{port} (log {log.name})")
    return proc


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the server's workers), in MB."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if status.parent.name == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def processes(pid: int) -> dict[int, dict]:
    """A server and its children, each with its role (supervisor, engine N, front-end, other) and
    resident memory in MB."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            command = (status.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        me = int(status.parent.name)
        if me != pid and fields.get("PPid", "").strip() != str(pid):
            continue
        role = ("supervisor" if me == pid else f"engine {command[command.index('--index') + 1]}"
                if "serving.engine" in command else "front-end" if any("spawn_main" in c for c in command) else "other")
        found[me] = {"role": role, "rss_mb": int(fields.get("VmRSS", "0 kB").split()[0]) / 1024}
    return found


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
