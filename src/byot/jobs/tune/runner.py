"""The workers of one ``byot tune`` process: ``--jobs`` threads, each asking the study for a trial, training it
in a ``byot train`` child (``byot.runs.children``), reporting its epochs to the pruner, and telling the
study how it ended. Ctrl-C or SIGTERM reach every child once: each saves its epoch and stops, its trial is
marked interrupted, and the next ``byot tune`` resumes it from that epoch."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byot.config import TrainConfig, build_config
from byot.errors import ENVIRONMENT_EXIT, ByotError
from byot.jobs.tune import optuna_module
from byot.jobs.tune.space import with_params
from byot.jobs.tune.spec import Tune
from byot.jobs.tune.study import (
    HEARTBEAT_SECONDS,
    MAX_KILLS,
    STATE,
    bind_folder,
    bookkeeping,
    check_data,
    counted,
    open_study,
    recover,
    refuse_taken_folder,
    study_names,
    surplus,
    this_worker,
)
from byot.runs.children import ChildStopper, StoppedBySignal, appended_log, start_child
from byot.runs.runfiles import read_metrics
from byot.runs.trainchild import child_command, plan_run, write_options

log = logging.getLogger("byot")

POLL_SECONDS = 1.0  # how often a running trial's metrics.jsonl is read
TRIAL_LOG = "tune.log"  # in each trial's folder: its byot train child's output
FAILURES_TO_STOP = 3  # trials in a row that fail before any trial has finished: the study stops
# exit codes of a trial's byot train that say the machine failed, not the trial's options: a full disk or an
# I/O error (ENVIRONMENT_EXIT), a hang-up, Ctrl-C or SIGTERM sent to it alone; a negative code is a signal
# that killed it (the OOM killer's SIGKILL). Such a trial is retried from its checkpoint, MAX_KILLS times.
ENVIRONMENT_CODES = (ENVIRONMENT_EXIT, 129, 130, 143)


@dataclass
class Workers:
    """What the threads of one tuner share."""

    tune: Tune
    study: Any
    out: Path  # the study folder
    threads: int  # torch threads per trial process
    stopper: ChildStopper
    errors: list[BaseException] = field(default_factory=list)
    failures: int = 0  # trials in a row this process saw fail in training
    environment_failures: int = 0  # trials in a row this process saw fail through the machine

    @property
    def stop(self) -> bool:
        return self.stopper.stopping or bool(self.errors)


def threads_per_trial(jobs: int) -> int:
    """Cores (or OMP_NUM_THREADS, where set) divided between the trial processes, at least one each."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    cores = int(given) if given.isdigit() and int(given) > 0 else len(os.sched_getaffinity(0))
    return max(1, cores // jobs)


def trial_command(arch: str, root: Path, redo: bool = False) -> list[str]:
    """One trial's ``byot train``: options from its folder's options file, resumed from its checkpoint when
    it has one (a retried trial), and no test evaluation (the tuner tests the best trial once, at the end).
    ``redo``: the run directory holds a run of other options, which is replaced (--overwrite)."""
    return child_command(arch, root, redo, final_test=False)


def run_study(tune: Tune, storage: Any, out: Path, jobs: int) -> Any:
    """Run trials until the study has ``tune.trials`` of them (or a signal stops it); returns the study."""
    from byot.data.fingerprint import data_fingerprint

    if tune.name not in study_names(storage):
        refuse_taken_folder(out, tune.name)
    study = open_study(tune, storage)
    bind_folder(study, out)
    check_data(study, data_fingerprint(tune.base_config.dataset, tune.base_config.data_dir))
    threads = threads_per_trial(jobs)
    log.info("study %s: %s; %d trial(s) wanted, %d process(es) of %d thread(s); study folder %s", tune.name,
             tune.objective.describe(), tune.trials, jobs, threads, out)
    with ChildStopper() as stopper:
        workers = Workers(tune, study, out, threads, stopper)
        pool = [threading.Thread(target=_work, args=(workers,), name=f"trial-worker-{i}", daemon=True)
                for i in range(jobs)]
        for thread in pool:
            thread.start()
        for thread in pool:
            while thread.is_alive():
                thread.join(timeout=0.5)  # short: the main thread takes the signals
    if workers.errors:
        error = workers.errors[0]
        raise error if isinstance(error, ByotError) else ByotError(f"a trial worker failed: {error!r}")
    if stopper.received:
        raise StoppedBySignal(stopper.received[0])
    return study


def _work(w: Workers) -> None:
    try:
        while not w.stop:
            trial = _next_trial(w)
            if trial is None:
                return
            _run_trial(w, trial)
    except BaseException as e:  # noqa: BLE001 (reported by the main thread)
        w.errors.append(e)


def _next_trial(w: Workers) -> Any:
    """A new trial (or a queued retry), or None when the study has its trials."""
    optuna = optuna_module()
    while not w.stop:
        with bookkeeping(w.out):
            for note in recover(w.study):
                log.info(note)
            trials = w.study.get_trials(deepcopy=False)
            waiting = any(t.state.name == "WAITING" for t in trials)
            if not waiting and sum(counted(t) for t in trials) >= w.tune.trials:
                return None
            trial = w.study.ask()
            trial.set_user_attr("worker", this_worker())
            trial.set_user_attr(STATE, "running")
            if not surplus(trial.number, trial.user_attrs, w.study.get_trials(deepcopy=False), w.tune.trials):
                return trial
            trial.set_user_attr(STATE, "surplus")
            w.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return None


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _run_trial(w: Workers, trial: Any) -> None:
    tune = w.tune
    params = {p.name: p.suggest(trial) for p in tune.params}
    relative = trial.user_attrs.get("run_dir") or f"trials/trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", relative)
    root = w.out / relative
    options = with_params(tune.base, params)
    retry = trial.user_attrs.get("retry_of")
    label = f"trial {trial.number}" + (f" (trial {retry} again)" if retry is not None else "")
    try:
        cfg = build_config({}, {**options, "save_folder": str(root), "final_test": False})  # as the child runs
    except ByotError as e:
        _end(w, trial, "error", f"{label}: not a valid training config: {e}", error=str(e))
        return
    plan = plan_run(cfg.run_dir, cfg)  # the sweep's rule: a run of other options is redone, never resumed
    redo = plan.action == "redo"
    if redo:
        log.warning("%s: %s holds a run of other options (%s); training the trial from scratch", label,
                    cfg.run_dir, plan.why)
    resumed_from = 0 if redo else max((r["epoch"] for r in read_metrics(cfg.run_dir) if "exits" in r), default=0)
    write_options(root, options)
    command = trial_command(cfg.arch, root, redo)
    log.info("%s: %s (log: %s)", label, _describe(params), root / TRIAL_LOG)
    trial.set_user_attr("epochs_planned", cfg.epochs)
    env = {"OMP_NUM_THREADS": str(w.threads), "MKL_NUM_THREADS": str(w.threads)}
    with appended_log(root / TRIAL_LOG, command) as logfile:
        proc = start_child(command, logfile, env)
        w.stopper.watch(proc)
        code, records, pruned_at = _follow(w, trial, proc, cfg, label, resumed_from)
    _finish(w, trial, cfg, label, code, records, pruned_at, root, resumed_from)


