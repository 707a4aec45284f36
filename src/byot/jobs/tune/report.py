"""What a study leaves in its folder, from the storage alone (so ``byot tune --summary`` works on any machine
that reaches it): best.yaml (for ``byot train --config``), trials.csv, PNG plots made with Optuna's matplotlib
visualisation, the one test evaluation of the best trial(s) (test_results.json), and the summary table."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import yaml

from byot.errors import ByotError, describe_os_error
from byot.jobs.tune import optuna_module
from byot.jobs.tune.space import with_params
from byot.jobs.tune.study import IDENTITY, MACHINE, STATE, STUDY_ID, counted
from byot.runs.atomic import write_text_atomic
from byot.runs.rundir import BEST

log = logging.getLogger("byot")

TEST_RESULTS = "test_results.json"  # {trial number: its one test evaluation, with the study id and checkpoint hash}


def identity(study: Any) -> dict[str, Any]:
    return study.user_attrs[IDENTITY]


def is_multi(study: Any) -> bool:
    return len(study.directions) > 1


def best_trials(study: Any) -> list[Any]:
    """The best trial (one objective), or the Pareto front (two), most accurate first."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return []
    if not is_multi(study):
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1]))


def trial_options(study: Any, trial: Any) -> dict[str, Any]:
    """The byot train options a trial ran with: the study's base (with the creating machine's data_dir and
    the like) and the trial's parameters."""
    return with_params({**identity(study)["base"], **study.user_attrs.get(MACHINE, {})}, trial.params)


def best_yaml(study: Any, trial: Any) -> str:
    objective = identity(study)["objective"]
    values = ", ".join(f"{v:.4g}" for v in trial.values)
    head = (f"# byot tune study {study.study_name}: trial {trial.number}, objective {objective} = {values} "
            f"on the validation split\n# train it: byot train --config THIS_FILE\n")
    return head + yaml.safe_dump(trial_options(study, trial), sort_keys=False)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    names = _value_names(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(), "byot_state": a.get(STATE, ""),
                               "retry_of": a.get("retry_of", "")}
        for name, value in zip(names, t.values or [None] * len(names)):
            row[name] = value
        row.update(epochs=a.get("epochs_done", ""), epochs_trained=a.get("epochs_trained", a.get("epochs_done", "")),
                   best_epoch=a.get("best_epoch", ""),
                   pruned_at=a.get("pruned_at", ""), train_minutes=round(a.get("train_seconds", 0.0) / 60, 2),
                   **{f"param {k}": v for k, v in t.params.items()}, run_dir=a.get("run_dir", ""),
                   error=a.get("error", ""))
        rows.append(row)
    return rows


