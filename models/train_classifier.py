"""Training a classifier (python -m models.train classifier): data, model, loop, evaluation, save.
The best epoch on the validation split is kept, then evaluated once on the test split."""
import copy
import math
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.codec import TextCodec, pad
from core.tokenize import Tokenizer, Vocab
from models.checkpoint import save_run
from models.data import load_classification
from models.encoder import load_pretrained
from models.features import Features, cached
from models.rnn import ModelConfig, build
from models.training import describe, pick_device, plot_curves, vars_of

DEFAULT_TOKENIZER = {"chnsenticorp": "jieba"}  # otherwise word for classifiers


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
