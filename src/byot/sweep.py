"""``byot sweep CONFIG.yaml``: a list of configurations x seeds, each trained in its own ``byot train``
process, resumed where a previous sweep stopped, summarised in one table (markdown + JSON) with the mean
and spread over seeds of every exit and the ensemble.

A sweep file:

    name: cifar100_ablation
    out: experiments/results/cifar100_ablation   # results.md + results.json (small: commit them)
    runs_dir: runs/sweeps/cifar100_ablation      # one run directory per row and seed (checkpoints: don't)
    seeds: [0, 1]
    base: {arch: multi_resnet18_kd, data_dir: data, width: 16, epochs: 15, val_split: 0.1}
    rows:
      - {name: plain backbone, options: {distill: false}}
      - {name: full BYOT, options: {}}

``base`` and ``options`` take the names of ``byot train``'s options (as in ``--config``); a row's options
override the base. Every row runs with the same budget unless its options change it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from byot.config import FIELD_NAMES, build_config, load_yaml
from byot.engine.run import LATEST, read_metrics, read_test_result
from byot.errors import ByotError

log = logging.getLogger("byot")

RESULT_FILES = ("results.json", "results.md")
CHILD_STOP_SECONDS = 60  # after Ctrl-C, how long a run may take to stop by itself before it is terminated


@dataclass(frozen=True)
class Row:
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    name: str
    out: Path  # where the tables go
    runs_dir: Path  # where run directories go
    seeds: tuple[int, ...]
    base: dict[str, Any]
    rows: tuple[Row, ...]
    source: str = ""  # the sweep file

    def run_root(self, row: Row, seed: int) -> Path:
        """--save-folder of one run; its run directory is this / arch."""
        return self.runs_dir / slug(row.name) / f"seed{seed}"

    def options(self, row: Row, seed: int) -> dict[str, Any]:
        return {**self.base, **row.options, "seed": seed}


@dataclass
class RunStatus:
    row: str
    seed: int
    run_dir: Path
    state: str  # "done", "failed", "planned"
    seconds: float = 0.0
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def slug(name: str) -> str:
    """A row name as a folder name: lower case, runs of other characters as one '-'."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not text:
        raise ByotError(f"row name {name!r} has no letters or digits to name its folder")
    return text


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file; ``overrides`` (e.g. {"data_dir": ...}) replace base options."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"name", "out", "runs_dir", "seeds", "base", "rows"})
    if unknown:
        raise ByotError(f"sweep {path}: unknown key(s) {', '.join(unknown)}")
    for key in ("name", "rows"):
        if key not in raw:
            raise ByotError(f"sweep {path} needs '{key}'")
    base = {str(k).replace("-", "_"): v for k, v in (raw.get("base") or {}).items()}
    base.update(overrides or {})
    rows = []
    for i, item in enumerate(raw["rows"]):
        if not isinstance(item, dict) or "name" not in item:
            raise ByotError(f"sweep {path}: row {i + 1} needs a name (and optionally options)")
        options = {str(k).replace("-", "_"): v for k, v in (item.get("options") or {}).items()}
        rows.append(Row(str(item["name"]), options))
    names = [slug(r.name) for r in rows]
    if len(set(names)) != len(names):
        raise ByotError(f"sweep {path}: row names must differ (as folder names: {', '.join(names)})")
    seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    sweep = Sweep(str(raw["name"]), Path(raw.get("out", f"experiments/results/{slug(str(raw['name']))}")),
                  Path(raw.get("runs_dir", f"runs/sweeps/{slug(str(raw['name']))}")), seeds, base, tuple(rows),
                  str(path))
    for row in sweep.rows:  # every combination must be a valid training config before anything starts
        options = sweep.options(row, seeds[0])
        bad = sorted(set(options) - set(FIELD_NAMES))
        if bad:
            raise ByotError(f"sweep {path}, row {row.name!r}: unknown option(s) {', '.join(bad)}")
        build_config({}, options)
    return sweep


def finished(run_dir: Path, epochs: int, val_split: float) -> dict[str, Any] | None:
    """The test result of a run that is complete, else None.

    With a validation split that is test_result.json (the one test evaluation of model_best); without,
    the last epoch's test-split record of metrics.jsonl.
    """
    records = read_metrics(run_dir)
    if not records or records[-1].get("epoch") != epochs:  # unfinished, or the sweep file now asks for more
        return None
    if val_split > 0:
        return read_test_result(run_dir)
    return {"epoch": epochs, "exits": records[-1]["exits"], "ensemble": records[-1]["ensemble"],
            "selected_on": "last epoch"}


