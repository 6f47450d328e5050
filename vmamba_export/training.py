"""Train the bundled digits models (vmamba_digits_v2, vmamba_digits_v0) on CPU, seeded, and save them with their
held-out accuracy.

Data: `digits:train` through the same `preprocess` as export and validation; accuracy on `digits:holdout`, which is
never trained on nor calibrated with (vmamba_export/data/sources.py). The shipped weights are measured with the
model's own scan (the `vmamba::selective_scan_2d` op), not the training scan, so the recorded number is what an
exported model is compared against.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.sources import digits_split, load_batch
from .models import VMamba, build_model, count_parameters, get_config
from .scan.directions import cross_merge, cross_scan, directional

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED_MODELS = ("vmamba_digits_v2", "vmamba_digits_v0")


def selective_scan_train(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """The op's contract, differentiable, fast to train on CPU: one step per position, each step building only its
    own (B, K, Di, N) decay and input. The log-depth prefix form (`selective_scan_prefix`) materialises
    (B, K, Di, N, L) tensors log2(L) times and spent most of a d_state-16 training step copying them (about 5x
    slower); the sequential fallback writes in place, which autograd cannot differentiate."""
    bsz, di, h, w = u.shape
    k, n = delta.shape[1], A_logs.shape[1]
    us = cross_scan(u)  # (B, K, Di, L)
    dts = F.softplus(directional(delta) + delta_bias.reshape(1, k, di, 1))
    a = -torch.exp(A_logs).reshape(k, di, n)
    # Position-major, contiguous: every step then reads one dense slab.
    dtu = (dts * us).movedim(3, 0).unsqueeze(-1).contiguous()  # (L, B, K, Di, 1)
    dtl = dts.movedim(3, 0).unsqueeze(-1).contiguous()  # (L, B, K, Di, 1)
    bs = directional(B).movedim(3, 0).unsqueeze(3).contiguous()  # (L, B, K, 1, N)
    cs = directional(C).movedim(3, 0).unsqueeze(-1).contiguous()  # (L, B, K, N, 1)
    state: torch.Tensor | None = None
    ys = []
    for pos in range(h * w):
        drive = dtu[pos] * bs[pos]
        state = drive if state is None else torch.addcmul(drive, torch.exp(dtl[pos] * a), state)
        ys.append(torch.matmul(state, cs[pos]))  # (B, K, Di, 1)
    y = torch.cat(ys, dim=-1) + D.reshape(1, k, di, 1) * us
    return cross_merge(y, h, w)


@dataclass
class TrainSettings:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    max_shift: int = 2  # pixels of random translation (the 32x32 digit is 4x an 8x8 one: half a source pixel)
    label_smoothing: float = 0.05
    seed: int = 0
    # One intra-op thread: on the shared 2-core machine two threads ran 2-4x slower per step (they spin-wait on each
    # other when another process holds a core), and one thread makes the weights independent of the core count.
    threads: int = 1


@dataclass
class TrainResult:
    name: str
    heldout_top1: float
    train_seconds: float
    eval_seconds: float
    epochs: int
    seed: int
    parameters: int
    split_sizes: dict[str, int]
    torch_version: str
    threads: int
    settings: dict = field(default_factory=dict)
    epoch_log: list[dict] = field(default_factory=list)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with the background value."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def evaluate(model: VMamba, images: np.ndarray | torch.Tensor, labels: list[int], batch_size: int = 128) -> float:
    """Top-1 accuracy of `model` as it is (its current scan), in eval mode."""
    model.eval()
    x = torch.as_tensor(images)
    correct = 0
    for start in range(0, len(x), batch_size):
        pred = model(x[start : start + batch_size]).argmax(dim=1)
        correct += int((pred == torch.as_tensor(labels[start : start + batch_size])).sum())
    return correct / len(x)


def fit(
    model: torch.nn.Module,
    n_train: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    gen: torch.Generator,
    on_epoch: Callable[[dict], None] = lambda entry: None,
) -> tuple[list[dict], float]:
    """Train `model` in place: AdamW (norms, biases and the SSM's own parameters not decayed, as in VMamba), linear
    warm-up then cosine decay per step, a fresh order from `gen` each epoch; `batch_loss(indices)` computes the loss of
    one batch (augmenting with the same `gen`: one stream, so the same run gives the same weights). Returns the
    per-epoch log and the seconds spent."""
    steps_per_epoch = math.ceil(n_train / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, int(warmup_epochs * steps_per_epoch))
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or pname.endswith(("A_logs", "Ds", "dt_projs_bias")) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))),
    )
    epoch_log = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        entry = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / seen, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        epoch_log.append(entry)
        on_epoch(entry)
    return epoch_log, time.perf_counter() - start


def train_digits(name: str, settings: TrainSettings | None = None, log=print) -> tuple[VMamba, TrainResult]:
    """Train config `name` from scratch on digits:train; return the model (custom-op scan, eval mode) and its
    held-out top-1."""
    s = settings or TrainSettings()
    torch.set_num_threads(s.threads)
    cfg = get_config(name)
    x_train, y_train, _ = load_batch("digits:train", cfg.input)
    x_hold, y_hold, _ = load_batch("digits:holdout", cfg.input)
    assert y_train is not None and y_hold is not None
    x_train_t, y_train_t = torch.from_numpy(x_train), torch.tensor(y_train)
    # Background (0 ink) after normalisation: where shifted-in pixels come from.
    fill = float((0.0 - cfg.input.mean[0]) / cfg.input.std[0])

    torch.manual_seed(s.seed)
    model = build_model(name)
    scan = model.layers[0].blocks[0].op.scan_fn
    model.set_scan(selective_scan_train).train()
    gen = torch.Generator().manual_seed(s.seed)  # one stream for order and augmentation: same run, same weights

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = _shift(x_train_t[idx], s.max_shift, gen, fill)
        return F.cross_entropy(model(xb), y_train_t[idx], label_smoothing=s.label_smoothing)

    epoch_log, train_seconds = fit(
        model,
        len(x_train_t),
        batch_loss,
        s.epochs,
        s.batch_size,
        s.lr,
        s.weight_decay,
        s.warmup_epochs,
        gen,
        lambda e: log(f"{name}: epoch {e['epoch']}/{s.epochs} loss {e['loss']:.4f} ({e['seconds']:.0f} s)"),
    )

    # Measure with the model's own scan: the number must hold for what is shipped and exported.
    model.set_scan(scan).eval()
    t0 = time.perf_counter()
    acc = evaluate(model, x_hold, y_hold)
    eval_seconds = time.perf_counter() - t0
    log(f"{name}: held-out top-1 {acc:.4f} on {len(y_hold)} images; trained in {train_seconds:.0f} s")
    result = TrainResult(
        name=name,
        heldout_top1=acc,
        train_seconds=round(train_seconds, 1),
        eval_seconds=round(eval_seconds, 1),
        epochs=s.epochs,
        seed=s.seed,
        parameters=count_parameters(model),
        split_sizes={k: len(v) for k, v in digits_split().items()},
        torch_version=torch.__version__,
        threads=s.threads,
        settings=asdict(s),
        epoch_log=epoch_log,
    )
    return model, result


def save_bundled(model: VMamba, result: TrainResult, out_dir: Path = WEIGHTS_DIR) -> Path:
    """Write <name>.safetensors (metadata: the result's scalars) and <name>.json (everything, config included)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    info = asdict(result)
    info["config"] = model.config.to_dict()
    info["train_data"] = "digits:train"
    info["heldout_data"] = "digits:holdout"
    metadata = {
        "format": "vmamba-export/bundled-v1",
        "config_name": result.name,
        "heldout_top1": f"{result.heldout_top1:.6f}",
        "train_seconds": str(result.train_seconds),
        "seed": str(result.seed),
        "epochs": str(result.epochs),
        "split_sizes": json.dumps(result.split_sizes, sort_keys=True),
        "torch_version": result.torch_version,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{result.name}.safetensors"
    save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)  # safetensors writes 0600; installed package data must be readable by every user
    (out_dir / f"{result.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return path
