"""Model control (Triton's repository extension): every engine follows every call."""
import asyncio

from core.repository import MODEL_NAME, VERSION
from serving.common.messages import Control, Failed
from serving.frontend.core.front import Front, engines
from serving.frontend.core.refused import Refused, refusal

LOAD_TIMEOUT_S = 600.0  # a version's load and warm-up


async def every_engine(front: Front, verb: str, name: str = "", version: int | None = None) -> list:
    """The verb on every engine; the first refusal, if any, is the answer."""
    client = engines(front, every=True)
    replies = await asyncio.gather(*(client.request(link, Control(client.next_id(), verb, name, version), LOAD_TIMEOUT_S)
                                     for link in client.links))
    if failed := next((r for r in replies if isinstance(r, Failed)), None):
        raise refusal(failed)
    return [r.body for r in replies]


async def index(front: Front, ready_only: bool = False) -> list[dict]:
    """Every model version in the repository and its state; with several engines, a version is
    READY only where every engine serves it."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in await every_engine(front, "index"):
        for row in rows:
            seen = merged.setdefault((row["name"], row["version"]), row)
            if seen["state"] != row["state"]:
                seen.update(state="UNLOADING", reason="engines differ: a load or unload is under way")
    return [r for r in merged.values() if r["state"] == "READY" or not ready_only]


def in_repository(name: str):
    if not MODEL_NAME.fullmatch(name):
        raise Refused(404, f"no model {name!r} in the repository")


async def load(front: Front, name: str, version=None) -> dict:
    """Load `version` (pinned) or the latest on every engine."""
    if version is not None and not VERSION.fullmatch(str(version)):  # the repository's rule: 1, 2, ... (no "01")
        raise Refused(400, f"parameters.version must be a version folder's name (1, 2, ...), not {version!r}")
    in_repository(name)
    return (await every_engine(front, "load", name, version and int(version)))[0]


async def unload(front: Front, name: str) -> dict:
    in_repository(name)
    return (await every_engine(front, "unload", name))[0]