def _follow(w: Workers, trial: Any, proc: Any, cfg: TrainConfig, label: str,
            resumed_from: int) -> tuple[int, list[dict], int | None]:
    """Report each finished epoch to the pruner while the child trains; stop it when the pruner says so."""
    single = w.tune.objective.kind != "early-exit"
    storage = w.study._storage
    beat = getattr(storage, "record_heartbeat", None) if _heartbeat(storage) else None
    reported: set[int] = set()
    pruned_at, last_beat = None, 0.0
    while True:
        code = w.stopper.poll(proc, POLL_SECONDS)
        records = [r for r in read_metrics(cfg.run_dir) if "exits" in r]
        new = [r for r in records if r["epoch"] not in reported]
        for r in new:
            reported.add(r["epoch"])
            if r["epoch"] > resumed_from:  # the epochs before were logged by the trial cut short
                log.info("%s, epoch %d/%d: %s", label, r["epoch"], cfg.epochs,
                         " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in r["exits"]))
            if single:
                trial.report(w.tune.objective.epoch_value(r), r["epoch"])
        if new and single and code is None and pruned_at is None and trial.should_prune():
            pruned_at = new[-1]["epoch"]
            w.stopper.stop(proc)
        if beat is not None and time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
            beat(trial._trial_id)
            last_beat = time.monotonic()
        if code is not None:
            return code, records, pruned_at


def _heartbeat(storage: Any) -> bool:
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return interval is not None


def best_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch model_best holds: the last with the highest deepest-exit validation top-1 (byot train keeps
    a checkpoint that ties the best, so the later one)."""
    return max(records, key=lambda r: (r["exits"][-1]["top1"], r["epoch"]))


def _finish(w: Workers, trial: Any, cfg: TrainConfig, label: str, code: int, records: list[dict],
            pruned_at: int | None, root: Path, resumed_from: int = 0) -> None:
    trained = [r for r in records if r["epoch"] > resumed_from]  # a retry's own epochs: the cut trial has the rest
    seconds = float(sum(r.get("epoch_seconds", 0.0) for r in trained))
    trial.set_user_attr("epochs_done", len(records))
    trial.set_user_attr("epochs_trained", len(trained))
    trial.set_user_attr("train_seconds", seconds)
    complete = code == 0 and len(records) == cfg.epochs and records[-1]["epoch"] == cfg.epochs
    if complete:
        try:
            values, attrs = _values(w, cfg, records)
        except ByotError as e:
            _end(w, trial, "error", f"{label}: scoring failed: {e}", error=str(e))
            return
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        _end(w, trial, "done", f"{label}: {', '.join(f'{n} {v:.4g}' for n, v in zip(w.tune.objective.names, values))} "
             f"({seconds / 60:.1f} min)", values=values)
    elif pruned_at is not None:
        mean = seconds / max(len(trained), 1)
        trial.set_user_attr("pruned_at", pruned_at)
        trial.set_user_attr("saved_seconds", max(0, cfg.epochs - len(records)) * mean)
        _end(w, trial, "pruned", f"{label}: pruned after epoch {pruned_at}/{cfg.epochs}")
    elif w.stopper.stopping:
        _end(w, trial, "interrupted", f"{label}: stopped at its last saved epoch ({len(records)}/{cfg.epochs}); "
             "the next byot tune resumes it")
    else:
        lines = (root / TRIAL_LOG).read_text(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else ""
        reason = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        if code < 0 or code in ENVIRONMENT_CODES:
            tries = trial.user_attrs.get("kills", 0) + 1
            again = ("it will be retried from its last saved epoch" if tries <= MAX_KILLS else
                     f"not retried again: it failed so {tries} times")
            _end(w, trial, "environment", f"{label} failed through the machine ({reason}): {detail}; {again} "
                 f"(see {root / TRIAL_LOG})", error=f"{reason}: {detail}")
            return
        _end(w, trial, "error", f"{label} failed ({reason}): {detail} (see {root / TRIAL_LOG})",
             error=f"{reason}: {detail}")


def _values(w: Workers, cfg: TrainConfig, records: list[dict]) -> tuple[list[float], dict[str, Any]]:
    """The trial's objective value(s), on the validation split, for model_best."""
    best = best_record(records)
    objective = w.tune.objective
    attrs: dict[str, Any] = {"best_epoch": best["epoch"], "val_exits": {str(e["exit"]): e["top1"] for e in best["exits"]},
                             "val_ensemble": best["ensemble"]["top1"]}
    if objective.kind != "early-exit":
        return [objective.epoch_value(best)], attrs
    import torch

    from byot.deploy.run import fit_on_validation
    from byot.runs.rundir import BEST
    from byot.training.resolve import resolve_config

    torch.set_num_threads(w.threads)
    trained, checkpoint = resolve_config({"resume": str(cfg.run_dir / BEST), "workers": 0, "final_test": False})
    fitted = fit_on_validation(trained, checkpoint, "deepest", objective.budget_flops, objective.max_drop)
    attrs.update(thresholds=fitted["thresholds"], full_flops=fitted["full_flops"],
                 val_reference_top1=fitted["val_reference_top1"], exit_shares=fitted["val"]["exit_shares"])
    return [fitted["val"]["top1"], fitted["val"]["mean_flops"]], attrs


def _end(w: Workers, trial: Any, state: str, line: str, values: list[float] | None = None,
         error: str | None = None) -> None:
    """Attributes first (Optuna refuses them on a finished trial), then the state."""
    optuna = optuna_module()
    states = {"done": "COMPLETE", "pruned": "PRUNED"}
    if error is not None:
        trial.set_user_attr("error", error[:500])
    trial.set_user_attr(STATE, state)
    w.study.tell(trial, values=values, state=getattr(optuna.trial.TrialState, states.get(state, "FAIL")))
    (log.warning if state in ("error", "environment") else log.info)(line)
    w.failures = w.failures + 1 if state == "error" else 0 if state in ("done", "pruned") else w.failures
    w.environment_failures = w.environment_failures + 1 if state == "environment" else 0
    finished = any(t.state.name in ("COMPLETE", "PRUNED") for t in w.study.get_trials(deepcopy=False))
    if w.failures >= FAILURES_TO_STOP and not finished:  # the data or a base option, not the parameters
        w.errors.append(ByotError(f"the first {w.failures} trials failed, the last with: {error}; see its "
                                  f"{TRIAL_LOG}, fix the base config and run again"))
    if w.environment_failures >= FAILURES_TO_STOP:  # a full disk fails every trial: stop, keep them resumable
        w.errors.append(ByotError(f"{w.environment_failures} trials in a row failed through the machine, the last "
                                  f"with: {error}; free the disk or memory and rerun the same command: these "
                                  "trials resume from their last saved epoch"))
