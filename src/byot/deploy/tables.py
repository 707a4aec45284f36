"""Text tables of the deployment commands' results (the CLI prints them; ``--json`` prints the dicts)."""

from __future__ import annotations

from typing import Any

MFLOPS = 1e6


def format_calibration(r: dict[str, Any]) -> str:
    lines = [(f"temperatures fitted on {r['num_val_images']} validation images{_weights(r)}, stored in "
              f"{r['policy_file']}"),
             (f"{'exit':<6}{'T':>7}  {'split':<5}{'NLL before':>12}{'NLL after':>11}{'ECE% before':>13}"
             f"{'ECE% after':>12}")]
    for split in ("val", "test"):
        for row in r[split]:
            lines.append(f"{row['exit']:<6}{row['temperature']:>7.3f}  {split:<5}{row['nll_before']:>12.4f}"
                         f"{row['nll_after']:>11.4f}{row['ece_before']:>13.2f}{row['ece_after']:>12.2f}")
    return "\n".join(lines)


def _weights(r: dict[str, Any]) -> str:
    """The words that say a result is of the weight average (``--ema``); none for the raw weights."""
    return ", weight average (EMA)" if r.get("weights") == "ema" else ""


def _policy_line(label: str, p: dict[str, Any], numbers: list[int]) -> str:
    t = p["test"]
    shares = " / ".join(f"{s * 100:.0f}%" for s in t["exit_shares"])
    shares += f" (exits {', '.join(map(str, numbers))})"
    thresholds = ", ".join("never" if x > 1 else f"{x:.4f}" for x in p["thresholds"])
    return (f"{label}: thresholds {thresholds}; test top-1 {t['top1']:.2f}, {t['mean_flops'] / MFLOPS:.1f} MFLOPs "
            f"per image ({t['speedup']:.2f}x fewer than the full network), answered by exits {shares}")


def format_early_exit(r: dict[str, Any]) -> str:
    confidences = "calibrated" if r["calibrated"] else "uncalibrated"
    lines = [(f"{r['split']} split, {r['num_images']} images{_weights(r)}; {confidences} "
             f"confidences; the {r['final']} exit answers what no shallow exit takes"),
             f"{'':<10}{'top-1':>8}{'MFLOPs':>10}"]
    for e in r["exits"]:
        lines.append(f"{'exit ' + str(e['exit']):<10}{e['top1']:>8.2f}{e['flops'] / MFLOPS:>10.1f}")
    lines.append(f"{'ensemble':<10}{r['ensemble']['top1']:>8.2f}{r['ensemble']['flops'] / MFLOPS:>10.1f}")
    lines.append(f"curve ({len(r['points'])} shared thresholds):")
    lines.append(f"  {'threshold':>10}{'top-1':>8}{'MFLOPs':>10}  shares of exits "
                 f"{', '.join(str(e['exit']) for e in r['exits'])}")
    for p in r["points"]:
        t = p["thresholds"][0]
        shares = " ".join(f"{s * 100:3.0f}%" for s in p["exit_shares"])
        lines.append(f"  {'never' if t > 1 else f'{t:.4f}':>10}{p['top1']:>8.2f}{p['mean_flops'] / MFLOPS:>10.1f}"
                     f"  {shares}")
    if "fitted" in r:
        f = r["fitted"]
        criterion = ", ".join(f"{k} {v:g}" for k, v in f["criterion"].items())
        lines.append(_policy_line(f"fitted on validation ({criterion}; val top-1 {f['val']['top1']:.2f})", f,
                                  [e["exit"] for e in r["exits"]]))
        lines.append(f"stored in {r['policy_file']} (byot predict uses them)")
    if "given" in r:
        lines.append(_policy_line("given", r["given"], [e["exit"] for e in r["exits"]]))
    for t in r.get("timing", []):
        lines.append(f"batch {t['batch_size']}: full network {t['full_images_per_s']:.1f} img/s, early exit "
                     f"{t['early_exit_images_per_s']:.1f} img/s ({t['wall_speedup']:.2f}x wall clock, "
                     f"{t['flops_speedup']:.2f}x in FLOPs) on {t['images']} test images")
    lines.append("wrote " + ", ".join(r["files"]))
    return "\n".join(lines)


def format_export(r: dict[str, Any]) -> str:
    check = (f"; largest |PyTorch - {r['format']}| on a check batch: {r['max_abs_diff']:.2e}"
             if "max_abs_diff" in r else "")
    m = r["metadata"]
    return (f"wrote {r['path']} ({r['format']}, {r['bytes'] / 2**20:.1f} MiB): exit(s) {', '.join(map(str, r['exits']))}"
            f" of {m['arch']}{_weights(m)}{check}\ninput: {m['input']}; outputs: {', '.join(m['outputs'])}")


def format_predictions(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["path"]) for r in rows)
    lines = [f"{'image':<{width}}  {'class':<20}{'prob':>7}{'exit':>6}"]
    for r in rows:
        lines.append(f"{r['path']:<{width}}  {r['class']:<20}{r['probability']:>7.3f}{r['exit']:>6}")
    return "\n".join(lines)
