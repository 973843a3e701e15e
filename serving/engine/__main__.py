"""One inference engine process (python -m serving starts them; see serving/engine/engine.py).

    python -m serving.engine --address /tmp/rnnserve/engine-0.sock [--index 0] [--device 0]

Settings come from the environment (RNNSERVE_*), as for the server. SIGTERM stops the loop
after the step it is in.
"""
import argparse
import ctypes
import faulthandler
import os
import signal

from serving.common import tracing
from serving.common.logs import configure_logging
from serving.common.settings import Settings
from serving.engine.engine import Engine


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m serving.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="the Unix socket path to listen on, e.g. /tmp/rnnserve/engine-0.sock")
    p.add_argument("--index", type=int, default=0, help="this engine's number among the server's")
    p.add_argument("--device", type=int, default=0, help="the CUDA device it runs on (when CUDA is available)")
    args = p.parse_args(argv)
    configure_logging()
    settings = Settings()
    tracing.configure(settings.tracing, "engine")
    engine = Engine(settings, args.address, args.index, args.device)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack on stderr
    die_with_parent()
    try:
        engine.run()
    finally:
        tracing.shutdown()


def die_with_parent():
    """SIGTERM when the process that started this one dies, even by SIGKILL (Linux): an engine
    never outlives its server."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux, or not glibc
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
