"""The model repository contract: what python -m export writes and serving, the load tests and
the baselines read. Nothing else decides what a model, a version or a manifest is.

    python -m core.repository model_repository    # every version: task, quality, parity, provenance
    python -m core.repository model_repository/imdb-gru/1 "A moving film."   # a text as that version encodes it

    <repository>/<name>/config.json                how the model is served (ServingConfig below; optional)
    <repository>/<name>/<version>/manifest.json    the Manifest below (format_version 1)
                                  vocab.json       the vocabulary (core/tokenize.py)
                                  model.onnx       the fp32 graph; variants beside it (model.int8.onnx, ...)
                                  tokenizer.json   a pretrained encoder's tokenizer (wordpiece only)

A model is a folder named [A-Za-z0-9][A-Za-z0-9_.-]* directly in the repository; a version is
a folder named by a positive integer without leading zeros (export stages a version in a hidden
folder and renames it into place, so a version folder is always complete). Every file a
manifest names is a plain name inside its version folder, and each graph carries its sha256.
"""
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from core.codec import TextCodec
from core.tokenize import Tokenizer, Vocab

FORMAT_VERSION = 1
MANIFEST, VOCAB, CONFIG = "manifest.json", "vocab.json", "config.json"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION = re.compile(r"[1-9][0-9]{0,8}")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # no separators: a file stays in its folder
EXACT = "exact: each row equals the row run alone (1e-5)"


class ManifestError(ValueError):
    """A version folder that does not hold what the contract says: the message names the file and field."""


class UnknownModel(LookupError):
    pass


class Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    dtype: Literal["int64", "float32"]
    shape: list[int | str] = Field(description="sizes; 'batch' and 'seq' are symbolic")


class Graph(BaseModel):
    """One ONNX file of the version: fp32 always, int8 and fp16 variants when exported."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    guarantee: str = EXACT
    parity: dict = Field(description="the export's parity report (measured on the CPU execution provider)")
    quality: dict | None = Field(None, description="held-out quality of this graph and of fp32 (int8)")

    @field_validator("file")
    @classmethod
    def plain_name(cls, file: str) -> str:
        if not FILE_NAME.fullmatch(file) or not file.endswith(".onnx"):
            raise ValueError(f"{file!r} is not a plain .onnx file name")
        return file


class State(BaseModel):
    """A language model's recurrent state: graph inputs and outputs, each (layers, batch, hidden_size)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    inputs: list[str]
    outputs: list[str]
    layers: PositiveInt
    hidden_size: PositiveInt


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int
    task: Literal["classifier", "lm"]
    arch: str
    labels: list[str] = Field(description="classifier labels in logit order; [] for a language model")
    tokenizer: dict = Field(description="core.tokenize.Tokenizer's fields: kind, lower, file")
    max_len: PositiveInt = Field(description="tokens a classifier reads (longer texts are cut); an LM's training length")
    inputs: list[Tensor]
    outputs: list[Tensor]
    state: State | None = None
    graphs: dict[str, Graph] = Field(description="variant -> graph; 'fp32' always")
    model: dict = Field(description="the training settings (models.rnn.ModelConfig), for provenance")
    metrics: dict = Field(description="the training run's metrics, for provenance")
    opset: PositiveInt
    versions: dict[str, str] = Field(description="torch, onnx and onnxruntime versions that wrote it")
    source_run: str
    exported_at: str

    @field_validator("tokenizer")
    @classmethod
    def known_tokenizer(cls, value: dict) -> dict:
        Tokenizer(**value)  # raises ValueError (unknown kind, wordpiece without its file) or TypeError
        if value.get("file") and not FILE_NAME.fullmatch(value["file"]):
            raise ValueError(f"{value['file']!r} is not a plain file name")
        return value

    @model_validator(mode="after")
    def consistent(self) -> "Manifest":
        if "fp32" not in self.graphs:
            raise ValueError("graphs: no 'fp32' graph")
        if [t.name for t in self.inputs[:2]] != ["input_ids", "lengths"]:
            raise ValueError("inputs: the first two are input_ids and lengths")
        if self.task == "classifier" and (not self.labels or self.state):
            raise ValueError("a classifier has labels and no state")
        if self.task == "lm" and self.state is None:
            raise ValueError("a language model has a state")
        return self

    @property
    def files(self) -> list[str]:
        """Every file of the version folder."""
        extra = [self.tokenizer["file"]] if self.tokenizer.get("file") else []
        return [MANIFEST, VOCAB, *(g.file for g in self.graphs.values()), *extra]


