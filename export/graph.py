"""Trace a trained model into ONNX with symbolic `batch` and `seq` (used by python -m export).

The legacy TorchScript exporter (dynamo=False) is used on purpose: it maps nn.RNN/GRU/LSTM to
native ONNX recurrent nodes with dynamic batch and length, and turns the model's
pack_padded_sequence -> RNN -> pad_packed_sequence into the nodes' `sequence_lens`, so every
arch stays exact under padding. The dynamo exporter unrolls nn.RNN to the example length and
cannot export packing.
"""
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from models.rnn import ModelConfig

STATE_NAMES = ("h", "c")  # inputs h0, c0; outputs hn, cn


class LanguageModelGraph(nn.Module):
    """The LM with its state as plain tensors: (ids, lengths, h0[, c0]) -> (logits, hn[, cn])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, lengths, *state):
        logits, final = self.model(input_ids, lengths, state)
        return (logits, *final)


def state_count(cfg: ModelConfig) -> int:
    return 2 if cfg.arch == "lstm" else 1


def state_spec(cfg: ModelConfig) -> dict:
    """The manifest's state: graph inputs and outputs, each (layers, batch, hidden_size)."""
    names = STATE_NAMES[: state_count(cfg)]
    return {"inputs": [f"{n}0" for n in names], "outputs": [f"{n}n" for n in names],
            "layers": cfg.num_layers * cfg.directions, "hidden_size": cfg.hidden_size}


def io_spec(cfg: ModelConfig) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the graph: name, dtype and shape with symbolic dims named."""
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "lengths", "dtype": "int64", "shape": ["batch"]}]
    if cfg.task == "classifier":
        return inputs, [{"name": "logits", "dtype": "float32", "shape": ["batch", cfg.num_labels]}]
    state_shape = [cfg.num_layers * cfg.directions, "batch", cfg.hidden_size]
    names = STATE_NAMES[: state_count(cfg)]
    inputs += [{"name": f"{n}0", "dtype": "float32", "shape": state_shape} for n in names]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}]
    outputs += [{"name": f"{n}n", "dtype": "float32", "shape": state_shape} for n in names]
    return inputs, outputs


def export_onnx(model: nn.Module, cfg: ModelConfig, path: Path, opset: int = 17) -> Path:
    """Write `model` (eval mode, CPU) to `path` as one self-contained ONNX file; checker-clean."""
    model = model.eval().cpu()
    inputs, outputs = io_spec(cfg)
    ids = torch.randint(2, cfg.vocab_size, (3, 7))
    lengths = torch.tensor([7, 4, 1])  # mixed lengths, so packing is traced
    example = (ids, lengths)
    graph = model
    if cfg.task == "lm":
        graph = LanguageModelGraph(model)
        example += tuple(model.initial_state(3))
    dynamic = {spec["name"]: {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
               for spec in inputs + outputs}
    with warnings.catch_warnings():  # the exporter warns about batch_first RNNs and packed sequences
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                          input_names=[s["name"] for s in inputs], output_names=[s["name"] for s in outputs],
                          dynamic_axes=dynamic)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path
