"""The served model repository: which version of each model is deployed, and changing that
without dropping a request (Triton's model-control verbs: index, load, unload).

load: the new version is read, checked against its manifest's sha256, given an ONNX Runtime
session and warmed up in a worker thread beside the old one; only then does it take new
requests, and the old deployment is retired once its requests are answered (deployment.py).
A version that fails any of that is refused with the reason, and the old one keeps serving.

Several server processes (--workers N) each hold their own deployments. The one that takes a
load or unload writes the outcome to a small control file; the others read it every
control_sync_s and follow. Optional polling (repository_poll_s) loads new versions as they
appear, except for models pinned to a version or unloaded by a call.
"""
import asyncio
import fcntl
import json
import logging
import os

from core.repository import UnknownModel, model_dir, model_names, versions
from serving.deployment import Deployment
from serving.model import ModelLoadError, ServedModel
from serving.settings import Settings

log = logging.getLogger(__name__)

class ModelRepository:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.repository.resolve()
        self.deployed: dict[str, Deployment] = {}
        self.retiring: dict[Deployment, asyncio.Task] = {}  # each until its last request is answered
        self.pinned: dict[str, int] = dict(settings.model_versions)  # name -> version, from settings or a load call
        self.unloaded: set[str] = set()  # unloaded by a call: polling leaves them alone
        self.failed: dict[tuple[str, int], str] = {}  # (name, version) -> why it did not load
        self.lock = asyncio.Lock()  # one load or unload at a time
        self.control_file = settings.control_dir / "models.json" if settings.control_dir else None
        self.synced = 0  # the control file's sequence number this process has applied

    async def start(self):
        """Deploy every model in the repository (its pinned version, else its latest)."""
        names = model_names(self.root)
        if not names:
            raise RuntimeError(f"no models in {self.root}: run `make models` or python -m export")
        for name in names:
            await self.load(name, self.pinned.get(name), pin=name in self.pinned, announce=False)

    async def load(self, name: str, version: int | None = None, *, pin: bool, announce: bool = True) -> Deployment:
        """Deploy `version` of `name` (the latest if None) in place of the current one; pinned,
        polling leaves it there. Raises UnknownModel or ModelLoadError, and then the current
        deployment stays."""
        async with self.lock:
            folder = model_dir(self.root, name)
            found = versions(folder)
            if version is not None and version not in found:
                raise UnknownModel(f"model {name!r} has no version {version} (it has {found})")
            version = version or found[-1]
            try:
                model = await asyncio.to_thread(ServedModel.load, folder, version, self.settings)
            except ModelLoadError as e:
                self.failed[name, version] = str(e)
                log.error("%s", e)
                raise
            self.failed.pop((name, version), None)
            old, self.deployed[name] = self.deployed.get(name), Deployment.start(model, self.settings)
            self.unloaded.discard(name)
            if pin:
                self.pinned[name] = version
            else:
                self.pinned.pop(name, None)
            if announce:
                self.announce(name, {"version": version, "pinned": pin})
            if old:
                self.retire(old)
            log.info("serving %s version %s%s", name, version, f" (was {old.model.version})" if old else "")
            return self.deployed[name]

    async def unload(self, name: str, announce: bool = True):
        async with self.lock:
            model_dir(self.root, name)
            old = self.deployed.pop(name, None)
            if old is None:
                raise UnknownModel(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            if announce:
                self.announce(name, None)
            self.retire(old)

    def retire(self, deployment: Deployment):
        """Retire in the background; the task is kept until it ends, and a failure is logged."""
        task = asyncio.create_task(deployment.retire(self.settings.shutdown_grace_s),
                                   name=f"retire-{deployment.model.name}-{deployment.model.version}")
        self.retiring[deployment] = task

        def retired(task: asyncio.Task):
            del self.retiring[deployment]
            if not task.cancelled() and task.exception():
                log.error("retiring %s v%s failed", deployment.model.name, deployment.model.version,
                          exc_info=task.exception())

        task.add_done_callback(retired)

    async def close(self):
        """Server shutdown: retire everything, waiting for what is still being answered (at most
        the grace period, plus a little for the batchers to stop); never hangs on a failed retire."""
        for name in list(self.deployed):
            self.retire(self.deployed.pop(name))
        if self.retiring:
            await asyncio.wait(list(self.retiring.values()), timeout=self.settings.shutdown_grace_s + 5)

    def index(self) -> list[dict]:
        """Every version of every model on disk: READY (deployed), UNLOADING (answering its last
        requests) or UNAVAILABLE, with the reason when a load failed."""
        rows = []
        for name in model_names(self.root):
            deployed = self.deployed.get(name)
            retiring = {d.model.version for d in self.retiring if d.model.name == name}
            for version in versions(self.root / name):
                if deployed and deployed.model.version == version:
                    state, reason = "READY", ""
                elif version in retiring:
                    state, reason = "UNLOADING", "answering the requests it took before a swap or unload"
                else:
                    state, reason = "UNAVAILABLE", self.failed.get((name, version), "not loaded")
                rows.append({"name": name, "version": str(version), "state": state, "reason": reason})
        return rows

    # --- several processes, and polling ---

    def announce(self, name: str, target: dict | None):
        """Tell the other server processes: {"version": v, "pinned": bool} deployed, or None (unloaded)."""
        if self.control_file is None:
            return
        with open(self.control_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two calls on two workers at once: one after the other
            control = self.read_control()
            if control.get("seq", 0) == self.synced:  # nothing unapplied before this call: skip our own
                self.synced += 1  # else the next sync applies the others' calls too (ours is a no-op there)
            control["seq"] = control.get("seq", 0) + 1
            control.setdefault("models", {})[name] = target
            staged = self.control_file.with_suffix(f".{os.getpid()}")
            staged.write_text(json.dumps(control))
            staged.replace(self.control_file)  # atomic: readers see the old file or the new one

    def read_control(self) -> dict:
        try:
            return json.loads(self.control_file.read_text())
        except (OSError, ValueError):
            return {}

    async def sync(self):
        """Apply what another process announced since the last sync."""
        control = self.read_control()
        if control.get("seq", 0) <= self.synced:
            return
        self.synced = control["seq"]
        for name, target in control.get("models", {}).items():
            current = self.deployed.get(name)
            try:
                if target is None and current:
                    await self.unload(name, announce=False)
                elif target and (current is None or current.model.version != target["version"]):
                    await self.load(name, target["version"], pin=target["pinned"], announce=False)
            except (UnknownModel, ModelLoadError) as e:
                log.error("could not follow the control file for %s: %s", name, e)

    async def poll(self):
        """Deploy new models and new versions found on disk (failed versions are not retried)."""
        for name in model_names(self.root):
            if name in self.unloaded or name in self.pinned:
                continue
            latest = max(versions(self.root / name))
            current = self.deployed.get(name)
            if (current is None or latest > current.model.version) and (name, latest) not in self.failed:
                try:
                    await self.load(name, latest, pin=False, announce=False)
                except (UnknownModel, ModelLoadError):
                    pass  # logged, and shown by the index

    async def watch(self):
        """The background task: expire idle sessions, follow the control file and poll the
        repository, as configured."""
        settings, last_poll = self.settings, 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(settings.control_sync_s)
            try:
                for deployment in list(self.deployed.values()):
                    if deployment.sessions:
                        deployment.sessions.expire()
                if self.control_file:
                    await self.sync()
                if settings.repository_poll_s and loop.time() - last_poll >= settings.repository_poll_s:
                    last_poll = loop.time()
                    await self.poll()
            except Exception:  # a folder removed mid-scan, an unreadable file: try again next time
                log.exception("repository watch")
