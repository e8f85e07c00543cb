"""Train the bundled tiny Qwen2 model on the Python standard library's own source.

The committed weights in edgepipe/arch/data/tiny-trained/ came from (run in the repository
root with the `test` extra installed; Python 3.11.7's standard library; one torch thread):

    PYTHONPATH=. python scripts/train_tiny.py --out edgepipe/arch/data/tiny-trained --seed 0 \
        --steps 450 --batch 8 --seq-len 256

Data: every `*.py` under the interpreter's standard library folder (`--stdlib`, default the
running Python's), except site-packages, the test suites (test/, tests/, idle_test/), lib2to3,
turtledemo and config-*: 639 files for Python 3.11.7. A file is held out for evaluation when
the sha256 of its relative path is 0 mod 20, so the split does not depend on the file system's
listing order. Files are tokenized with the real Qwen tokenizer (edgepipe.tokenizer, family
qwen2) and joined with `<|endoftext|>`.

Reduced vocabulary, exact expansion: a 151936-row softmax is too slow to train on one CPU
thread, so the model's tied embedding has one row per id the training files use (plus the
special tokens) and one last, shared row. Every unused id of the full model is a copy of the
shared row, so the full softmax gives all of them the same logit; adding log(#unused) to the
shared row's logit makes the reduced softmax equal the full one exactly (the shared row's
probability is the sum over the unused ids). `edgepipe.arch.bundled.expand_bundled` builds the
full model from the compact file.

`--measure N` runs N steps, prints the throughput and exits (size `--steps` with it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from edgepipe.arch.presets import PresetSpec, preset_config
from edgepipe.arch.qwen2 import QWEN2
from edgepipe.arch.spec import ArchShape
from edgepipe.arch.tokenizer import build_qwen_tokenizer

VOCAB = 151936
ENDOFTEXT = 151643
SPECIALS = (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
HELD_OUT_MODULUS = 20


def corpus_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Split the standard library's `*.py` files into train and held-out lists.

    Args:
        root: the stdlib folder, e.g. `.../lib/python3.11`.

    Returns:
        (train files, held-out files), each sorted by relative path.
    """
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        # Test suites are mostly asserts on odd inputs and config-* is build output; lib2to3's
        # fixers and turtledemo add little; encodings' cp*.py tables are kept (they are code).
        if set(rel.parts[:-1]) & SKIP_PARTS or rel.parts[0].startswith("config-"):
            continue
        digest = hashlib.sha256(rel.as_posix().encode()).digest()
        (held if int.from_bytes(digest[:4], "little") % HELD_OUT_MODULUS == 0 else train).append(
            path
        )
    return train, held


def tokenize(files: list[Path]) -> np.ndarray:
    """Real Qwen ids of `files`, each file followed by `<|endoftext|>` (int32)."""
    tok = build_qwen_tokenizer("qwen2")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(ENDOFTEXT)
    return np.asarray(out, dtype=np.int32)


