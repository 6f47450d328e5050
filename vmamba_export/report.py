"""report.md of an artifact: what it is, how it was checked, how fast it runs."""

from __future__ import annotations


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_artifact_report(m: dict) -> str:
    model, target = m["model"], m["target"]
    lines = [
        f"# {model['name']} -> {target['name']} ({m['precision']})",
        "",
        f"- Created: {m.get('created', '-')} by vmamba-export {m.get('toolchain', {}).get('vmamba-export', '?')}",
        f"- Weights: {model.get('weights', {}).get('kind', '?')} "
        f"{model.get('weights', {}).get('path') or model.get('weights', {}).get('name') or ''} "
        f"(sha256 {str(model.get('weights', {}).get('sha256', '-'))[:16]})",
        f"- Runtime: {target.get('runtime')} {m.get('runtime', {}).get('version', '')} on {target.get('device')}; "
        f"scan lowering: {target.get('scan_lowering')}",
        f"- Input: {m['input'].get('name')} {m['input'].get('layout')} {m['input'].get('shape')}, "
        f"sides {m['input'].get('min_size')}..{m['input'].get('max_size')}",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---:|---|",
    ]
    for name, entry in m["files"].items():
        lines.append(f"| {name} | {entry.get('bytes', '-')} | `{entry.get('sha256', '')[:16]}...` |")
    lines += ["", "## Parity against PyTorch fp32", ""]
    validation = m.get("validation")
    if not validation:
        lines.append("Not validated yet: run `vmamba-export validate` on this folder.")
    else:
        lines.append(
            f"Images: {validation.get('images')} ({validation.get('num_images')} images); "
            f"status: **{validation.get('status')}**"
        )
        lines += [
            "",
            "| size | max abs | max rel | rel L2 | cosine (min) | top-1 agree | pass |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for run in validation.get("runs", []):
            lines.append(
                f"| {run['size']} | {_fmt(run['max_abs'])} | {_fmt(run['max_rel'])} | {_fmt(run['rel_l2'])} | "
                f"{_fmt(run['cosine_min'], '.6f')} | {_fmt(run['top1_agreement'], '.3f')} | "
                f"{'yes' if run['passed'] else 'NO: ' + '; '.join(run['failures'])} |"
            )
        lines.append("")
        lines.append(f"Thresholds: {validation.get('thresholds')}")
        if validation.get("accuracy"):
            acc = validation["accuracy"]
            lines.append(
                f"Labelled accuracy on {acc.get('source')}: artifact {_fmt(acc.get('artifact_top1'), '.4f')}, "
                f"PyTorch {_fmt(acc.get('torch_top1'), '.4f')} ({acc.get('num_images')} images)"
            )
    lines += ["", "## Latency", ""]
    bench = m.get("benchmark")
    if not bench:
        lines.append("Not benchmarked yet: run `vmamba-export bench` on this folder.")
    else:
        lines += [
            f"Machine: {bench.get('machine', '-')}; warm-up {bench.get('warmup')}, runs {bench.get('runs')}",
            "",
            "| batch | threads | size | median ms | p90 ms | images/s | peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in bench.get("results", []):
            lines.append(
                f"| {r['batch']} | {r['threads']} | {r['size']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{r['throughput']:.1f} | {_fmt(r.get('peak_rss_mb'), '.0f')} |"
            )
    lines += ["", "## Toolchain", ""]
    for key, value in m.get("toolchain", {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"
