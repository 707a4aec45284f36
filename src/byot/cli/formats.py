"""The text tables the commands print: per-exit accuracy, bench results."""

from __future__ import annotations


def format_table(exits: list[dict], ensemble: dict, costs: list[dict] | None) -> str:
    """Per-exit accuracy table; with ``costs`` a column of each exit's share of the full compute."""
    head = f"{'exit':<9}{'top-1':>8}{'top-5':>8}" + (f"{'compute':>10}{'MFLOPs':>10}" if costs else "")
    rows = [head]
    for e in exits:
        row = f"{e['exit']:<9}{e['top1']:>8.2f}{e['top5']:>8.2f}"
        if costs:
            row += f"{e['compute_share'] * 100:>9.0f}%{e['flops'] / 1e6:>10.1f}"
        rows.append(row)
    rows.append(f"{'ensemble':<9}{ensemble['top1']:>8.2f}{ensemble['top5']:>8.2f}")
    return "\n".join(rows)



def format_bench(r: dict) -> str:
    full = r["exits"][-1]["flops"]
    lines = [(f"{r['arch']} (width {r['width']}) on {r['device']}, batch {r['batch_size']}, {r['image_size']} px, "
              f"amp {r['amp']}, channels_last {r['channels_last']}, compile {r['compile']}"),
             f"training: {r['train_images_per_s']:.1f} images/s, peak memory {r['peak_memory_mb']:.0f} MB",
             *([(f"training with --augment {r['augment']} --cutout {r['cutout']}: "
                 f"{r['train_augmented_images_per_s']:.1f} images/s ({r['augment_cost'] * 100:+.1f}% time per step; "
                 "medians of rounds alternating with plain crop/flip)")] if "augment" in r else []),
             f"{'exit':<6}{'infer img/s':>13}{'MFLOPs':>10}{'compute':>9}"]
    for e in r["exits"]:
        lines.append(f"{e['exit']:<6}{e['infer_images_per_s']:>13.1f}{e['flops'] / 1e6:>10.1f}"
                     f"{e['flops'] / full * 100:>8.0f}%")
    if "library_check" in r:
        c = r["library_check"]
        lines.append(f"plain backbone, inference: the library's forward {c['library_images_per_s']:.1f} images/s, "
                     f"byot's staged forward {c['staged_images_per_s']:.1f} ({c['staged_over_library']:.3f}x)")
    return "\n".join(lines)



def format_variants(rows: list[dict]) -> str:
    base = rows[0]["train_images_per_s"]
    r0 = rows[0]
    lines = [f"{r0['arch']} (width {r0['width']}) on {r0['device']}, batch {r0['batch_size']}, {r0['image_size']} px",
             f"{'variant':<18}{'amp':>6}{'train img/s':>13}{'x fp32':>8}{'peak MB':>9}{'infer img/s (deepest)':>22}"]
    for r in rows:
        lines.append(f"{r['variant']:<18}{r['amp']:>6}{r['train_images_per_s']:>13.1f}"
                     f"{r['train_images_per_s'] / base:>8.2f}{r['peak_memory_mb']:>9.0f}"
                     f"{r['exits'][-1]['infer_images_per_s']:>22.1f}")
    return "\n".join(lines)