def reduced_vocab(train_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The used ids and the real-id -> reduced-row map (unused ids map to the shared last row).

    Args:
        train_ids: the training token stream (real ids).

    Returns:
        (ids: sorted int32 real ids of rows 0..U-1, lookup: int64 [VOCAB] real id -> row).
    """
    ids = np.union1d(np.unique(train_ids), np.asarray(SPECIALS)).astype(np.int32)
    lookup = np.full(VOCAB, len(ids), dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return ids, lookup


def full_config(hidden: int, layers: int, intermediate: int) -> dict:
    """config.json of the FULL (151936-id) model, with the keys edgepipe's presets write."""
    # head_dim 64 as in Qwen2.5-0.5B; 2 kv heads keep the grouped-query layout of every Qwen.
    shape = ArchShape(
        hidden, layers, hidden // 64, 2, 64, intermediate, max_position_embeddings=4096
    )
    config = preset_config(PresetSpec(QWEN2, shape), dtype="bfloat16")
    # A base model trained with <|endoftext|> between files: that id ends a text (as in
    # Qwen2.5 base configs), not <|im_end|>.
    config["eos_token_id"] = ENDOFTEXT
    return config


def build_model(config: dict, rows: int, seed: int) -> Qwen2ForCausalLM:
    """A seeded Qwen2ForCausalLM whose tied embedding has `rows` rows."""
    torch.manual_seed(seed)
    # Special-token ids are real ids, outside the reduced rows; the reduced model needs none.
    reduced = {**config, "vocab_size": rows, "dtype": "float32", "bos_token_id": None}
    cfg = Qwen2Config(**{**reduced, "eos_token_id": None})
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model


def shared_bias(rows: int) -> torch.Tensor:
    """Logit bias of the reduced softmax: log(#unused ids) on the shared row, 0 elsewhere."""
    bias = torch.zeros(rows)
    bias[-1] = math.log(VOCAB - (rows - 1))
    return bias


def reduced_logits(model: Qwen2ForCausalLM, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits over the reduced rows whose softmax equals the full model's (see module doc)."""
    hidden = model.model(input_ids=x).last_hidden_state
    return F.linear(hidden, model.get_input_embeddings().weight, bias)


def real_id_nll(logits: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-token -log p(real id): an unused id gets the shared row's probability / #unused."""
    nll = F.cross_entropy(logits.flatten(0, 1), rows.flatten(), reduction="none")
    return nll + (rows.flatten() == len(bias) - 1) * bias[-1]


@torch.no_grad()
def evaluate(model, stream: np.ndarray, bias, seq_len: int, max_windows: int) -> float:
    """Mean nats per real token over up to `max_windows` consecutive windows of `stream`."""
    model.eval()
    total, count = 0.0, 0
    n = min(max_windows, (len(stream) - 1) // seq_len)
    for start in range(0, n * seq_len, 8 * seq_len):
        stop = min(start + 8 * seq_len, n * seq_len)
        chunk = torch.from_numpy(stream[start : stop + 1].astype(np.int64))
        x = chunk[:-1].view(-1, seq_len)
        y = chunk[1:].view(-1, seq_len)
        nll = real_id_nll(reduced_logits(model, x, bias), y, bias)
        total, count = total + nll.sum().item(), count + nll.numel()
    model.train()
    return total / count


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; norms and biases are not decayed (decaying a gain toward 0 only hurts)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warmup then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_rows: np.ndarray, bias, args) -> list[tuple[int, float]]:
    """Run `args.steps` AdamW steps on random windows; returns (step, loss) every 25 steps."""
    rng = np.random.default_rng(args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    log, t0, recent = [], time.time(), []
    for step in range(args.steps):
        starts = rng.integers(0, len(train_rows) - args.seq_len - 1, size=args.batch)
        batch = np.stack([train_rows[s : s + args.seq_len + 1] for s in starts])
        batch = torch.from_numpy(batch.astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = reduced_logits(model, batch[:, :-1], bias)
        # The loss is taken in fp32: a bf16 log-softmax over ~30k rows loses precision.
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            rate = (step + 1) * args.batch * args.seq_len / (time.time() - t0)
            log.append((step + 1, float(np.mean(recent))))
            print(f"step {step + 1} loss {np.mean(recent):.4f} {rate:.0f} tok/s", flush=True)
            recent = []
    return log


def save_compact(model, ids: np.ndarray, config: dict, out: Path) -> None:
    """Write model.safetensors (bf16 weights + int32 `ids`) and the full config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: p.detach().to(torch.bfloat16).contiguous()
        for name, p in model.state_dict().items()
        if name != "lm_head.weight"  # tied: the embedding is the head, as save_pretrained does
    }
    tensors["ids"] = torch.from_numpy(ids.astype(np.int32))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    p.add_argument("--stdlib", type=Path, default=stdlib)
    p.add_argument("--out", type=Path, default=Path("edgepipe/arch/data/tiny-trained"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the matmuls (faster with AVX512-BF16)",
    )
    p.add_argument("--eval-windows", type=int, default=400)
    p.add_argument("--measure", type=int, default=0, help="time N steps and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Tokenize, train, evaluate and write the compact folder plus a metrics JSON."""
    args = parse_args(argv)
    # The machine is shared; one thread also makes the run reproducible bit for bit.
    torch.set_num_threads(1)
    t_start = time.time()
    train_files, held_files = corpus_files(args.stdlib)
    train_ids, held_ids = tokenize(train_files), tokenize(held_files)
    ids, lookup = reduced_vocab(train_ids)
    rows = len(ids) + 1
    print(
        f"{len(train_files)} train files, {len(train_ids)} tokens; {len(held_files)} held-out "
        f"files, {len(held_ids)} tokens; {rows} rows",
        flush=True,
    )
    config = full_config(args.hidden, args.layers, args.intermediate)
    model = build_model(config, rows, args.seed)
    bias = shared_bias(rows)
    train_rows, held_rows = lookup[train_ids], lookup[held_ids]
    if args.measure:
        args.steps = args.measure
        t0 = time.time()
        train(model, train_rows, bias, args)
        print(f"{args.measure * args.batch * args.seq_len / (time.time() - t0):.0f} tok/s")
        return
    t_train = time.time()
    log = train(model, train_rows, bias, args)
    train_seconds = time.time() - t_train
    metrics = {
        "train_files": len(train_files),
        "held_out_files": len(held_files),
        "train_tokens_corpus": int(len(train_ids)),
        "held_out_tokens_corpus": int(len(held_ids)),
        "rows": rows,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "train_loss_last": log[-1][1],
        "train_loss_eval": evaluate(model, train_rows, bias, args.seq_len, args.eval_windows),
        "held_out_loss": evaluate(model, held_rows, bias, args.seq_len, args.eval_windows),
        "args": {k: str(v) for k, v in vars(args).items()},
        "log": log,
    }
    metrics["held_out_ppl"] = math.exp(metrics["held_out_loss"])
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    save_compact(model, ids, config, args.out)
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
