"""The thread an engine's classifier calls run on, so that its loop takes messages, forms and pads
the next batch and steps generations while the device computes (ONNX Runtime releases the GIL in
run). A finished call wakes the loop through a pipe it polls beside its socket.
"""
import os
from concurrent.futures import Future, ThreadPoolExecutor


class DeviceThread:
    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.done, self.signal = os.pipe()  # read end: polled by the loop; write end: one byte per call done
        os.set_blocking(self.done, False)
        os.set_blocking(self.signal, False)

    def submit(self, fn, *args) -> Future:
        """fn(*args) on the device thread, in order of submission; the loop is woken when it ends."""
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
        self.executor.shutdown(wait=True)
        os.close(self.done)
        os.close(self.signal)
