"""Write a training file in the official UperNet layout with random weights, to try the segmentation path end to end
without a download (no official .pth is reachable from these machines).

    python scripts/official_layout_checkpoint.py upernet_vssm_tiny /tmp/upernet_vssm_tiny.pth [--seed 0]

The key names, shapes, dtypes and order come from `../shared/vmamba/keys/segmentation/<name>.txt` (built from the
official configs with real mmsegmentation); the file is an mmengine checkpoint as mmseg's training writes it: the
weights under `state_dict` (backbone, decode_head and the auxiliary FCN head), beside `meta` (with `dataset_meta`),
`optimizer` and `param_schedulers` entries of plain types. Values: seeded, small random weights, BatchNorm
statistics in a sane range (running_var > 0), so the exported model computes finite, non-trivial maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

LISTINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "vmamba" / "keys" / "segmentation"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def listing_rows(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every tensor of a listing (`key<TAB>(shape)<TAB>dtype`, `#` comments)."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, DTYPES[dtype]))
    return rows


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.int64:  # num_batches_tracked
        return torch.tensor(160000, dtype=torch.int64)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return torch.rand(shape, generator=gen) + 0.5
    if leaf == "running_mean":
        return torch.randn(shape, generator=gen) * 0.1
    if "norm" in key or ".bn." in key:  # norm weights near 1, biases near 0
        base = 1.0 if leaf == "weight" else 0.0
        return base + torch.randn(shape, generator=gen) * 0.05
    if leaf == "A_logs":
        return torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)).expand(shape).clone()
    if leaf == "Ds":
        return torch.ones(shape)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else shape[0])
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=("upernet_vssm_tiny", "upernet_vssm_small", "upernet_vssm_base"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    state_dict = {k: random_tensor(k, s, d, gen) for k, s, d in listing_rows(LISTINGS / f"{args.name}.txt")}
    checkpoint = {
        "meta": {
            "epoch": 0,
            "iter": 160000,
            "mmengine_version": "0.10.1",
            "dataset_meta": {"classes": [f"class_{i}" for i in range(150)]},
            "seed": args.seed,
        },
        "state_dict": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5, "weight_decay": 0.05}]},
        "param_schedulers": [{"by_epoch": False, "last_step": 160000}],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    print(f"{args.out}: {len(state_dict)} tensors ({sum(t.numel() for t in state_dict.values()):,} values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
