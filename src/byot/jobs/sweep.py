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
override the base. Every row runs with the same budget unless its options change it. The file's shape is
checked against ``SWEEP_KEYS`` and ``ROW_KEYS``, and every row's options as a training config, before
anything runs.

A run is kept, or resumed, only when it was trained with the options its row asks for now
(``byot.runs.trainchild``, the rule byot tune's trials follow too): a run of other options is redone from
scratch, never resumed; continuing it (more epochs included, which moves the step schedule's milestones)
would mix two configurations in one result.

SIGINT and SIGTERM while a run trains are forwarded to it once; the sweep waits for it to save and stop
(at most ``byot.runs.children.CHILD_STOP_SECONDS``, then kills it) and exits 130 / 143; rerunning the
sweep continues.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byot.config import RANGES, Key, TrainConfig, build_config, check_shape, load_yaml
from byot.errors import ByotError, describe_os_error
from byot.runs.atomic import write_text_atomic
from byot.runs.children import ChildStopper, StoppedBySignal, appended_log, start_child
from byot.runs.rundir import LATEST, PREVIOUS
from byot.runs.runfiles import read_metrics
from byot.runs.signals import signal_name
from byot.runs.trainchild import (
    Plan,
    child_command,
    finished,
    plan_run,
    slug,
    write_options,
)

log = logging.getLogger("byot")

RESULT_FILES = ("results.json", "results.md")



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
        """The base's options with the row's over them (the family's model_options add up, as in a config)."""
        merged = {**self.base, **row.options, "seed": seed}
        if isinstance(self.base.get("model_options"), dict) and isinstance(row.options.get("model_options"), dict):
            merged["model_options"] = {**self.base["model_options"], **row.options["model_options"]}
        return merged

    def config(self, row: Row, seed: int) -> TrainConfig:
        """The config the run's ``byot train`` child resolves (bar resume and progress)."""
        return build_config({}, {**self.options(row, seed), "save_folder": str(self.run_root(row, seed))})


@dataclass
class RunStatus:
    row: str
    seed: int
    run_dir: Path
    state: str  # "done", "failed", "planned"
    seconds: float = 0.0
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)



# --- the sweep file's shape ------------------------------------------------------------------------------

def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _mapping(value: Any) -> bool:
    return value is None or isinstance(value, dict)  # an empty `base:` is no options


def _seeds(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and len(set(value)) == len(value)
            and all(isinstance(s, int) and not isinstance(s, bool) and RANGES["seed"].holds(s) for s in value))


def _rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value)


OPTIONS = "a mapping of byot train options"
SWEEP_KEYS = {
    "name": Key("a non-empty string", "cifar100_ablation", _text, required=True),
    "out": Key("a folder path", "experiments/results/cifar100_ablation", _text),
    "runs_dir": Key("a folder path", "runs/sweeps/cifar100_ablation", _text),
    "seeds": Key(f"a non-empty list of distinct integers in [0, {RANGES['seed'].high:.0f}]", "[0, 1]", _seeds),
    "base": Key(OPTIONS, "{arch: multi_resnet18_kd, epochs: 15}", _mapping),
    "rows": Key("a non-empty list of rows", "[{name: full BYOT, options: {}}]", _rows, required=True),
}
ROW_KEYS = {
    "name": Key("a non-empty string", "{name: plain backbone, options: {distill: false}}", _text, required=True),
    "options": Key(OPTIONS, "{distill: false}", _mapping),
}


def _option_names(options: dict[Any, Any] | None) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in (options or {}).items()}


