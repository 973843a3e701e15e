"""The dependency picture, as rules that fail when broken: every part imports the core and the
core imports none of them; serving never reaches into training or export code, nor PyTorch;
the ideas every part shares are written once, in the core."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("core", "models", "export", "serving", "loadtest")
FORBIDDEN = {  # part -> what it must never import
    "core": {"models", "export", "serving", "loadtest", "torch"},
    "serving": {"models", "export", "torch", "zmq"},  # front-ends and engines speak Unix sockets
    "models": {"export", "serving", "loadtest"},
    "export": {"serving", "loadtest"},
}
PROCESSES = {  # serving's folders -> the modules (top level, or serving.<folder>) each must never import
    "serving/engine": {"serving.frontend"},  # the engine process
    "serving/frontend": {"serving.engine", "onnxruntime"},  # the HTTP/gRPC front-ends: no ONNX Runtime
    "serving/common": {"serving.engine", "serving.frontend", "onnxruntime"},  # what both speak
}


def imports(path: Path, depth: int = 1) -> set[str]:
    """The first `depth` parts of the name of every module `path` imports, at the top or inside
    functions (serving.frontend.routes with depth 2: serving.frontend)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {".".join(alias.name.split(".")[:depth]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(".".join(node.module.split(".")[:depth]))
            if depth > 1 and "." not in node.module:  # from serving import frontend
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported(path: Path) -> set[str]:
    return imports(path, 1) | imports(path, 2)


def product_code():
    return sorted(p for part in PARTS for p in (ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_import_rules(part):
    broken = {str(path.relative_to(ROOT)): sorted(imports(path) & FORBIDDEN[part])
              for path in (ROOT / part).rglob("*.py") if imports(path) & FORBIDDEN[part]}
    assert broken == {}, f"{part}/ must not import {sorted(FORBIDDEN[part])}"


def broken(folder: str, forbidden: set[str], read) -> dict[str, list[str]]:
    """Each module under `folder` that imports any of `forbidden` (as `read` names its imports)."""
    return {str(path.relative_to(ROOT)): sorted(read(path) & forbidden)
            for path in (ROOT / folder).rglob("*.py") if read(path) & forbidden}


@pytest.mark.parametrize("folder", sorted(PROCESSES))
def test_each_process_imports_only_its_own_side(folder):
    """serving/ is laid out as the processes it runs: the engines (engine/), the front-ends
    (frontend/), and what both speak (common/)."""
    assert broken(folder, PROCESSES[folder], imported) == {}, f"{folder}/ must not import {sorted(PROCESSES[folder])}"


def test_the_process_rules_catch_a_front_end_that_loads_onnx_runtime(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import onnxruntime as ort\nfrom serving.engine.runner import Runner\nfrom serving import engine\n")
    assert imported(planted) & PROCESSES["serving/frontend"] == {"onnxruntime", "serving.engine"}


def test_the_rules_catch_an_import_where_it_does_not_belong(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from models.rnn import build\n    import torch.nn\n")
    assert imports(planted) & FORBIDDEN["serving"] == {"models", "torch"}


@pytest.mark.parametrize("modules,absent", [
    ("core.tokenize, core.codec, core.repository", ("torch", "models", "export", "serving", "loadtest")),
    ("serving.__main__, serving.frontend.app", ("torch", "models", "export", "onnxruntime", "zmq")),
    ("serving.engine.engine", ("torch", "models", "export", "zmq")),
    ("serving.common.messages, serving.common.settings, serving.common.metrics", ("onnxruntime",)),
])
def test_importing_a_part_loads_none_of_what_it_must_not(modules, absent):
    code = (f"import sys, {modules}; bad = sorted(m for m in sys.modules if m.split('.')[0] in {absent!r}); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def pads_rows(tree: ast.AST) -> bool:
    """Whether code right-pads rows itself: writes through a length mask (`x[arange < lengths[:, None]] = ...`)
    or row by row, each up to its own length (`x[i, : len(r)] = r`, `x[i, : b - a] = v[a:b]`)."""
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for index in [t.slice for t in targets if isinstance(t, ast.Subscript)]:
            if isinstance(index, ast.Compare) and "[:, None]" in ast.unparse(index):
                return True
            if isinstance(index, ast.Tuple) and len(index.elts) >= 2 and isinstance(index.elts[0], ast.Name):
                cut = index.elts[1]  # up to the row's own length: len(r), or an end minus a start
                if isinstance(cut, ast.Slice) and cut.lower is None and (
                        isinstance(cut.upper, ast.Call) and ast.unparse(cut.upper.func) == "len"
                        or isinstance(cut.upper, ast.BinOp) and isinstance(cut.upper.op, ast.Sub)):
                    return True
    return False


def test_the_shared_rules_are_written_once():
    """pad, softmax, right-padding itself and the encode rule (an empty text is one unknown token)
    live in core/codec.py."""
    defined, rule, padding = {}, [], []
    for path in product_code():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("pad", "softmax"):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
        if re.search(r"\bor \[(1|[\w.]*unk_id)\]", path.read_text()):
            rule.append(str(path.relative_to(ROOT)))
        if pads_rows(tree):
            padding.append(str(path.relative_to(ROOT)))
    assert defined == {"pad": ["core/codec.py"], "softmax": ["core/codec.py"]}
    assert rule == ["core/codec.py"]
    assert padding == ["core/codec.py"]


@pytest.mark.parametrize("code", [
    "ids = np.zeros((len(rows), longest), np.int64)\nfor i, r in enumerate(rows):\n    ids[i, : len(r)] = r\n",
    "out[row, : b - a] = vectors[a:b]\n",
    "padded[np.arange(padded.shape[1]) < lengths[:, None]] = ids\n",
])
def test_the_padding_rule_is_caught_whatever_its_name(code):
    assert pads_rows(ast.parse(code))


def test_the_padding_rule_leaves_reading_a_prefix_alone():
    assert not pads_rows(ast.parse("x = out[j, : lengths[j]]\nrows = ids[np.arange(t) < lengths[:, None]]\n"
                                   "state[:, :n] = 0\nuniforms[slot, : request.max_new_tokens] = draws\n"))


def asks_whether_cuda_is_usable(tree: ast.AST) -> bool:
    """Whether code decides "is CUDA usable here" itself: CUDA looked for in a providers list, or
    the build and the GPUs checked together."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if "CUDA" in ast.unparse(node.left) and "providers" in ast.unparse(node.comparators[0]):
                return True
        if isinstance(node, ast.BoolOp) and {"cuda_built", "visible_gpus"} <= {
                n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                for n in ast.walk(node) if isinstance(n, ast.Call)}:
            return True
    return False


def test_whether_cuda_is_usable_is_decided_once():
    """serving/engine/devices.py decides it (on_the_cpu_because, usable_gpus); the server, the
    engines, the tuner and the tests' fixtures ask it."""
    deciding = [str(p.relative_to(ROOT)) for p in [*product_code(), *sorted((ROOT / "tests").glob("*.py"))]
                if p.name != "test_layout.py" and asks_whether_cuda_is_usable(ast.parse(p.read_text()))]
    assert deciding == ["serving/engine/devices.py"]
    assert asks_whether_cuda_is_usable(ast.parse("gpu = devices.cuda_built() and devices.visible_gpus() > 0"))
    assert asks_whether_cuda_is_usable(ast.parse("if devices.CUDA not in settings.providers: pass"))


def test_the_image_copies_the_core_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY core/ core/" in dockerfile and "COPY models" not in dockerfile


def test_the_core_imports_in_one_direction():
    """core/: tokenize <- codec <- repository, and no module imports one that imports it back."""
    graph = {path.stem: {name.split(".")[1] for name in imports(path, 2) if name.startswith("core.")}
             for path in (ROOT / "core").glob("*.py") if path.stem != "__init__"}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)], graph


FRONTS = {  # inside the front-end: the core and the adapters over it -> what each must never import
    "serving/frontend/core": {"fastapi", "starlette", "grpc", "tritonclient", "uvicorn", "serving.frontend.routes",
                              "serving.frontend.grpc", "serving.frontend.frontdoor", "serving.frontend.responses",
                              "serving.frontend.app"},
    "serving/frontend/grpc": {"fastapi", "starlette", "serving.frontend.routes", "serving.frontend.frontdoor",
                              "serving.frontend.responses", "serving.frontend.app"},
    "serving/frontend/routes": {"grpc", "tritonclient", "serving.frontend.grpc"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, in full and by each of its parents (a.b.c: a, a.b, a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module, *(f"{node.module}.{a.name}" for a in node.names)] \
            if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for module in modules:
            parts = module.split(".")
            names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return names


@pytest.mark.parametrize("folder", sorted(FRONTS))
def test_every_front_is_an_adapter_over_one_core(folder):
    """REST and gRPC both call the core, neither imports the other, and the core imports no web
    framework nor gRPC (Triton's HTTP and gRPC front-ends over one request path)."""
    assert broken(folder, FRONTS[folder], imported_modules) == {}, f"{folder}/ must not import {sorted(FRONTS[folder])}"


def test_the_front_rules_catch_grpc_importing_a_rest_route(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from serving.frontend.routes import lm\nfrom fastapi import HTTPException\n")
    assert imported_modules(planted) & FRONTS["serving/frontend/grpc"] == {"fastapi", "serving.frontend.routes"}
    assert imported_modules(planted) & FRONTS["serving/frontend/core"] == {"fastapi", "serving.frontend.routes"}


def constants(path: Path) -> set:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)}


def test_the_front_ends_rules_are_written_once():
    """The core's error is defined once; the 410 re-encode retry, the "no session" answers and a
    step's top_k bounds each live in one core module, and the REST schema takes the bounds from it;
    Triton's BYTES layout and the encoding of a classifier's texts (V1's instances, V2's
    text_input) are written once; so are a request's count in /metrics and where its version is noted."""
    frontend = sorted((ROOT / "serving/frontend").rglob("*.py"))
    where = lambda test: sorted(str(p.relative_to(ROOT / "serving/frontend")) for p in frontend if test(p))
    assert where(lambda p: re.search(r"^class Refused\b", p.read_text(), re.M)) == ["core/refused.py"]
    assert where(lambda p: 410 in constants(p)) == [  # the retry; a state token's version gone; its gRPC code
        "core/inference.py", "core/sessions.py", "grpc/status.py"]
    assert where(lambda p: any(isinstance(c, str) and c.startswith("no session") for c in constants(p))) == [
        "core/sessions.py"]
    assert where(lambda p: "http.disconnect" in constants(p)) == ["frontdoor.py", "responses.py"]  # the body; the watch
    assert where(lambda p: "MAX_TOP_K" in p.read_text()) == ["core/sessions.py", "schemas.py"]
    assert 100 not in constants(ROOT / "serving/frontend/grpc/sequence.py")
    assert where(lambda p: "HTTPException" in p.read_text()) == ["app.py", "routes/docs.py"]  # FastAPI's own
    assert where(lambda p: "<I" in constants(p)) == ["core/tensors.py"]  # Triton's BYTES layout, read and written
    assert where(lambda p: re.search(r"\bcodec\.encode\(", p.read_text())) == ["core/inference.py"]  # V1's and V2's texts
    # a request's count and latency: recorded once, in the envelope, under the version served() noted
    assert where(lambda p: re.search(r"metrics\.(REQUESTS|REQUEST_LATENCY)\b", p.read_text())) == ["core/envelope.py"]
    assert where(lambda p: re.search(r"\bANSWERING\.set\(|\.version = str\(", p.read_text())) == [
        "core/envelope.py", "core/front.py"]


def test_the_openai_front_is_an_adapter_over_the_same_core():
    """OpenAI's routes reach the engines only through the core's generation (started, to_the_end),
    as :generate's do, never through the engine client or its messages; OpenAI's error shape is
    written once, where every refusal becomes an HTTP answer (responses.py)."""
    adapter = sorted((ROOT / "serving/frontend").rglob("openai*.py"))
    engine_side = {"serving.frontend.client", "serving.common.messages", "serving.common.frames", "msgspec"}
    assert len(adapter) == 3 and {str(p.relative_to(ROOT)): sorted(imported_modules(p) & engine_side)
                                  for p in adapter if imported_modules(p) & engine_side} == {}
    shaped = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "serving").rglob("*.py"))
              if "invalid_request_error" in constants(p)]
    assert shaped == ["serving/frontend/responses.py"]


def test_the_wire_between_front_ends_and_engines_is_written_once():
    """A frame's layout is serving/common/frames.py's (the other "<I" is Triton's BYTES layout); only
    the engine's connections and the front-end's engine client open the Unix sockets."""
    serving = sorted((ROOT / "serving").rglob("*.py"))
    where = lambda test: sorted(str(p.relative_to(ROOT / "serving")) for p in serving if test(p))
    assert where(lambda p: "<I" in constants(p)) == ["common/frames.py", "frontend/core/tensors.py"]
    assert where(lambda p: re.search(r"socket\.AF_UNIX\b|create_unix_connection", p.read_text())) == [
        "engine/connections.py", "frontend/client.py"]
