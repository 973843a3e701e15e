"""The RNN family: one text classifier and one language model, the cell chosen by a setting.

    python -m models.rnn    # prints each arch's parameter count

Inputs are right-padded `input_ids` (B, T) int64 with 0 and `lengths` (B,) int64. A row's
output depends only on its own tokens: sequences are packed, so the forward direction
stops and the backward direction starts at each row's last real token.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# arch -> (cell, bidirectional); "elman" is the tutorial's hand-written cell, below
ARCHS = {"rnn": ("rnn", False), "gru": ("gru", False), "lstm": ("lstm", False),
         "bilstm": ("lstm", True), "bigru": ("gru", True), "elman": ("rnn", False)}
LM_ARCHS = ("rnn", "gru", "lstm")
CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved as config.json beside its weights."""
    task: str  # "classifier" | "lm"
    arch: str
    vocab_size: int
    num_labels: int = 0  # classifier only
    embed_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    encoder: dict | None = None  # a pretrained encoder's config (models/encoder.py) in place of the embedding

    def __post_init__(self):
        archs = ARCHS if self.task == "classifier" else LM_ARCHS
        if self.task not in ("classifier", "lm") or self.arch not in archs:
            raise ValueError(f"no {self.task} arch {self.arch!r}: choose from {sorted(archs)}")
        if self.arch == "elman" and self.num_layers != 1:
            raise ValueError("the elman cell has one layer")
        if self.encoder and (self.task != "classifier" or (self.embed_dim, self.vocab_size) != (
                self.encoder["hidden_size"], self.encoder["vocab_size"])):
            raise ValueError("an encoder feeds a classifier, with embed_dim and vocab_size its own")

    @property
    def directions(self) -> int:
        return 2 if ARCHS[self.arch][1] else 1

    def to_dict(self) -> dict:
        return asdict(self)


def recurrent_stack(cfg: ModelConfig) -> nn.RNNBase:
    cell, bidirectional = ARCHS[cfg.arch]
    return CELLS[cell](cfg.embed_dim, cfg.hidden_size, cfg.num_layers, batch_first=True,
                       dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, bidirectional=bidirectional)


def run_packed(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor, state=None):
    """Run `rnn` over each row's first `lengths` steps of x (B, T, E).

    Returns outputs (B, T, D*H), zero past each row's end, and the final state at each row's
    last real token. A training batch whose rows all have the full length skips packing: the
    same numbers, but packing's backward pass on the CPU costs O(T^2) (a zero-filled copy of
    the whole input per step: 1.5 s instead of 0.2 s for a GRU batch of 64 x 256).
    """
    if rnn.training and bool((lengths == x.shape[1]).all()):
        return rnn(x, state)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, final = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, final


class RNNClassifier(nn.Module):
    """Embedding (or a pretrained encoder's last hidden states) -> recurrent stack -> linear head
    on the final state (N-vs-1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder:
            from models.encoder import build_encoder
            self.encoder = build_encoder(cfg.encoder)
        else:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = recurrent_stack(cfg)
        if cfg.arch == "elman":
            # the tutorial's cell: combined = [x_t, h_{t-1}]; h_t = tanh(i2h(combined));
            # output = log_softmax(i2o(combined)) at the last token. i2h over the concatenation
            # is exactly nn.RNN's W_ih x_t + W_hh h_{t-1} + b, so self.rnn runs the loop natively.
            self.i2o = nn.Linear(cfg.embed_dim + cfg.hidden_size, cfg.num_labels)
        else:
            self.head = nn.Linear(cfg.hidden_size * cfg.directions, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoder:
            from models.encoder import encode
            return self.classify(encode(self.encoder, input_ids, lengths), lengths)  # padding masked out
        return self.classify(self.embed(input_ids), lengths)

    def classify(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rest of forward from the token vectors x (B, T, E): a frozen encoder's come from the
        feature cache (models/features.py) in training."""
        x = self.drop(x)
        out, _ = run_packed(self.rnn, x, lengths)  # (B, T, D*H), top layer
        last = lengths.to(x.device) - 1  # (B,)
        if self.cfg.arch == "elman":
            h = torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)  # (B, T+1, H): h_{-1} = 0 first
            combined = torch.cat([at(x, last), at(h, last)], dim=1)  # (B, E+H): [x_T, h_{T-1}]
            return F.log_softmax(self.i2o(combined), dim=-1)
        # final states read from the outputs (so the exported graph keeps the packed-sequence
        # pattern that becomes sequence_lens): forward at each row's last real token, backward at t=0
        final = at(out, last)  # (B, D*H)
        if self.cfg.directions == 2:
            final = torch.cat([final[:, : self.cfg.hidden_size], out[:, 0, self.cfg.hidden_size:]], dim=1)
        return self.head(self.drop(final))  # (B, num_labels)


def at(seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """seq[b, index[b]] for each row: (B, T, F) -> (B, F)."""
    return seq.gather(1, index.view(-1, 1, 1).expand(-1, 1, seq.shape[2])).squeeze(1)


class RNNLanguageModel(nn.Module):
    """Embedding -> unidirectional recurrent stack -> next-token logits; the state goes in and out.

    forward(ids, lengths, state) returns logits (B, T, V) and the state at each row's last real
    token, so running tokens one step at a time with the state carried equals one whole run.
    The state is a tuple: (h,) or, for LSTM, (h, c), each (num_layers, B, H).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = recurrent_stack(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        h = torch.zeros(self.cfg.num_layers, batch_size, self.cfg.hidden_size, device=self.head.weight.device)
        return (h, h.clone()) if self.cfg.arch == "lstm" else (h,)

    def forward(self, input_ids, lengths, state=None):
        state = self.initial_state(len(input_ids)) if state is None else state
        x = self.drop(self.embed(input_ids))  # (B, T, E)
        out, final = run_packed(self.rnn, x, lengths, state if self.cfg.arch == "lstm" else state[0])  # (B, T, H)
        return self.head(self.drop(out)), final if isinstance(final, tuple) else (final,)


def build(cfg: ModelConfig) -> nn.Module:
    return RNNClassifier(cfg) if cfg.task == "classifier" else RNNLanguageModel(cfg)


@torch.no_grad()
def generate(model: RNNLanguageModel, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
             stop_id: int | None = None) -> list[int]:
    """The reference generation: greedy at temperature 0, else sampled (optionally top-k)."""
    model.eval()
    device = model.head.weight.device
    ids = torch.tensor([prompt_ids], device=device)
    logits, state = model(ids, torch.tensor([len(prompt_ids)]))
    logits = logits[0, -1]  # (V,)
    out = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        out.append(token)
        if token == stop_id:
            break
        logits, state = model(torch.tensor([[token]], device=device), torch.tensor([1]), state)
        logits = logits[0, -1]
    return out


if __name__ == "__main__":
    for arch in ARCHS:
        model = build(ModelConfig("classifier", arch, vocab_size=25_000, num_labels=2))
        print(f"{arch:7s} {sum(p.numel() for p in model.parameters()):,} parameters")