def _row(where: str, item: Any) -> Row:
    if isinstance(item, dict):
        item = _option_names(item)  # the row's own keys may be spelled with hyphens too
    check_shape(where, item, ROW_KEYS)
    return Row(item["name"], _option_names(item.get("options")))


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file; ``overrides`` (e.g. {"data_dir": ...}) replace base options."""
    where = f"sweep {path}"
    raw = load_yaml(path, what="sweep")
    check_shape(where, raw, SWEEP_KEYS)
    rows = tuple(_row(f"{where}, row {i}", item) for i, item in enumerate(raw["rows"], start=1))
    names = [slug(r.name) for r in rows]
    if len(set(names)) != len(names):
        raise ByotError(f"{where}: row names must differ (as folder names: {', '.join(names)})")
    name = raw["name"]
    out = raw.get("out") or f"experiments/results/{slug(name)}"
    runs_dir = raw.get("runs_dir") or f"runs/sweeps/{slug(name)}"
    base = {**_option_names(raw.get("base")), **(overrides or {})}
    sweep = Sweep(name, Path(out), Path(runs_dir), tuple(raw.get("seeds", [0])), base, rows, str(path))
    for row in sweep.rows:  # every combination must be a valid training config before anything starts
        try:
            cfg = sweep.config(row, sweep.seeds[0])
        except ByotError as e:
            raise ByotError(f"{where}, row {row.name!r}: {e}") from e
        if not cfg.final_test:
            raise ByotError(f"{where}, row {row.name!r}: a sweep reports the test split: drop final_test: false")
    return sweep


# --- running the sweep -------------------------------------------------------------------------------------

def run_sweep(sweep: Sweep, dry_run: bool = False) -> list[RunStatus]:
    """Train every (row, seed) not yet finished with its options, one ``byot train`` process at a time;
    ``dry_run``: say what would run, and write nothing."""
    statuses = []
    todo = [(row, seed) for row in sweep.rows for seed in sweep.seeds]
    for i, (row, seed) in enumerate(todo, start=1):
        root, wanted = sweep.run_root(row, seed), sweep.config(row, seed)
        plan = plan_run(wanted.run_dir, wanted)
        label = f"[{i}/{len(todo)}] {row.name}, seed {seed}"
        if plan.action == "keep":
            log.info("%s: finished before with the same options, kept", label)
            statuses.append(RunStatus(row.name, seed, wanted.run_dir, "done", _train_seconds(wanted.run_dir),
                                      result=plan.result or {}))
            continue
        command = child_command(wanted.arch, root, redo=plan.action == "redo")
        if dry_run:
            detail = " ".join(command) if plan.action != "redo" else f"{plan.why}: would redo: {' '.join(command)}"
            statuses.append(RunStatus(row.name, seed, wanted.run_dir, "planned", detail=detail))
            continue
        log.info("%s: %s (log: %s)", label, _doing(plan, wanted.run_dir), root / "sweep.log")
        write_options(root, sweep.options(row, seed))
        statuses.append(_train(row.name, seed, wanted, command, root))
    return statuses


def _doing(plan: Plan, run_dir: Path) -> str:
    if plan.action == "redo":
        return f"{plan.why}: redoing from scratch"
    return "resuming" if (run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists() else "starting"


def _train(row: str, seed: int, wanted: TrainConfig, command: list[str], root: Path) -> RunStatus:
    """Run one child; it is done only if it exited 0 and left a finished run with ``wanted``'s options."""
    start = time.perf_counter()
    code = _run_child(command, root / "sweep.log")
    seconds = time.perf_counter() - start
    result = finished(wanted.run_dir, wanted)
    if code != 0 or result is None:
        tail = (root / "sweep.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        detail = tail[0] if code != 0 else f"exited 0 but left no finished run: {tail[0]}"
        log.warning("%s, seed %d failed (exit code %d): %s", row, seed, code, detail)
        return RunStatus(row, seed, wanted.run_dir, "failed", seconds, detail=detail)
    log.info("%s, seed %d: done in %.0f s", row, seed, seconds)
    return RunStatus(row, seed, wanted.run_dir, "done", _train_seconds(wanted.run_dir), result=result)


# --- one child process, and the signals that stop it ---------------------------------------------------

SweepInterrupted = StoppedBySignal  # SIGINT or SIGTERM stopped the sweep (exit code 130 / 143)


def _run_child(command: list[str], log_path: Path) -> int:
    """Run ``command`` with its output appended to ``log_path``; its exit code. A signal to the sweep
    stops the child first (``byot.runs.children``), then raises SweepInterrupted."""
    with appended_log(log_path, command) as logfile, ChildStopper() as stopper:
        proc = start_child(command, logfile)
        stopper.watch(proc)
        code = stopper.wait(proc)
    if stopper.received:
        name = signal_name(stopper.received[0])
        log.warning("byot sweep: interrupted (%s); the run in progress stopped at its last saved epoch; "
                    "rerun the sweep to continue", name)
        raise SweepInterrupted(stopper.received[0])
    return code


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
    paths = [out / name for name in RESULT_FILES]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByotError(f"cannot write the sweep's results to {out}: {describe_os_error(e)}") from e
    write_text_atomic(paths[0], json.dumps(summary, indent=1) + "\n")
    write_text_atomic(paths[1], format_results(summary) + "\n")
    return paths


def format_results(summary: dict[str, Any]) -> str:
    """The markdown table: top-1 (%) on the test split as mean ± sample std over seeds."""
    # one column per exit number any row has (the stage it reads), so a 3-stage WideResNet and a 5-block VGG
    # each show their real exits; a row without that exit (the plain backbone's shallow ones) shows "–"
    numbers = sorted({int(k) for r in summary["rows"] for k in r.get("exits", {})}) or [1]
    lines = [f"### {summary['name']}", "",
             "| configuration | " + " | ".join(f"exit {k}" for k in numbers) + " | ensemble | seeds | train min/run |",
             "| --- |" + " ---: |" * (len(numbers) + 3)]
    for r in summary["rows"]:
        if "exits" not in r:
            lines.append(f"| {r['name']} |" + " |" * (len(numbers) + 1) + " 0 | |")
            continue
        cells = [_cell(r["exits"].get(str(k))) for k in numbers]
        ensemble = _cell(r["ensemble"]) if len(r["exits"]) > 1 else "–"  # one exit: no ensemble to speak of
        lines.append(f"| {r['name']} | {' | '.join(cells)} | {ensemble} | {len(r['seeds'])} | "
                     f"{r['train_minutes']['mean']:.1f} |")
    return "\n".join(lines)


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if len(stat["values"]) > 1 else f"{stat['mean']:.2f}"
