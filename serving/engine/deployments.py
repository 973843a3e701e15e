"""What an engine serves: one deployed version per model, and changing that without dropping a
request (Triton's model-control verbs: index, load, unload).

load: the new version is read, checked against its manifest's sha256, given a session and warmed
up in a thread beside the one serving; only then do new requests go to it. The old version is
retired: it keeps answering what was sent to it (requests queued, generations running, and for a
moment what front-ends encoded with its vocabulary before they heard of the swap), then its
session is released. A version that fails any of that is refused with the reason, and the old one
keeps serving. Optional polling (repository_poll_s) loads new versions as they appear, except for
models pinned to a version or unloaded by a call.
"""
import ctypes
import gc
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.repository import ManifestError, UnknownModel, model_dir, model_names, read_config, versions
from serving.common import metrics
from serving.common.settings import Settings
from serving.engine.batching import Batcher
from serving.engine.generation import LanguageModel
from serving.engine.runner import ModelLoadError, Runner

log = logging.getLogger(__name__)
QUIET_S = 1.0  # a retired version lingers this long after its last request, for messages already on their way


@dataclass(eq=False)
class Deployment:
    runner: Runner
    batcher: Batcher
    lm: LanguageModel | None = None
    retired_at: float | None = None  # when it stopped taking new requests
    last_used: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def version(self) -> int:
        return self.runner.version

    def busy(self) -> bool:
        return self.batcher.busy() or bool(self.lm and self.lm.has_work())

    def release(self):
        """Drop the ONNX Runtime session now, not with the last reference, and give the heap back."""
        if self.lm:
            self.lm.expire(everything=True)
        self.runner.session = None
        return_freed_memory()
        log.info("released %s version %s", self.name, self.version)


