"""The early-exit curve on disk: JSON (the whole result), CSV (one row per point) and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from byot.errors import ByotError

MFLOPS = 1e6


def write_curve(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write curve.json, curve.csv and curve.png into ``out_dir``; returns their paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "curve.json", out_dir / "curve.csv", out_dir / "curve.png"]
        paths[0].write_text(json.dumps(result, indent=1) + "\n")
        _write_csv(result, paths[1])
        _plot(result, paths[2])
    except OSError as e:
        raise ByotError(f"cannot write the early-exit curve to {out_dir}: {e.strerror or e}") from e
    return paths


def _write_csv(result: dict[str, Any], path: Path) -> None:
    numbers = [e["exit"] for e in result["exits"]]  # the stages the exits read (1, 2, 3, 4 for a ResNet)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"threshold_exit{k}" for k in numbers[:-1]), "top1", "mean_flops",
                    *(f"share_exit{k}" for k in numbers)])
        for p in result["points"]:
            w.writerow([*(f"{t:.6g}" for t in p["thresholds"]), f"{p['top1']:.4f}", f"{p['mean_flops']:.0f}",
                        *(f"{s:.4f}" for s in p["exit_shares"])])


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = sorted(result["points"], key=lambda p: p["mean_flops"])
    ax.plot([p["mean_flops"] / MFLOPS for p in points], [p["top1"] for p in points], "-", color="tab:blue",
            marker=".", label=f"early exit ({result['final']} answers the rest)")
    for e in result["exits"]:
        ax.plot(e["flops"] / MFLOPS, e["top1"], "s", color="tab:gray")
        ax.annotate(f"exit {e['exit']}", (e["flops"] / MFLOPS, e["top1"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ens = result["ensemble"]
    ax.plot(ens["flops"] / MFLOPS, ens["top1"], "D", color="tab:green", label="ensemble of all exits")
    for key, label, colour in (("fitted", "fitted on val", "tab:red"), ("given", "given thresholds", "tab:orange")):
        if key in result:
            t = result[key]["test"]
            ax.plot(t["mean_flops"] / MFLOPS, t["top1"], "*", markersize=12, color=colour, label=label)
    ax.set_xlabel("mean MFLOPs per image")
    ax.set_ylabel(f"top-1 (%), {result['split']} split")
    ax.set_title("accuracy vs compute" + (" (calibrated)" if result["calibrated"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
