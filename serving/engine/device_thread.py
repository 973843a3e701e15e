"""Where an engine's classifier calls run: on a thread beside its loop, so that the loop takes
messages, forms and pads the next batch and steps generations while the device computes (ONNX
Runtime releases the GIL in run), or inline in the loop.

On a GPU the device computes while the host is idle: the thread is the default there. On the CPU
the device is the cores the loop and the front-ends share, and the hand-over costs more than it
saves (2 cores: docs/benchmarks.md): inline is the default there. RNNSERVE_DEVICE_THREAD decides.
A call done on the thread wakes the loop through a pipe it polls beside its socket.
"""
import os
from concurrent.futures import Future, ThreadPoolExecutor


class DeviceThread:
    def __init__(self, name: str, threaded: bool):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name) if threaded else None
        self.done, self.signal = os.pipe()  # read end: polled by the loop; write end: one byte per call done
        os.set_blocking(self.done, False)
        os.set_blocking(self.signal, False)

    def submit(self, fn, *args) -> Future:
        """fn(*args) on the device thread, in order of submission, the loop woken when it ends; or
        here and now, inline."""
        if self.executor is None:
            future = Future()
            try:
                future.set_result(fn(*args))
            except Exception as e:  # as the thread would hand it over: the batch's requests fail, and only they
                future.set_exception(e)
            return future
        future = self.executor.submit(fn, *args)
        future.add_done_callback(self.wake)
        return future

    def wake(self, _: Future):
        try:
            os.write(self.signal, b".")
        except BlockingIOError:  # the pipe is full: the loop has wake-ups to read already
            pass

    def woken(self):
        """Read the wake-ups (the loop then looks at every formed batch)."""
        try:
            while os.read(self.done, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        if self.executor:
            self.executor.shutdown(wait=True)
        os.close(self.done)
        os.close(self.signal)
