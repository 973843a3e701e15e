"""The inference engine: one per device, owning every ONNX Runtime session on it, every model's
queue and batches (batching.py) and every generation (generation.py), fed by the HTTP front-ends
over a Unix stream socket it listens on (connections.py).

    python -m serving.engine --address /tmp/rnnserve/engine-0.sock [--index 0] [--device 0]

The loop, top to bottom: take what arrived (requests join their model's queue, cancels mark
them, control verbs start loads), swap in versions that finished loading, send the refusals at
once (with each queue's length, which front-ends shed by), answer the batches whose calls are
done, send every batch that is due to the device (device_thread.py: with a GPU a thread beside
the loop runs the classifier calls while the loop goes on; on the CPU they run inline), run one step of every language model with work, hand back the
results (one frame per front-end), and now and then expire sessions, poll the repository and
release retired versions. It sleeps only when nothing is due, until a message comes or a call ends;
after a request sent alone it polls for RNNSERVE_ENGINE_SPIN_US first (take()).
A front-end that leaves (its connection closed: it stopped or died) is forgotten, and what it had
queued or generating here is dropped as its Cancel would drop it.
"""
import logging
import threading
import time
from concurrent.futures import Future

import msgspec
import numpy as np

from core.repository import UnknownModel
from serving.common.heap import freeze_startup_heap
from serving.common.messages import (Cancel, Catalog, CloseSession, Control, Deployed, Depths, Done, Failed, Generate,
                                     Hello, Infer, OpenSession, SessionOpened, Step, decode_requests,
                                     encode)
from serving.common.settings import Settings
from serving.engine import devices
from serving.engine.batching import Pending
from serving.engine.connections import Connections
from serving.engine.deployments import Deployment, Deployments
from serving.engine.device_thread import DeviceThread
from serving.engine.runner import ModelLoadError

log = logging.getLogger(__name__)
IDLE_S = 0.05  # the longest the loop sleeps: housekeeping and stop() are never further away