class ChatTemplate(BaseModel):
    """How a chat's messages become one prompt for a language model (OpenAI's chat completions):
    each message written as `message`, {role} and {content} replaced, then `reply`, where the
    model's answer begins; `stop`: strings that end an answer, added to the request's own."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    message: str = Field("{role}: {content}\n", description="one message; {role} and {content} are replaced")
    reply: str = Field("assistant: ", description="after the messages: where the answer begins")
    stop: list[str] = Field([], max_length=4, description="where an answer ends (e.g. the next turn's role)")

    @field_validator("message")
    @classmethod
    def has_content(cls, message: str) -> str:
        if "{content}" not in message:
            raise ValueError("a chat template's message has a {content} to replace")
        return message

    def prompt(self, messages: list[tuple[str, str]]) -> str:
        """The messages, (role, content) each, as one prompt ending where the answer begins."""
        return "".join(self.message.replace("{role}", role).replace("{content}", content)
                       for role, content in messages) + self.reply


class ServingConfig(BaseModel):
    """How one model is served, beside its versions (Triton's config.pbtxt, as JSON). Every field
    left out takes the server-wide setting of the same name (serving/common/settings.py)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: PositiveInt | None = Field(None, description="rows per ONNX Runtime call")
    max_batch_tokens: PositiveInt | None = Field(None, description="rows x padded length per call")
    max_queue_delay_ms: float | None = Field(None, ge=0, description="how long a batch waits for more rows")
    max_queue_size: PositiveInt | None = Field(None, description="waiting requests; beyond it 503")
    intra_op_threads: PositiveInt | None = Field(None, description="ONNX Runtime threads for this model")
    variant: str = Field("fp32", description="which graph of each version is served: fp32, int8 or fp16")
    providers: list[str] | None = Field(None, description="execution providers, the first available wins")
    provider_options: dict[str, dict[str, str]] = Field(
        {}, description='per provider, merged over the server\'s: {"CUDAExecutionProvider": {"use_tf32": "1"}}')
    chat_template: ChatTemplate = Field(ChatTemplate(), description="a language model's chat prompt (OpenAI's "
                                                                     "chat completions); the default's fields if absent")


def read_config(model_dir: Path) -> ServingConfig:
    """The model's config.json, or every field at the server's setting when there is none."""
    path = Path(model_dir) / CONFIG
    return validated(ServingConfig, path) if path.exists() else ServingConfig()


def validated(schema: type[BaseModel], path: Path):
    """A JSON file read into its schema; ManifestError naming the file and the first fields wrong."""
    try:
        return schema.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ManifestError(f"{path}: unreadable: {e.strerror or e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors()[:3])
        raise ManifestError(f"{path}: {problems}") from None


def versions(model_dir: Path) -> list[int]:
    """The model's versions on disk, ascending."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and VERSION.fullmatch(p.name))


def model_names(repository: Path) -> list[str]:
    """Every model in the repository: a well-named folder with at least one version."""
    return sorted(p.name for p in Path(repository).iterdir() if MODEL_NAME.fullmatch(p.name) and versions(p))


def model_dir(repository: Path, name: str) -> Path:
    """The model's folder: a direct child of the repository, named as a model is (no separator, so
    a request can name nothing else). The operator may have linked it in from elsewhere."""
    path = Path(repository) / name
    if not MODEL_NAME.fullmatch(name) or not path.is_dir():
        raise UnknownModel(f"no model {name!r} in the repository")
    return path


def read_manifest(version_dir: Path) -> Manifest:
    """The manifest; one written by an export of another format is named as such, before its fields."""
    path = Path(version_dir) / MANIFEST
    try:
        written = json.loads(path.read_bytes()).get("format_version")
    except (OSError, ValueError, AttributeError):
        written = FORMAT_VERSION  # unreadable or not JSON: validated() says which
    if written != FORMAT_VERSION:
        raise ManifestError(f"{path}: format {written} is not {FORMAT_VERSION} (written by another export): "
                            "export the run again")
    return validated(Manifest, path)


def write_manifest(version_dir: Path, manifest: Manifest):
    (Path(version_dir) / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Version:
    """A version folder read through the contract: its manifest and its text codec."""
    path: Path
    manifest: Manifest
    codec: TextCodec

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def number(self) -> int:
        return int(self.path.name)

    def graph_bytes(self, variant: str = "fp32") -> bytes:
        """The graph file, checked against its sha256 (read once: what is checked is what runs)."""
        graph = self.manifest.graphs.get(variant)
        if graph is None:
            raise ManifestError(f"{self.path / MANIFEST}: graphs: no {variant!r} graph (has {sorted(self.manifest.graphs)})")
        try:
            data = (self.path / graph.file).read_bytes()
        except OSError as e:
            raise ManifestError(f"{self.path / graph.file}: unreadable: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != graph.sha256:
            raise ManifestError(f"{self.path / graph.file}: does not match the manifest's sha256")
        return data


def read_version(version_dir: Path) -> Version:
    """Manifest, vocabulary and tokenizer of one version folder; ManifestError for anything wrong."""
    version_dir = Path(version_dir)
    if not VERSION.fullmatch(version_dir.name):
        raise ManifestError(f"{version_dir}: a version folder is named 1, 2, ...")
    manifest = read_manifest(version_dir)
    try:
        vocab = Vocab.load(version_dir / VOCAB)
        tokenizer = Tokenizer(**manifest.tokenizer, folder=str(version_dir))
    except (OSError, ValueError, KeyError) as e:
        raise ManifestError(f"{version_dir}: {VOCAB} or the tokenizer is unusable: {e}") from None
    return Version(version_dir, manifest, TextCodec(tokenizer, vocab, manifest.max_len))


def latest(repository: Path, name: str) -> Path:
    """The folder of a model's newest version."""
    found = versions(model_dir(repository, name))
    if not found:
        raise UnknownModel(f"model {name!r} has no version")
    return Path(repository) / name / str(found[-1])


def describe(version: Version) -> str:
    """One line of `python -m core.repository`: what the version is and where it came from."""
    m = version.manifest
    quality = ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items() if k.endswith(("accuracy", "perplexity")))
    parity = m.graphs["fp32"].parity.get("max_abs_diff", {})
    worst = max(parity.values(), default=float("nan"))
    shape = f"{m.model.get('num_layers')}x{m.model.get('hidden_size')}"
    return (f"{version.name}/{version.number}: {m.task} {m.arch} {shape}, {m.tokenizer['kind']} tokens, "
            f"max_len {m.max_len}; {quality}; parity {worst:.1e}; graphs {', '.join(m.graphs)}; "
            f"opset {m.opset}, torch {m.versions.get('torch')}; from {m.source_run} at {m.exported_at}")


def main(argv: list[str]):
    root = Path(argv[0] if argv else "model_repository")
    if len(argv) > 1:  # a version folder and a text: its ids, whether it was cut, and the ids read back
        codec = read_version(root).codec
        ids, cut = codec.encode(" ".join(argv[1:]))
        return print(f"{ids} (cut: {cut}) -> {codec.decode(ids)!r}")
    for name in model_names(root):
        for number in versions(root / name):
            try:
                print(describe(read_version(root / name / str(number))))
            except ManifestError as e:
                print(f"{name}/{number}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
