"""Our VMambaBackbone against the OFFICIAL Backbone_VSSM, the nine released configs, two input sizes.

    python benchmarks/parity_backbone_official.py --official /path/to/VMamba-checkout
        [--models ...] [--sizes 224,193x161] [--seed 0] [--out benchmarks/results/parity_backbone_official.md]

The official `classification/models/vmamba.py` of the checkout is imported at run time (nothing of it is copied
here). For each config the official Backbone_VSSM is built with the arguments of the official builder function of
that name (`vmamba_tiny_s1l8()` ...), out_indices (0, 1, 2, 3) and norm_layer "ln2d" (v2) / "ln" (v0), as the
official segmentation and detection configs do. Our backbone's weights are perturbed with seeded noise (so that
norms, biases, A and D are not at their initial values), the same state dict is loaded strictly into both, and both
run on CPU in float32 (the official CPU scan, `selective_scan_torch`, casts to float32) at batch 1. Printed per
config and size: the max over the four maps of the relative L2 distance ||ours - official|| / ||official||.

The official code imports timm (DropPath, trunc_normal_), fvcore, einops and triton (csm_triton.py decorates its
kernels at import; on CPU tensors they are not used). Install them apart from our environment, e.g.
`pip install --no-deps --target /tmp/offsite timm fvcore einops triton ...` and PYTHONPATH=/tmp/offsite. Its
cross_scan_fn / cross_merge_fn enter `torch.cuda.device(x.device)` even for CPU tensors, which current torch refuses;
the script calls the official torch implementations they dispatch to on CPU (CrossScanF, CrossMergeF) directly.
If timm does not import (it needs torchvision, whose PyPI wheel is built against CUDA torch and fails to load on a
CPU-only torch), `--timm-stub` provides the two names the official file uses: DropPath (the identity at inference:
every module is in eval mode) and trunc_normal_ (weight init only; all weights are then loaded).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NINE = (
    "vanilla_vmamba_tiny",
    "vanilla_vmamba_small",
    "vanilla_vmamba_base",
    "vmamba_tiny_s2l5",
    "vmamba_small_s2l15",
    "vmamba_base_s2l15",
    "vmamba_tiny_s1l8",
    "vmamba_small_s1l20",
    "vmamba_base_s1l20",
)


def _install_timm_stub() -> None:
    # Only the two names classification/models/vmamba.py imports from timm.models.layers.
    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob: float = 0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x  # inference: drop path is the identity

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def import_official(checkout: Path, timm_stub: bool) -> types.ModuleType:
    folder = checkout / "classification" / "models"
    path = folder / "vmamba.py"
    if not path.is_file():
        raise SystemExit(f"--official {checkout}: no classification/models/vmamba.py there")
    if timm_stub:
        _install_timm_stub()
    sys.path.insert(0, str(folder))  # its `from csm_triton import ...` fallbacks
    spec = importlib.util.spec_from_file_location("official_vmamba", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The official cross_scan_fn / cross_merge_fn enter `torch.cuda.device(x.device)` even for CPU tensors, which
    # current torch refuses ("Expected a cuda device"); on CPU they then run the official torch implementations
    # CrossScanF / CrossMergeF, which are called here directly, unchanged.
    csm = sys.modules["csm_triton"]

    def cross_scan_fn(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
        return csm.CrossScanF.apply(x, in_channel_first, out_channel_first, one_by_one, scans)

    def cross_merge_fn(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
        return csm.CrossMergeF.apply(y, in_channel_first, out_channel_first, one_by_one, scans)

    module.cross_scan_fn, module.cross_merge_fn = cross_scan_fn, cross_merge_fn
    return module


def official_kwargs(official: types.ModuleType, name: str) -> dict:
    """The VSSM arguments of the official builder `name()`, captured by calling it with VSSM swapped for a recorder."""
    real = official.VSSM
    official.VSSM = lambda **kw: kw
    try:
        return getattr(official, name)()
    finally:
        official.VSSM = real


def perturb(model: torch.nn.Module, seed: int) -> dict:
    """The model's state dict with seeded noise added to every float tensor, scaled to the tensor's spread."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            spread = float(t.std()) if t.numel() > 1 else 0.0
            scale = 0.1 * (spread if spread > 0 else 1.0)
            t = t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        state[key] = t
    return state


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main() -> int:
    from vmamba_export.models import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of github.com/MzeroMiko/VMamba")
    parser.add_argument("--models", nargs="+", default=list(NINE))
    parser.add_argument("--sizes", default="224,193x161", help="comma-separated H[xW]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timm-stub", action="store_true", help="use a two-name timm stand-in (see above)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    official = import_official(args.official, args.timm_stub)
    torch.manual_seed(args.seed)
    rows = []
    for name in args.models:
        ours = build_model(name, task="backbone")
        state = perturb(ours, args.seed)
        ours.load_state_dict(state, strict=True)
        kw = official_kwargs(official, name)
        norm = "ln2d" if ours.config.version == "v2" else "ln"
        kw.update(out_indices=(0, 1, 2, 3), norm_layer=norm)
        theirs = official.Backbone_VSSM(**kw)
        theirs.load_state_dict(state, strict=True)
        ours.eval()
        theirs.eval()
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(args.seed + h * 1000 + w))
            with torch.no_grad():
                t0 = time.perf_counter()
                a = ours(x)
                t1 = time.perf_counter()
                b = theirs(x)
                t2 = time.perf_counter()
            shapes_ok = [tuple(p.shape) for p in a] == [tuple(q.shape) for q in b]
            errs = [rel_l2(p, q) for p, q in zip(a, b)] if shapes_ok else [float("inf")]
            row = {
                "model": name,
                "size": f"{h}x{w}",
                "max_rel_l2": max(errs),
                "per_map": errs,
                "shapes": [list(q.shape) for q in b],
                "ours_s": t1 - t0,
                "official_s": t2 - t1,
                "passed": shapes_ok and max(errs) <= 1e-5,
            }
            rows.append(row)
            print(
                f"{name:22s} {h}x{w:<4d} max rel L2 {row['max_rel_l2']:.2e}  per map "
                f"{' '.join(f'{e:.1e}' for e in errs)}  ours {row['ours_s']:.1f} s  official "
                f"{row['official_s']:.1f} s  {'pass' if row['passed'] else 'FAIL'}",
                flush=True,
            )
        del ours, theirs
    lines = [
        "Our VMambaBackbone against the official Backbone_VSSM (classification/models/vmamba.py of "
        f"MzeroMiko/VMamba), same perturbed weights (seed {args.seed}), CPU float32, batch 1, random input; "
        "max over the four maps of rel L2 = ||ours - official|| / ||official||; goal <= 1e-5.",
        "",
        "| model | input HxW | max rel L2 | maps 0..3 | ours s | official s | pass |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['max_rel_l2']:.2e} | {' '.join(f'{e:.1e}' for e in r['per_map'])} "
            f"| {r['ours_s']:.1f} | {r['official_s']:.1f} | {'yes' if r['passed'] else 'NO'} |"
        )
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), rows)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
