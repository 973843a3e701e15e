import gc
import os

import torch

torch.set_flush_denormal(True)  # as training does
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's workers share the cores: one torch thread each
    torch.set_num_threads(1)


def pytest_collection_finish(session):
    """Every test module is imported, and what exists now lives to the end: frozen out of the
    collector's reach, so that each gc.collect() the engine runs when it releases a version
    (return_freed_memory) skips it: ~0.4 s per release in this process, and a Server's stop
    releases every model it serves."""
    gc.freeze()
