"""Training a language model (python -m models.train lm): data, model, a loop that carries the
state across chunks, the held-out perplexity, save. The best epoch on the held-out tail is kept."""
import copy
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.codec import TextCodec
from core.tokenize import Tokenizer, Vocab
from models.checkpoint import save_run
from models.data import load_corpus
from models.rnn import ModelConfig, build, generate
from models.training import describe, pick_device, plot_curves, vars_of

LM_PROMPT = "time traveller"


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
