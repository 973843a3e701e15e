"""Triton's statistics extension: what every engine's batchers have counted (the "statistics"
control verb, serving/engine/statistics.py), summed per model version, for REST and gRPC alike."""
from serving.frontend.core.control import every_engine
from serving.frontend.core.front import Front, served


def summed(a, b):
    """Two engines' counts of one version added up: numbers added, last_inference the later one,
    batch_stats merged by batch size."""
    if isinstance(a, dict):
        return {k: max(a[k], b[k]) if k == "last_inference" else a[k] if k in ("name", "version", "batch_size")
                else summed(a[k], b[k]) for k in a}
    if isinstance(a, list):  # batch_stats
        sizes = {row["batch_size"]: row for row in a}
        for row in b:
            sizes[row["batch_size"]] = summed(sizes[row["batch_size"]], row) if row["batch_size"] in sizes else row
        return [sizes[size] for size in sorted(sizes)]
    return a + b


async def statistics(front: Front, name: str = "", version: str | None = None) -> dict:
    """Every model version's statistics, or those of `name` (404 if it is not served, or if
    `version` is given and is not the one serving)."""
    if name:
        served(front, name, version)
    rows: dict[tuple[str, str], dict] = {}
    for engine_rows in await every_engine(front, "statistics"):
        for row in engine_rows:
            key = row["name"], row["version"]
            rows[key] = summed(rows[key], row) if key in rows else row
    return {"model_stats": [row for (n, v), row in sorted(rows.items())
                            if not name or (n == name and version in (None, v))]}