def _value_names(study: Any) -> list[str]:
    return ["val_top1", "mean_flops"] if is_multi(study) else ["val_top1"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def counts(study: Any) -> dict[str, Any]:
    """Trials by how they ended, training time, and the time pruning saved (the epochs a pruned trial did
    not train, at its own mean epoch time)."""
    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    failed = [t for t in by["FAIL"] if t.user_attrs.get(STATE) == "error"]
    return {"complete": len(by["COMPLETE"]), "pruned": len(by["PRUNED"]), "failed": len(failed),
            "running": len(by["RUNNING"]), "waiting": len(by["WAITING"]),
            "cut_short": len([t for t in by["FAIL"] if t.user_attrs.get(STATE) not in ("error", "surplus")]),
            "counted": sum(counted(t) for t in trials),
            "train_seconds": sum(t.user_attrs.get("train_seconds", 0.0) for t in trials),
            "saved_seconds": sum(t.user_attrs.get("saved_seconds", 0.0) for t in by["PRUNED"]),
            "pruned_epochs": [t.user_attrs.get("pruned_at") for t in by["PRUNED"]]}


def write_plots(study: Any, out: Path) -> list[Path]:
    """Optuna's matplotlib plots of the study; a plot Optuna cannot draw yet (too few trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = optuna_module()
    vis = optuna.visualization.matplotlib
    multi = is_multi(study)
    target = (lambda t: t.values[0]) if multi else None
    name = "val top-1 (early exit)" if multi else "val top-1"
    plots = {"history.png": lambda: vis.plot_optimization_history(study, target=target, target_name=name),
             "importances.png": lambda: vis.plot_param_importances(study, target=target, target_name=name)}
    if multi:
        plots["pareto.png"] = lambda: vis.plot_pareto_front(study, target_names=["val top-1 (%)", "mean FLOPs"])
    else:
        plots["intermediate.png"] = lambda: vis.plot_intermediate_values(study)
    written = []
    for filename, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(out / filename, dpi=120, bbox_inches="tight")
            plt.close(figure)
            written.append(out / filename)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
            log.info("%s not drawn: %s", filename, e)
            plt.close("all")
    return written


def read_tests(out: Path) -> dict[str, Any]:
    path = out / TEST_RESULTS
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError):
        return {}


def test_best(study: Any, out: Path) -> dict[str, Any]:
    """The test split, evaluated once for each best trial (its model_best), kept in test_results.json so that
    no later summary evaluates it again; a trial whose run directory is on another machine is left out."""
    results = read_tests(out)
    multi = is_multi(study)
    for trial in best_trials(study):
        key = str(trial.number)
        checkpoint = out / trial.user_attrs.get("run_dir", "") / trial_options(study, trial)["arch"] / BEST
        if not checkpoint.is_file():
            if key not in results:
                log.warning("trial %d: %s is not on this machine; its test split is not evaluated", trial.number,
                            checkpoint)
            continue
        if key in results and _same_run(results[key], study, checkpoint):
            continue
        results[key] = _test(study, trial, checkpoint, multi)
        write_text_atomic(out / TEST_RESULTS, json.dumps(results, indent=1) + "\n")
    return results


def _same_run(entry: dict[str, Any], study: Any, checkpoint: Path) -> bool:
    """Whether a stored test result is of this study's trial and of this checkpoint (an entry byot 0.5.0
    wrote, without the two, is taken: its folder is this study's)."""
    if "checkpoint_sha256" not in entry:
        return True
    return entry.get("study_id") == study.user_attrs.get(STUDY_ID) and entry["checkpoint_sha256"] == _sha256(checkpoint)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _test(study: Any, trial: Any, checkpoint: Path, multi: bool) -> dict[str, Any]:
    from byot.jobs.testing import test_checkpoint
    from byot.training.checkpoint import DIGEST
    from byot.training.resolve import resolve_config

    cfg, state = resolve_config({"resume": str(checkpoint), "workers": 0, "final_test": False})
    log.info("trial %d: evaluating the test split once, with %s", trial.number, checkpoint)
    result = test_checkpoint(cfg, state)
    entry = {"epoch": result["epoch"], "exits": [{"exit": e["exit"], "top1": e["top1"]} for e in result["exits"]],
             "ensemble": result["ensemble"]["top1"], "num_images": result["num_images"],
             "study_id": study.user_attrs.get(STUDY_ID), "checkpoint_sha256": state[DIGEST]}
    if multi:  # the thresholds fitted on validation, scored on test
        from byot.deploy.run import early_exit

        ident = identity(study)
        fitted = early_exit(cfg, state, checkpoint.parent / "early_exit", "deepest", ident.get("budget_flops"),
                            ident.get("max_drop"))["fitted"]
        entry["early_exit"] = {"top1": fitted["test"]["top1"], "mean_flops": fitted["test"]["mean_flops"],
                               "speedup": fitted["test"]["speedup"], "thresholds": fitted["thresholds"]}
    return entry


def write_outputs(study: Any, out: Path) -> dict[str, Any]:
    """best.yaml (and pareto-trial-N.yaml for every trial on a two-objective front), trials.csv, the plots and
    the test evaluation of the best; returns what the summary prints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByotError(f"cannot write the study's results to {out}: {describe_os_error(e)}") from e
    files = []
    best = best_trials(study)
    if best:
        write_text_atomic(out / "best.yaml", best_yaml(study, best[0]))
        files.append(out / "best.yaml")
        if is_multi(study):
            for t in best:
                write_text_atomic(out / f"pareto-trial-{t.number:04d}.yaml", best_yaml(study, t))
    rows = trial_rows(study)
    if rows:
        write_csv(rows, out / "trials.csv")
        files.append(out / "trials.csv")
    files += write_plots(study, out) if best else []
    tests = test_best(study, out) if best else {}
    return {"study": study.study_name, "identity": identity(study), "counts": counts(study),
            "best": [_best_entry(study, t, tests.get(str(t.number))) for t in best], "files": [str(f) for f in files],
            "directions": [d.name.lower() for d in study.directions]}


def _best_entry(study: Any, trial: Any, test: dict[str, Any] | None) -> dict[str, Any]:
    a = trial.user_attrs
    return {"trial": trial.number, "values": list(trial.values), "params": trial.params,
            "best_epoch": a.get("best_epoch"), "val_exits": a.get("val_exits"), "val_ensemble": a.get("val_ensemble"),
            "thresholds": a.get("thresholds"), "run_dir": a.get("run_dir"), "test": test}


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(summary: dict[str, Any], requested: int | None = None) -> str:
    c, ident = summary["counts"], summary["identity"]
    wanted = f" of {requested} wanted" if requested else ""
    lines = [f"study {summary['study']}: objective {ident['objective']}",
             (f"trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed, {c['running']} running, "
             f"{c['waiting']} waiting ({c['counted']} counted{wanted}; {c['cut_short']} cut short, resumed as new trials)")]
    lines.append(f"training time {_duration(c['train_seconds'])}; pruning saved about {_duration(c['saved_seconds'])}"
                 + (f" (pruned trials stopped after epoch {', '.join(map(str, sorted(c['pruned_epochs'])))})"
                    if c["pruned_epochs"] else ""))
    best = summary["best"]
    if not best:
        lines.append("no trial has completed yet")
        return "\n".join(lines)
    multi = len(summary["directions"]) > 1
    names = sorted({k for b in best for k in b["params"]})
    title = "Pareto front (validation)" if multi else "best trial (validation)"
    values = "| val top-1 | mean FLOPs |" if multi else "| val top-1 |"
    lines += ["", f"{title}:", "| trial " + values + " " + " | ".join(names) + " | test top-1 (deepest) |"
              + (" test top-1 (early exit) | test mean FLOPs |" if multi else ""),
              "| ---: |" + " ---: |" * (len(names) + (3 if multi else 2)) + (" ---: | ---: |" if multi else "")]
    for b in best:
        test = b["test"] or {}
        deepest = f"{test['exits'][-1]['top1']:.2f}" if test else "–"
        row = f"| {b['trial']} | " + " | ".join(_value(v) for v in b["values"]) + " | " + \
              " | ".join(_value(b["params"].get(n, "–")) for n in names) + f" | {deepest} |"
        if multi:
            ee = test.get("early_exit")
            row += f" {ee['top1']:.2f} | {ee['mean_flops']:.4g} |" if ee else " – | – |"
        lines.append(row)
    top = best[0]
    if top["test"]:
        exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in top["test"]["exits"])
        lines += ["", (f"test split, evaluated once, trial {top['trial']} (model_best, epoch {top['test']['epoch']}): "
                      f"top-1 {exits} ensemble {top['test']['ensemble']:.2f}")]
    if summary["files"]:
        lines += ["", "wrote " + ", ".join(summary["files"])]
    return "\n".join(lines)