def run_sweep(sweep: Sweep, dry_run: bool = False) -> list[RunStatus]:
    """Train every (row, seed) not yet finished, one ``byot train`` process at a time."""
    statuses = []
    todo = [(row, seed) for row in sweep.rows for seed in sweep.seeds]
    for i, (row, seed) in enumerate(todo, start=1):
        options = sweep.options(row, seed)
        cfg = build_config({}, options)
        root = sweep.run_root(row, seed)
        run_dir = root / cfg.arch
        done = finished(run_dir, cfg.epochs, cfg.val_split)
        if done is not None:
            log.info("[%d/%d] %s, seed %d: finished before, kept", i, len(todo), row.name, seed)
            statuses.append(RunStatus(row.name, seed, run_dir, "done", _train_seconds(run_dir), result=done))
            continue
        command = _command(cfg.arch, options, root)
        if dry_run:
            statuses.append(RunStatus(row.name, seed, run_dir, "planned", detail=" ".join(command)))
            continue
        log.info("[%d/%d] %s, seed %d: %s (log: %s)", i, len(todo), row.name, seed,
                 "resuming" if (run_dir / LATEST).exists() else "starting", root / "sweep.log")
        statuses.append(_train(row.name, seed, run_dir, command, root, cfg.epochs, cfg.val_split))
    return statuses


def _command(arch: str, options: dict[str, Any], root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "sweep_options.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in options.items() if k != "arch"}, sort_keys=False))
    return [sys.executable, "-m", "byot", "train", arch, "--config", str(config), "--save-folder", str(root),
            "--resume", "auto", "--no-progress"]


def _train(row: str, seed: int, run_dir: Path, command: list[str], root: Path, epochs: int,
           val_split: float) -> RunStatus:
    start = time.perf_counter()
    with open(root / "sweep.log", "a") as logfile:
        logfile.write(f"\n$ {' '.join(command)}\n")
        logfile.flush()
        proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # the terminal's Ctrl-C reached the child too: let it finish its checkpoint write and stop
            try:
                proc.wait(timeout=CHILD_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise
    seconds = time.perf_counter() - start
    result = finished(run_dir, epochs, val_split)
    if code != 0 or result is None:
        tail = (root / "sweep.log").read_text().strip().splitlines()[-1:] or [""]
        log.warning("%s, seed %d failed (exit code %d): %s", row, seed, code, tail[0])
        return RunStatus(row, seed, run_dir, "failed", seconds, detail=tail[0])
    log.info("%s, seed %d: done in %.0f s", row, seed, seconds)
    return RunStatus(row, seed, run_dir, "done", _train_seconds(run_dir), result=result)


def _train_seconds(run_dir: Path) -> float:
    return float(sum(r.get("epoch_seconds", 0.0) for r in read_metrics(run_dir)))


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def summarise(sweep: Sweep, statuses: list[RunStatus]) -> dict[str, Any]:
    """One entry per row: per-exit and ensemble top-1 as mean, sample std and the values over finished seeds."""
    rows = []
    for row in sweep.rows:
        done = [s for s in statuses if s.row == row.name and s.state == "done"]
        entry: dict[str, Any] = {"name": row.name, "options": row.options, "seeds": [s.seed for s in done],
                                 "failed_seeds": [s.seed for s in statuses if s.row == row.name and s.state == "failed"]}
        if done:
            exits = sorted({e["exit"] for s in done for e in s.result["exits"]})
            entry["exits"] = {str(k): _mean_std([e["top1"] for s in done for e in s.result["exits"] if e["exit"] == k])
                              for k in exits}
            entry["ensemble"] = _mean_std([s.result["ensemble"]["top1"] for s in done])
            entry["train_minutes"] = _mean_std([s.seconds / 60.0 for s in done])
        rows.append(entry)
    return {"name": sweep.name, "sweep_file": sweep.source, "base": sweep.base, "seeds": list(sweep.seeds),
            "rows": rows}


def write_results(summary: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in RESULT_FILES]
    paths[0].write_text(json.dumps(summary, indent=1) + "\n")
    paths[1].write_text(format_results(summary) + "\n")
    return paths


def format_results(summary: dict[str, Any]) -> str:
    """The markdown table: top-1 (%) on the test split as mean ± sample std over seeds."""
    lines = [f"### {summary['name']}", "",
             "| configuration | exit 1 | exit 2 | exit 3 | exit 4 | ensemble | seeds | train min/run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["rows"]:
        if "exits" not in r:
            lines.append(f"| {r['name']} | | | | | | 0 | |")
            continue
        cells = [_cell(r["exits"].get(str(k))) for k in (1, 2, 3, 4)]
        ensemble = _cell(r["ensemble"]) if len(r["exits"]) > 1 else "–"  # one exit: no ensemble to speak of
        lines.append(f"| {r['name']} | {' | '.join(cells)} | {ensemble} | {len(r['seeds'])} | "
                     f"{r['train_minutes']['mean']:.1f} |")
    return "\n".join(lines)


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if len(stat["values"]) > 1 else f"{stat['mean']:.2f}"
