"""The report.md section of an int8 artifact: how it was calibrated, what is quantized, what stayed float and why."""

from __future__ import annotations


def quantization_section(q: dict) -> list[str]:
    cal = q.get("calibration", {})
    lines = [
        "",
        "## int8 quantization",
        "",
        f"- Tool: {q.get('tool')}; format {q.get('format')} ({q.get('quant_format')}, activations "
        f"{q.get('activation_type')}, weights {q.get('weight_type')}, per-channel {q.get('per_channel')})",
        f"- Calibration: {cal.get('samples')} images from `{cal.get('source')}`, method {q.get('method')}",
        f"- Scan: {q.get('scan')}",
    ]
    acc = q.get("accuracy")
    if acc:
        lines.append(
            f"- Top-1 on `{acc['source']}` ({acc['num_images']} images): fp32 {100 * acc['fp32_top1']:.2f}, "
            f"int8 {100 * acc['int8_top1']:.2f}, drop {acc['drop_points']:.2f} points"
            + (f" (budget {acc['max_drop']:g})" if acc.get("max_drop") is not None else "")
        )
        if acc.get("kept_float_for_accuracy"):
            lines.append(f"- Kept float to meet the budget: {', '.join(acc['kept_float_for_accuracy'])}")
    quantized = q.get("quantized_layers", [])
    floats = q.get("float_layers", {})
    lines += ["", f"Quantized layers ({len(quantized)}): " + (", ".join(f"`{n}`" for n in quantized) or "none")]
    if floats:
        lines += ["", f"Float layers ({len(floats)}):", "", "| layer | why |", "|---|---|"]
        lines += [f"| `{name}` | {why} |" for name, why in floats.items()]
    return lines