class Deployments:
    def __init__(self, settings: Settings, device: int = 0, asked: Path | None = None):
        """asked: where this engine keeps what model control asked of it (pins, unloads), so that
        it serves the same after a restart."""
        self.settings, self.device, self.asked = settings, device, asked
        self.root = Path(settings.repository).resolve()
        self.current: dict[str, Deployment] = {}
        self.retiring: list[Deployment] = []
        self.pinned: dict[str, int] = dict(settings.model_versions)  # from the settings or a load call
        self.unloaded: set[str] = set()  # unloaded by a call: polling leaves them alone
        if asked and asked.exists():
            before = json.loads(asked.read_text())
            self.pinned |= {name: int(v) for name, v in before["pinned"].items()}
            self.unloaded = set(before["unloaded"])
        self.failed: dict[tuple[str, int], str] = {}  # (name, version) -> why it did not load
        self.pending: dict[str, Future] = {}  # loads not yet settled by the engine's loop: polling waits for them
        self.said: dict[str, str] = {}  # what was last logged of each model that polling could not read
        self.loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")  # one load at a time
        map_large_buffers()

    def deployment(self, runner: Runner) -> Deployment:
        s = self.settings
        lm = (LanguageModel(runner, s.max_generations, s.max_sessions, s.session_idle_s, s.max_new_tokens,
                            int(s.prompt_cache_mb * 2**20)) if runner.task == "lm" else None)
        return Deployment(runner, Batcher(runner, metrics.of(metrics.QUEUE_DEPTH, runner.name)), lm)

    def start(self):
        """Deploy every model in the repository now, except those a call unloaded: its pinned
        version, else the newest that loads (an older one where a newer fails). One that fails
        stays out, with the reason in the index and the log; with none served the engine still
        runs, not ready, so that the index can say why (and a load can mend it)."""
        names = model_names(self.root)
        for name in names:
            if name not in self.unloaded:
                self.deploy_first_good(name)
        if not self.current:
            log.error("no model in %s is served (%s): not ready until a load succeeds",
                      self.root, "see the errors above" if names else "run `make models` or python -m export")

    def deploy_first_good(self, name: str):
        try:
            candidates = [self.pinned[name]] if name in self.pinned else versions(model_dir(self.root, name))[::-1]
        except UnknownModel as e:
            return log.error("%s is not served: %s", name, e)
        for version in candidates:
            try:
                load = self.load(name, version, pin=name in self.pinned)
            except UnknownModel as e:
                return log.error("%s is not served: %s", name, e)
            try:
                return self.swap(load.result())
            except ModelLoadError:
                continue  # the load logged why; an older version may do
            finally:
                self.settle(load)

    def find(self, name: str, version: int) -> Deployment | None:
        """The deployment of that version, serving or retiring (not yet released)."""
        current = self.current.get(name)
        if current and current.version == version:
            return current
        return next((d for d in self.retiring if d.name == name and d.version == version), None)

    def load(self, name: str, version: int | None, pin: bool) -> Future:
        """Load a version (the latest if None) in the load thread; the future's result is handed to
        swap() by the engine's loop. Raises UnknownModel at once for a name or version not on disk."""
        folder = model_dir(self.root, name)
        found = versions(folder)
        if not found:
            raise UnknownModel(f"no model {name!r} in the repository (its folder has no version)")
        if version is not None and version not in found:
            raise UnknownModel(f"model {name!r} has no version {version} (it has {found})")
        version = version or found[-1]

        def load() -> tuple[Runner, bool]:
            try:
                try:
                    config = read_config(folder)
                except ManifestError as e:
                    raise ModelLoadError(f"unreadable serving config: {e}") from e
                runner = Runner.load(folder / str(version), self.settings, config, self.device)
            except ModelLoadError as e:
                self.failed[name, version] = str(e)
                log.error("%s", e)
                raise
            self.failed.pop((name, version), None)
            return runner, pin

        self.pending[name] = future = self.loads.submit(load)
        return future

    def settle(self, load: Future):
        """The engine's loop has swapped in (or refused) what this load brought."""
        self.pending = {name: f for name, f in self.pending.items() if f is not load}

    def swap(self, loaded: tuple[Runner, bool]) -> Deployment:
        """In the engine's loop: the loaded version takes new requests; the old one retires."""
        runner, pin = loaded
        old, self.current[runner.name] = self.current.get(runner.name), self.deployment(runner)
        self.unloaded.discard(runner.name)
        if pin:
            self.pinned[runner.name] = runner.version
        else:
            self.pinned.pop(runner.name, None)
        if old:
            self.retire(old)
        info(runner).set(1)
        self.remember()
        log.info("serving %s version %s%s", runner.name, runner.version, f" (was {old.version})" if old else "")
        return self.current[runner.name]

    def unload(self, name: str):
        model_dir(self.root, name)
        old = self.current.pop(name, None)
        if old is None:
            raise UnknownModel(f"model {name!r} is not loaded")
        self.unloaded.add(name)
        self.retire(old)
        self.remember()

    def remember(self):
        """Write down what model control asked of this engine (atomically), for its next start."""
        if self.asked:
            staged = self.asked.with_suffix(".partial")
            staged.write_text(json.dumps({"pinned": self.pinned, "unloaded": sorted(self.unloaded)}))
            staged.replace(self.asked)

    def retire(self, deployment: Deployment):
        deployment.retired_at = time.monotonic()
        info(deployment.runner).set(0)
        if deployment.lm:
            deployment.lm.expire(everything=True)  # sessions belong to their version
        self.retiring.append(deployment)

    def release_idle(self, grace_s: float) -> list[Deployment]:
        """Release retired versions that have answered everything (or waited out the grace
        period); the released ones, whose queues the engine answers."""
        now, released = time.monotonic(), []
        for d in list(self.retiring):
            quiet = not d.busy() and now - max(d.retired_at, d.last_used) >= QUIET_S
            if quiet or now - d.retired_at >= grace_s:
                if d.busy():
                    log.warning("%s v%s released with work unanswered after %.0fs", d.name, d.version, grace_s)
                self.release(d)
                self.retiring.remove(d)
                released.append(d)
        return released

    def index(self) -> list[dict]:
        """Every version of every model on disk: READY (deployed), UNLOADING (answering its last
        requests) or UNAVAILABLE, with the reason when a load failed."""
        rows = []
        for name in model_names(self.root):
            current = self.current.get(name)
            retiring = {d.version for d in self.retiring if d.name == name}
            for version in versions(self.root / name):
                if current and current.version == version:
                    state, reason = "READY", ""
                elif version in retiring:
                    state, reason = "UNLOADING", "answering the requests it took before a swap or unload"
                else:
                    state, reason = "UNAVAILABLE", self.failed.get((name, version), "not loaded")
                rows.append({"name": name, "version": str(version), "state": state, "reason": reason})
        return rows

    def poll(self) -> list[Future]:
        """Loads of new models and new versions found on disk: one at a time per model, failed
        versions not retried; a folder that cannot be read is logged once and passed over."""
        started = []
        try:
            names = model_names(self.root)
        except OSError as e:
            self.say("", f"the repository {self.root} cannot be read: {e}")
            return started
        for name in names:
            if name in self.unloaded or name in self.pinned or name in self.pending:
                continue
            try:
                latest = versions(self.root / name)[-1]
                current = self.current.get(name)
                if (current is None or latest > current.version) and (name, latest) not in self.failed:
                    started.append(self.load(name, latest, pin=False))
            except (OSError, UnknownModel) as e:  # changed or removed while we looked
                self.say(name, f"{name} cannot be read: {e}")
        return started

    def say(self, name: str, problem: str):
        if self.said.get(name) != problem:
            self.said[name] = problem
            log.error("%s", problem)

    def all(self) -> list[Deployment]:
        return [*self.current.values(), *self.retiring]

    @staticmethod
    def release(deployment: Deployment):
        try:
            deployment.release()
        except Exception:  # logged; the engine goes on, and the version is gone from the index
            log.exception("releasing %s v%s failed", deployment.name, deployment.version)

    def close(self):
        for d in self.all():
            self.release(d)
        self.current, self.retiring = {}, []
        self.loads.shutdown(wait=False, cancel_futures=True)


def info(runner: Runner):
    """The version's rnnserve_model_info sample: where it runs."""
    return metrics.of(metrics.MODEL_INFO, runner.name, str(runner.version), runner.provider, runner.device,
                      runner.variant)


MMAP_THRESHOLD_BYTES = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def map_large_buffers():
    """Fix glibc's mmap threshold at 1 MiB, so that every buffer of a MiB or more (ONNX Runtime's
    arena chunks, a language model's pools) gets pages of its own, which go back to the OS when
    it is freed. Left to itself glibc raises the threshold to the size of each mapped buffer
    freed (up to 32 MiB): after a swap's release the next version's buffers came from the heap,
    which fragmented and kept them; the engine's RSS grew 1.25-1.35x over 10 swaps, and held
    within 1.01x with this (docs/benchmarks.md, "Engine memory over hot swaps")."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def return_freed_memory():
    """Give freed heap back to the OS. Loads run in another thread, and glibc keeps what its
    arena freed; without this the resident size grew ~20 MB per reload in the soak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
