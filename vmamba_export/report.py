"""report.md of an artifact: what it is, how it was checked, how fast it runs."""

from __future__ import annotations


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _parity_rows(validation: dict) -> list[str]:
    lines = [
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
    return lines


def _dense_parity_rows(validation: dict) -> list[str]:
    """One row per size and output of a backbone or segmentation artifact."""
    lines = [
        "",
        "| size | output | shape | max abs | rel L2 | cosine (min) | pixel agree | mIoU vs PyTorch | pass |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in validation.get("runs", []):
        for out in run.get("outputs", []):
            failed = [f for f in run["failures"] if f.startswith(f"{out['name']}: ")]
            shapes = ", ".join("x".join(map(str, s)) for s in out.get("shapes") or []) or "-"
            lines.append(
                f"| {run['size']} | {out['name']} | {shapes} | {_fmt(out.get('max_abs'))} | "
                f"{_fmt(out.get('rel_l2'))} | {_fmt(out.get('cosine_min'), '.6f')} | "
                f"{_fmt(out.get('pixel_agreement'), '.4f')} | {_fmt(out.get('miou_vs_torch'), '.4f')} | "
                f"{'NO: ' + '; '.join(failed) if failed else 'yes'} |"
            )
    return lines


def render_artifact_report(m: dict) -> str:
    model, target = m["model"], m["target"]
    lines = [
        f"# {model['name']} -> {target['name']} ({m['precision']})",
        "",
        f"- Created: {m.get('created', '-')} by vmamba-export {m.get('toolchain', {}).get('vmamba-export', '?')}",
        f"- Weights: {model.get('weights', {}).get('kind', '?')} "
        f"{model.get('weights', {}).get('file') or model.get('weights', {}).get('name') or ''} "
        f"(sha256 {str(model.get('weights', {}).get('sha256', '-'))[:16]})",
        f"- Runtime: {target.get('runtime')} {m.get('runtime', {}).get('version', '')} on {target.get('device')}; "
        f"scan lowering: {target.get('scan_lowering')}",
        f"- Input: {m['input'].get('name')} {m['input'].get('layout')} {m['input'].get('shape')}, "
        f"sides {m['input'].get('min_size')}..{m['input'].get('max_size')}",
    ]
    lines += outputs_section(m)
    lines += [
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---:|---|",
    ]
    for name, entry in m["files"].items():
        lines.append(f"| {name} | {entry.get('bytes', '-')} | `{entry.get('sha256', '')[:16]}...` |")
    tuning = (m.get("lowering") or {}).get("tuning")
    if tuning:  # cpu-tvm built with meta-schedule (lowering/tvm_tune.py)
        lines += [
            "",
            "## TVM tuning",
            "",
            f"{tuning['tuning_seconds']:.0f} s spent tuning ({tuning['trials']} trials, budget "
            f"{_fmt(tuning.get('budget_seconds'))} s, {tuning['measure_threads']} threads); "
            f"{tuning['tasks_covered']} of {tuning['tasks']} ops have a measured schedule "
            f"({tuning['tasks_reused']} reused from {tuning.get('database_from') or '-'}), "
            f"{tuning.get('tasks_sampled', 0)} an unmeasured sampled one; database in `{tuning['database']}`.",
        ]
    if (m.get("lowering") or {}).get("quantization"):
        from .quantize.report import quantization_section

        lines += quantization_section(m["lowering"]["quantization"])
    lines += ["", "## Parity against PyTorch fp32", ""]
    validation = m.get("validation")
    if not validation:
        lines.append("Not validated yet: run `vmamba-export validate` on this folder.")
    else:
        lines.append(
            f"Images: {validation.get('images')} ({validation.get('num_images')} images); "
            f"status: **{validation.get('status')}**"
        )
        dense = validation.get("task", "classification") != "classification"
        lines += _dense_parity_rows(validation) if dense else _parity_rows(validation)
        lines.append("")
        lines.append(f"Thresholds: {validation.get('thresholds')}")
        acc = validation.get("accuracy")
        if acc and acc.get("metric") == "miou":
            art, ref = (
                f"{_fmt(acc.get(f'{who}_miou'), '.4f')} (pixel acc {_fmt(acc.get(f'{who}_pixel_accuracy'), '.4f')})"
                for who in ("artifact", "torch")
            )
            lines.append(
                f"Labelled mIoU on {acc.get('source')} ({acc.get('num_images')} images): artifact {art}, "
                f"PyTorch {ref}; drop {_fmt(acc.get('drop_points'), '.2f')} mIoU points"
            )
        elif acc:
            lines.append(
                f"Labelled accuracy on {acc.get('source')}: artifact {_fmt(acc.get('artifact_top1'), '.4f')}, "
                f"PyTorch {_fmt(acc.get('torch_top1'), '.4f')} ({acc.get('num_images')} images)"
            )
        for failure in validation.get("accuracy_failures") or []:
            lines.append(f"Failed: {failure}")
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


def outputs_section(m: dict) -> list[str]:
    """What the artifact outputs: the classifier's logits in one line; a dense artifact's outputs as a table (name,
    symbolic shape, stride, channels), with its classes for segmentation."""
    output = m.get("output") or {}
    task = output.get("task")
    if not task:
        return [f"- Output: {output.get('name', 'logits')} {output.get('shape')}, {output.get('num_classes')} classes"]
    lines = [
        f"- Task: {task}; outputs sized {output.get('spatial_size', '-')}",
        "",
        "## Outputs",
        "",
        "| name | shape | stride | channels |",
        "|---|---|---:|---:|",
    ]
    for out in output.get("outputs", []):
        shape = ", ".join(str(d) for d in out.get("shape", []))
        lines.append(f"| {out.get('name')} | ({shape}) | {out.get('stride')} | {out.get('channels')} |")
    if task == "segmentation":
        labels = (m.get("input") or {}).get("preprocessing", {}).get("labels")
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(labels[:20])) if labels else "numbered class_0, ..."
        more = f" (and {len(labels) - 20} more)" if labels and len(labels) > 20 else ""
        lines += [
            "",
            f"{output.get('num_classes')} classes ({output.get('labels_source') or 'no label names'}): {shown}{more}. "
            "Per-pixel logits at the input size; the predictor's class map is their argmax at the image's size.",
        ]
    refs = m.get("references") or {}
    if refs.get("size"):
        lines += ["", f"References: {refs.get('num_images')} images at {refs['size']} px ({refs.get('source')})."]
    return lines


def _latency_of(row: dict) -> dict | None:
    results = row.get("latency") or []
    return results[0] if results else None


def render_build_report(summary: dict) -> str:
    """The combined report of a build: one row per artifact (a segmenter's rows give pixel agreement and mIoU)."""
    weights = summary["weights"]
    agree_name, agree_key, score_name, score_key = _build_columns(summary)
    lines = [
        f"# Build report: {summary['model']}",
        "",
        f"- Weights: {weights.get('kind')} {weights.get('file') or weights.get('name')}",
        f"- Machine: {summary['machine']}",
        f"- Built for: {summary.get('platform') or '-'}",
        f"- Parity images: {summary['images']}; labelled accuracy source: {summary.get('accuracy_source') or '-'}",
        "",
        f"| target | precision | status | rel L2 | cosine min | {agree_name} | {score_name} | median ms | p90 ms "
        "| img/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["artifacts"]:
        run = (row.get("runs") or [{}])[0]
        acc = row.get("accuracy") or {}
        lat = _latency_of(row) or {}
        status = row["status"] + (f" ({row['note']})" if row.get("note") else "")
        lines.append(
            f"| {row['target']} | {row['precision']} | {status} | {_fmt(run.get('rel_l2'))} | "
            f"{_fmt(run.get('cosine_min'), '.6f')} | {_fmt(run.get(agree_key), '.3f')} | "
            f"{_fmt(acc.get(f'artifact_{score_key}'), '.4f')} | {_fmt(lat.get('median_ms'), '.2f')} | "
            f"{_fmt(lat.get('p90_ms'), '.2f')} | {_fmt(lat.get('throughput'), '.1f')} |"
        )
    accuracies = [r["accuracy"] for r in summary["artifacts"] if r.get("accuracy")]
    torch_acc = next((a.get(f"torch_{score_key}") for a in accuracies if a.get(f"torch_{score_key}") is not None), None)
    if torch_acc is not None:
        lines += ["", f"PyTorch fp32 {score_name} on {summary['accuracy_source']}: {torch_acc:.4f}"]
    lines += ["", "![latency and accuracy](report.png)", ""]
    return "\n".join(lines)


def _build_columns(summary: dict) -> tuple[str, str, str, str]:
    """(agreement column, its run key, accuracy column, its accuracy key suffix) for the build's task."""
    if summary.get("task", "classification") == "segmentation":
        return "pixel agree", "pixel_agreement", "mIoU", "miou"
    return "top-1 agree", "top1_agreement", "top-1 acc", "top1"


def render_build_chart(summary: dict, path) -> None:
    """A horizontal bar chart of median latency per artifact, labelled with parity status and accuracy (Pillow only:
    no plotting library needed on build machines)."""
    from PIL import Image, ImageDraw

    rows = summary["artifacts"]
    _, _, score_name, score_key = _build_columns(summary)
    bar_h, gap, left, right, top = 26, 10, 330, 260, 50
    width = 1100
    height = top + len(rows) * (bar_h + gap) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), f"{summary['model']}: median latency per artifact (batch 1)", fill="black")
    latencies = [(_latency_of(r) or {}).get("median_ms") for r in rows]
    longest = max([v for v in latencies if v] or [1.0])
    span = width - left - right
    colours = {"validated": (46, 139, 87), "parity failed": (200, 60, 60), "not validated here": (150, 150, 150)}
    for i, (row, latency) in enumerate(zip(rows, latencies)):
        y = top + i * (bar_h + gap)
        draw.text((10, y + 7), f"{row['target']} {row['precision']}", fill="black")
        colour = colours.get(row["status"], (230, 140, 30))
        if latency:
            draw.rectangle([left, y, left + max(2, int(span * latency / longest)), y + bar_h], fill=colour)
        acc = (row.get("accuracy") or {}).get(f"artifact_{score_key}")
        label = f"{latency:.2f} ms" if latency else "-"
        label += f"  {row['status']}" + (f"  {score_name} {acc:.3f}" if acc is not None else "")
        draw.text((left + (int(span * latency / longest) if latency else 0) + 8, y + 7), label, fill="black")
    image.save(path)