class Engine:
    def __init__(self, settings: Settings, address: str, index: int = 0, device: int = 0):
        self.settings, self.address, self.index = settings, address, index
        asked = settings.runtime_dir / f"engine-{index}-control.json" if settings.runtime_dir else None
        self.deployments = Deployments(settings, device, asked)
        self.frontends: set[bytes] = set()
        self.loading: list[tuple[Future, bytes | None, int | None]] = []  # (load, who asked, their request id)
        self.outbox: dict[bytes, list] = {}
        self.stopping = False  # a bool, not an Event: see stop()
        self.alone = False  # the last frames brought one request, sent alone: the next poll spins (take())
        self.ready = threading.Event()
        self.next_housekeeping = self.next_poll = 0.0
        self.connections = Connections(address, settings.engine_spin_us / 1e6)
        threaded = settings.device_thread
        self.device = DeviceThread(f"engine-{index}-device", devices.usable_gpus(settings.providers) > 0
                                   if threaded is None else threaded)

    def run(self):
        """Load every model, listen, then serve until stop()."""
        devices.prepare_cuda()
        log.info("engine %d: %s", self.index, self.placement())
        self.deployments.start()
        self.connections.listen()
        self.connections.watch(self.device.done, self.device.woken)
        freeze_startup_heap()
        self.ready.set()
        log.info("engine %d ready on %s: %s", self.index, self.address,
                 ", ".join(f"{d.name} v{d.version} ({d.runner.provider})" for d in self.deployments.all()))
        try:
            while not self.stopping:
                self.take(self.wait_s())
                self.finish_loads()
                for deployment in self.deployments.all():
                    deployment.batcher.publish()  # the rows that arrived count as waiting before anything runs
                    deployment.batcher.finish(self.post)  # the batches the device thread has done
                self.flush()  # refusals, answers to control and those go out now, with the queues as full as they are
                now = time.monotonic()
                for deployment in self.deployments.all():
                    if deployment.batcher.due_in(now) == 0:
                        deployment.batcher.start(self.device)
                        deployment.batcher.finish(self.post)  # inline, it is done
                        deployment.last_used = time.monotonic()
                    deployment.batcher.publish()
                    if deployment.lm and deployment.lm.has_work():
                        self.post_all(deployment.lm.step())
                        deployment.last_used = time.monotonic()
                self.housekeeping()
                self.flush()
        finally:
            for deployment in self.deployments.all():  # what is on the device is answered
                deployment.batcher.finish(self.post, wait=True)
            self.flush()
            self.connections.close()
            self.device.close()
            self.deployments.close()
            log.info("engine %d stopped", self.index)

    def stop(self):
        """End the loop after the turn it is in (it sleeps IDLE_S at most). SIGTERM's handler: it takes
        no lock, since a second SIGTERM may run it again in the middle of the first (an engine the
        supervisor restarted gets two at the server's stop: the supervisor's and PR_SET_PDEATHSIG's,
        whose parent thread ends then); Event.set() there deadlocked on its own lock, and the engine
        never stopped."""
        self.stopping = True

    def placement(self) -> str:
        """Which device this engine owns, as its start-up log line says."""
        if why := devices.on_the_cpu_because(self.settings.providers):
            return f"on the CPU: {why}"
        gpus = devices.visible_gpus()
        name = devices.gpu_name(self.deployments.device)
        return f"owns CUDA device {self.deployments.device} of the {gpus} visible{f' ({name})' if name else ''}"

    def wait_s(self) -> float:
        """How long the next poll may sleep: 0 when work is due."""
        now, wait = time.monotonic(), IDLE_S
        for deployment in self.deployments.all():
            if deployment.lm and deployment.lm.has_work():
                return 0.0
            due = deployment.batcher.due_in(now)
            if due is not None:
                wait = min(wait, due)
        return wait

    # --- take what arrived ---

    def take(self, timeout_s: float):
        """What arrived, handled. After a request that came alone, sent by a front-end with nothing
        else in flight (a user who waits for each answer), the next poll spins; under load it
        sleeps, and finds more requests to batch when it wakes."""
        arrived, gone = self.connections.poll(timeout_s, spin=self.alone)
        taken, message = 0, None
        for sender, frame in arrived:
            try:
                messages = decode_requests(frame)
            except msgspec.DecodeError as e:  # not a front-end speaking: its connection is closed, the rest go on
                log.error("engine %d: a frame it cannot read (%s): closing that connection", self.index, e)
                self.connections.drop(sender)
                gone.append(sender)
                continue
            taken += len(messages)
            for message in messages:
                try:
                    self.handle(sender, message)
                except Exception as e:  # a bug met by one message fails that message, not the engine
                    log.exception("engine %d could not handle %s", self.index, type(message).__name__)
                    self.post(sender, Failed(getattr(message, "id", 0), 500, f"{type(e).__name__}: {e}"))
        for sender in gone:
            self.forget(sender)
        if arrived:
            self.alone = taken == 1 and isinstance(message, Infer) and message.alone

    def forget(self, sender: bytes):
        """A front-end left: its queued requests, generations and session steps are dropped, as its
        Cancel of each would drop them (a generation's slot is free for the next)."""
        self.frontends.discard(sender)
        self.outbox.pop(sender, None)
        for deployment in self.deployments.all():
            deployment.batcher.cancel(sender, [rid for who, rid in list(deployment.batcher.by_id) if who == sender])
            if deployment.lm:
                lm = deployment.lm
                lm.cancel(sender, [rid for who, rid in [*lm.streams, *lm.waiting_steps] if who == sender])

    def handle(self, sender: bytes, m):
        if isinstance(m, Infer):
            deployment, refused = self.route(m.id, m.model, m.version)
            if refused:
                return self.post(sender, refused)
            if deployment.batcher.full():
                return self.post(sender, Failed(m.id, 503, f"model {m.model!r} has {len(deployment.batcher)} "
                                                           "requests waiting; retry shortly"))
            request = Pending(sender, m.id, m.ids, m.lengths, len(m.lengths) // 4, m.deadline, time.monotonic(), m.trace)
            deployment.batcher.put(request)
        elif isinstance(m, Cancel):
            for deployment in self.deployments.all():
                deployment.batcher.cancel(sender, m.ids)
                if deployment.lm:
                    deployment.lm.cancel(sender, m.ids)
        elif isinstance(m, Generate):
            deployment, refused = self.route(m.id, m.model, m.version, lm=True)
            self.post(sender, refused or deployment.lm.start(sender, m))
        elif isinstance(m, Step):
            self.post(sender, self.step(sender, m))
        elif isinstance(m, OpenSession):
            deployment, refused = self.route(m.id, m.model, None, lm=True)
            if not refused and (sid := deployment.lm.open(m.name)) is None:
                refused = Failed(m.id, 503, f"{deployment.lm.max_sessions} sessions are live; retry shortly")
            self.post(sender, refused or SessionOpened(m.id, sid, deployment.version))
        elif isinstance(m, CloseSession):
            deployment = self.session_owner(m.session)
            closed = deployment is not None and deployment.lm.close(m.session)
            self.post(sender, Done(m.id, {"session_id": m.session, "ended": True}) if closed
                      else Failed(m.id, 404, f"no session {m.session!r}"))
        elif isinstance(m, Control):
            self.control(sender, m)
        elif isinstance(m, Hello):
            self.frontends.add(sender)
            self.post(sender, self.catalog())

    def route(self, rid: int, name: str, version: int | None, lm: bool = False) -> tuple[Deployment | None, Failed | None]:
        """The deployment a request names, or why it cannot have one."""
        current = self.deployments.current.get(name)
        deployment = current if version is None else self.deployments.find(name, version)
        if deployment is None:
            if current is None:
                return None, Failed(rid, 404, f"unknown model {name!r}")
            return None, Failed(rid, 410, f"model {name!r} version {version} is gone (serving {current.version})")
        if lm and deployment.lm is None:
            return None, Failed(rid, 400, f"model {name!r} is a classifier: only language models generate or keep sessions")
        return deployment, None

    def step(self, sender: bytes, m: Step) -> Failed | None:
        """A session's step; one that carries its state runs on the version it names, if that is the
        one serving (a retiring version opens no sessions)."""
        if m.state:
            deployment, refused = self.route(m.id, m.model, None, lm=True)
            if not refused and deployment.version != m.version:
                refused = Failed(m.id, 410, f"model {m.model!r} version {m.version} is not served (serving "
                                            f"{deployment.version})")
            return refused or deployment.lm.step_carried(sender, m)
        if (deployment := self.session_owner(m.session)) is None:
            return Failed(m.id, 404, f"no session {m.session!r} (ended, expired, or its version was replaced)")
        return deployment.lm.step_session(sender, m)

    def session_owner(self, sid: str) -> Deployment | None:
        return next((d for d in self.deployments.current.values() if d.lm and sid in d.lm.sessions), None)

    # --- model control ---

    def control(self, sender: bytes, m: Control):
        try:
            if m.verb == "index":
                return self.post(sender, Done(m.id, self.deployments.index()))
            if m.verb == "statistics":  # of every version it serves or is retiring
                return self.post(sender, Done(m.id, [d.batcher.stats.row(d.name, d.version)
                                                     for d in self.deployments.all()]))
            if m.verb == "unload":
                self.deployments.unload(m.model)
                self.post(sender, Done(m.id, {"name": m.model, "version": None, "state": "UNAVAILABLE"}))
                return self.broadcast_catalog()
            self.loading.append((self.deployments.load(m.model, m.version, pin=m.version is not None), sender, m.id))
        except UnknownModel as e:
            self.post(sender, Failed(m.id, 404, str(e)))

    def finish_loads(self):
        for load, sender, rid in [entry for entry in self.loading if entry[0].done()]:
            self.loading.remove((load, sender, rid))
            self.deployments.settle(load)
            try:
                deployment = self.deployments.swap(load.result())
            except ModelLoadError as e:
                if sender:
                    self.post(sender, Failed(rid, 400, f"load refused, the version serving before stays: {e}"))
                continue
            if sender:
                self.post(sender, Done(rid, {"name": deployment.name, "version": str(deployment.version), "state": "READY"}))
            self.broadcast_catalog()

    def catalog(self) -> Catalog:
        return Catalog([Deployed(d.name, d.version, d.runner.task, d.runner.provider, d.runner.variant, d.runner.device,
                                 d.runner.limits.max_queue_size, d.runner.limits.max_batch_size,
                                 d.runner.limits.max_queue_delay_s) for d in self.deployments.current.values()])

    def broadcast_catalog(self):
        for frontend in self.frontends:
            self.post(frontend, self.catalog())

    # --- run what is due ---

    def housekeeping(self):
        """Every control_sync_s: expire idle sessions, poll the repository, release retired versions."""
        now = time.monotonic()
        if now < self.next_housekeeping:
            return
        self.next_housekeeping = now + self.settings.control_sync_s
        for deployment in self.deployments.current.values():
            if deployment.lm:
                deployment.lm.expire()
        if self.settings.repository_poll_s and now >= self.next_poll:
            self.next_poll = now + self.settings.repository_poll_s
            self.loading += [(load, None, None) for load in self.deployments.poll()]
        for released in self.deployments.release_idle(self.settings.shutdown_grace_s):
            gone = f"{released.name} v{released.version} was unloaded before this request ran; retry"
            for request in released.batcher.take_all():  # past the grace period: told, never left waiting
                self.post(request.sender, Failed(request.id, 503, gone))
            released.batcher.finish(self.post, wait=True)
            released.batcher.publish()
            if released.lm:
                self.post_all(released.lm.fail(np.array(list(released.lm.streams.values()), np.int64), [], gone))

    # --- hand back ---

    def post(self, frontend: bytes, message):
        if message is not None:
            self.outbox.setdefault(frontend, []).append(message)

    def post_all(self, replies: list[tuple[bytes, object]]):
        for frontend, message in replies:
            self.post(frontend, message)

    def flush(self):
        """One frame per front-end with everything for it, and the queue depths it sheds by. Nothing
        waits here: a front-end paces its streams' writes itself (stream_interval_ms), and tokens held
        here would hold back the next generation's first one behind a burst of writes."""
        if not self.outbox:
            return
        depths = Depths({d.name: len(d.batcher) for d in self.deployments.current.values()})
        for frontend, messages in self.outbox.items():
            self.connections.send(frontend, encode([*messages, depths]))
        self.outbox = {}
