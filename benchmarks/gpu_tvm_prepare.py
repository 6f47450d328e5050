"""Build, here (no GPU), what benchmarks/gpu_tvm_check.sh runs on the GPU machine with TVM's runtime only.

    python benchmarks/gpu_tvm_prepare.py [--out .tvm-gpu] [--model vmamba_tiny_s1l8] [--size 224]

Writes (a git-ignored folder, carried to the GPU machine):
  <model>-cuda-tvm/      the cuda-tvm artifact (dynamic batch; CUDA kernels precompiled by nvcc into a fatbin). Its
                         weights file params.bin is deleted (120 MB could not travel): the check rebuilds it there from
                         the same seed, and the manifest's sha256 of it proves the weights identical.
  reference.npz          PyTorch fp32 logits (scan in plain torch) here for the inputs of batch 1 and 64, generated from
                         numpy seeds (their sha256 is stored to prove the GPU machine made the same inputs).
  scan_b64/              the TIR scan kernel alone at the model's stage-1 shape, CUDA schedule: scan.so + its fatbin.
  prepare.json           what was built, with versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 0
BATCHES = (1, 64)
SCAN_BATCH = 64


def make_input(batch: int, size: int) -> np.ndarray:
    """Shared with gpu_tvm_check.py: the same numpy seed gives the same images on both machines."""
    return np.random.default_rng(1000 + batch).standard_normal((batch, 3, size, size), dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".tvm-gpu")
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import tvm

    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering.tvm_relax import DEFAULT_CUDA_ARCH, compile_cuda_fatbin, make_target
    from vmamba_export.lowering.tvm_scan import scheduled_scan
    from vmamba_export.model_source import resolve_model
    from vmamba_export.scan.op import torch_scan
    from vmamba_export.targets import get_target

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(args.model, random_weights=True, seed=SEED)
    folder = out / f"{args.model}-cuda-tvm"
    manifest = export_artifact(source, get_target("cuda-tvm"), folder, max_size=args.size, overwrite=True)
    if "cuda_binary" not in manifest["entry"]:
        raise SystemExit("no nvcc here: the artifact has no precompiled fatbin, the GPU machine could not load it")
    (folder / manifest["entry"]["params"]["file"]).unlink()  # rebuilt on the GPU machine from the seed

    model = source.model.eval().set_scan(torch_scan)
    ref = {}
    with torch.no_grad():
        for b in BATCHES:
            x = make_input(b, args.size)
            ref[f"logits_b{b}"] = model(torch.from_numpy(x)).numpy()
            ref[f"input_sha256_b{b}"] = np.array(hashlib.sha256(x.tobytes()).hexdigest())
    np.savez(out / "reference.npz", **ref)

    # The scan kernel alone at stage 1 (d_inner = ssm_ratio * dims[0], H = W = size / 4, d_state).
    cfg = source.model.config
    di, hw, n = cfg.d_inner[0], args.size // 4, cfg.d_state
    scan_dir = out / f"scan_b{SCAN_BATCH}"
    shutil.rmtree(scan_dir, ignore_errors=True)
    scan_dir.mkdir()
    target, spec = make_target("cuda", {})
    lib = tvm.compile(tvm.IRModule({"main": scheduled_scan(di, hw, hw, n, "cuda")}), target=target)
    lib.export_library(str(scan_dir / "scan.so"))
    cuda_src = next(m for m in lib.mod.imports if m.kind == "cuda").inspect_source()
    fatbin = compile_cuda_fatbin(cuda_src, DEFAULT_CUDA_ARCH, scan_dir / "scan.fatbin")
    (scan_dir / "scan.cu").write_text(cuda_src)
    info = {
        "model": args.model,
        "size": args.size,
        "seed": SEED,
        "artifact": folder.name,
        "params_sha256": manifest["files"]["params.bin"]["sha256"],
        "scan": {"d_inner": di, "h": hw, "w": hw, "d_state": n, "batch": SCAN_BATCH, "fatbin": fatbin},
        "cuda_source_sha256": hashlib.sha256(cuda_src.encode()).hexdigest(),
        "tvm_target": spec,
        "torch": torch.__version__,
        "tvm": tvm.__version__,
    }
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
