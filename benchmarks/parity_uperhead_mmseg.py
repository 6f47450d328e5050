"""Our UPerHead (models/dense.py) against mmsegmentation's real UPerHead, same weights, two feature-map sizes.

    PYTHONPATH=/tmp/offsite-mm python benchmarks/parity_uperhead_mmseg.py [--stub-mmcv-ops]
        [--out benchmarks/results/parity_uperhead_mmseg.md]

mmsegmentation 1.2.2, mmengine 0.10.1 and mmcv-lite 2.1.0 (the versions ARCHITECTURE.md used for the key listings)
are imported from PYTHONPATH, installed apart from our environment (`pip install --no-deps --target DIR ...` plus
their pure-Python dependencies). mmcv-lite has no compiled ops, and `mmseg.utils` imports `mmcv.ops` at package
import: `--stub-mmcv-ops` registers a stand-in module whose every name raises when used (UPerHead uses none of
them: ConvModule is mmcv.cnn, resize is F.interpolate).

The head is built as the official upernet_vssm_tiny config builds it (in_channels [96, 192, 384, 768], channels 512,
pool_scales (1, 2, 3, 6), dropout 0.1, 150 classes, BN, align_corners False), in eval mode. Our head's weights and
BatchNorm statistics are perturbed with seeded noise, loaded strictly into both, and both run on the same random
feature maps: those of a 512x512 image (128, 64, 32, 16) and of a 193x161 image (49x41, 25x21, 13x11, 7x6, the sizes
our backbone gives). Reported: rel L2 of the 1/4-resolution logits, in float32 and float64.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURE_SIZES = {
    "512x512": ((128, 128), (64, 64), (32, 32), (16, 16)),
    "193x161": ((49, 41), (25, 21), (13, 11), (7, 6)),
}


def _stub_mmcv_ops() -> None:
    ops = types.ModuleType("mmcv.ops")

    def missing(name: str):
        def fail(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is not available in mmcv-lite (stand-in module)")

        return type(name, (), {"__init__": fail, "__call__": fail})

    def getattr_(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    ops.__getattr__ = getattr_
    sys.modules["mmcv.ops"] = ops


def build_mmseg_head(widths, channels: int, classes: int):
    from mmengine.registry import init_default_scope
    from mmseg.models.decode_heads.uper_head import UPerHead  # imports mmseg.models: registers the losses

    init_default_scope("mmseg")  # the loss the head builds is looked up in mmseg's registry
    return UPerHead(
        in_channels=list(widths),
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=channels,
        dropout_ratio=0.1,
        num_classes=classes,
        norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )


def perturbed(state: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if t.is_floating_point():
            spread = float(t.std()) if t.numel() > 1 else 0.0
            t = t + 0.1 * (spread if spread > 0 else 1.0) * torch.randn(t.shape, generator=gen)
            if key.endswith("running_var"):
                t = t.abs() + 0.05
        out[key] = t
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def end_to_end(args: argparse.Namespace, cfg) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mmseg.models.utils import resize
    from parity_backbone_official import import_official, official_kwargs, perturb

    from vmamba_export.models import build_model

    official = import_official(args.official, args.timm_stub)
    ours = build_model("upernet_vssm_tiny")
    state = perturb(ours, args.seed)
    for key, t in state.items():
        if key.endswith("running_var"):
            state[key] = t.abs() + 0.05
    ours.load_state_dict(state, strict=True)
    kw = official_kwargs(official, "vmamba_tiny_s1l8")
    kw.update(out_indices=(0, 1, 2, 3), norm_layer="ln2d")
    backbone = official.Backbone_VSSM(**kw).eval()
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")}, strict=True)
    head = build_mmseg_head(cfg.widths, cfg.head_channels, cfg.num_classes).eval()
    missing, unexpected = head.load_state_dict(
        {k[12:]: v for k, v in state.items() if k.startswith("decode_head.")}, strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)
    rows = []
    for h, w in ((512, 512), (193, 161)):
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(args.seed + h))
        with torch.no_grad():
            a = ours(x)
            b = resize(head(backbone(x)), size=(h, w), mode="bilinear", align_corners=False)
        agree = float((a.argmax(1) == b.argmax(1)).double().mean())
        err = rel_l2(a, b)
        row = {
            "input": f"{h}x{w}",
            "end_to_end": True,
            "logits_shape": list(b.shape),
            "rel_l2_float32": err,
            "argmax_agreement": agree,
            "passed": err <= 1e-5,
        }
        rows.append(row)
        print(f"end to end {h}x{w}: logits {list(b.shape)}  rel L2 {err:.2e}  argmax agreement {agree:.5f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stub-mmcv-ops", action="store_true", help="stand in for mmcv.ops (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--official",
        type=Path,
        help="also compare our whole UperNetSegmenter (upernet_vssm_tiny) with the official Backbone_VSSM of this "
        "VMamba checkout + mmseg's UPerHead + mmseg's resize, end to end (needs the imports "
        "parity_backbone_official.py needs, and --timm-stub there applies here too)",
    )
    parser.add_argument("--timm-stub", action="store_true", help="as in parity_backbone_official.py")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.stub_mmcv_ops:
        _stub_mmcv_ops()
    import mmcv
    import mmengine
    import mmseg

    from vmamba_export.models import build_model

    torch.manual_seed(args.seed)  # the initial weights the perturbation starts from
    seg = build_model("upernet_vssm_tiny")
    ours = seg.decode_head.eval()
    cfg = seg.config
    theirs = build_mmseg_head(cfg.widths, cfg.head_channels, cfg.num_classes).eval()
    state = perturbed(ours.state_dict(), args.seed)
    ours.load_state_dict(state, strict=True)
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    # mmseg's head has no parameters beyond these (its loss has none); strict by name and shape:
    assert not missing and not unexpected, (missing, unexpected)
    rows = []
    for label, sizes in FEATURE_SIZES.items():
        gen = torch.Generator().manual_seed(args.seed + len(rows))
        feats = [torch.randn(1, c, h, w, generator=gen) for c, (h, w) in zip(cfg.widths, sizes)]
        row = {"input": label, "logits_shape": None}
        for dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                a = ours.to(dtype)([f.to(dtype) for f in feats])
                b = theirs.to(dtype)([f.to(dtype) for f in feats])
            assert a.shape == b.shape, (a.shape, b.shape)
            row["logits_shape"] = list(b.shape)
            row[f"rel_l2_{str(dtype).removeprefix('torch.')}"] = rel_l2(a, b)
        row["passed"] = row["rel_l2_float32"] <= 1e-5 and row["rel_l2_float64"] <= 1e-12
        rows.append(row)
        print(
            f"{label}: logits {row['logits_shape']}  rel L2 float32 {row['rel_l2_float32']:.2e}  float64 "
            f"{row['rel_l2_float64']:.2e}  {'pass' if row['passed'] else 'FAIL'}",
            flush=True,
        )
    if args.official is not None:
        rows += end_to_end(args, cfg)
    versions = f"mmsegmentation {mmseg.__version__}, mmengine {mmengine.__version__}, mmcv-lite {mmcv.__version__}"
    lines = [
        f"Our UPerHead against mmseg's UPerHead ({versions}{', mmcv.ops stubbed' if args.stub_mmcv_ops else ''}), "
        f"upernet_vssm_tiny's head (widths {list(cfg.widths)}, 512 channels, 150 classes), perturbed weights and "
        f"BatchNorm statistics (seed {args.seed}), eval mode, random feature maps of the input sizes below; rel L2 of "
        "the 1/4-resolution logits.",
        "",
        "| image size | logits shape | rel L2 float32 | rel L2 float64 | pass |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        if r.get("end_to_end"):
            continue
        lines.append(
            f"| {r['input']} | {r['logits_shape']} | {r['rel_l2_float32']:.2e} | {r['rel_l2_float64']:.2e} | "
            f"{'yes' if r['passed'] else 'NO'} |"
        )
    e2e = [r for r in rows if r.get("end_to_end")]
    if e2e:
        lines += [
            "",
            "End to end: our UperNetSegmenter (upernet_vssm_tiny, every weight and BatchNorm statistic perturbed) "
            f"against the official Backbone_VSSM ({args.official.name} checkout, norm_layer ln2d, the "
            "vmamba_tiny_s1l8 builder's arguments as the official tiny segmentation config) + mmseg's UPerHead + "
            "mmseg's resize to the input size (bilinear, align_corners False), CPU float32, random image.",
            "",
            "| image size | logits shape | rel L2 | argmax agreement | pass |",
            "|---|---|---:|---:|---|",
        ]
        for r in e2e:
            lines.append(
                f"| {r['input']} | {r['logits_shape']} | {r['rel_l2_float32']:.2e} | {r['argmax_agreement']:.5f} | "
                f"{'yes' if r['passed'] else 'NO'} |"
            )
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), rows)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
