"""The garbage collector once a serving process is up: what it loaded to serve (FastAPI's routes,
pydantic's schemas, grpc and protobuf, the codecs, ONNX Runtime's bindings: hundreds of
thousands of objects) is frozen out of every later collection, and the young generation is
collected every 20,000 allocations instead of 700.

    freeze_startup_heap()  # once, when the process is ready to serve

Without it the front-end spent a fifth of its CPU per request collecting: the full collections
walked the whole start-up heap, and a request's few hundred short-lived objects set off a young
collection every few requests (py-spy: the share sat on whatever frame allocated; the front-end's
CPU per request over a negligible model 137-142 µs, with this 109-111 µs, docs/benchmarks.md).
A request's garbage is almost all freed by reference counting; the cycles it leaves (futures,
tracebacks) wait a few thousand requests longer for a collection.
"""
import gc

THRESHOLDS = (20_000, 10, 10)  # allocations before a young collection; young, then middle, collections per older one


def freeze_startup_heap():
    """Once per process (a second server in the same process, as in the tests, finds it done)."""
    if gc.get_threshold() != THRESHOLDS:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)
