"""The job entrypoint: ``python -m jobs.worker --run-id ID --attempt K``.

A worker runs one *attempt* of a run. It claims the attempt (queued → running, owner host:pid), trains with a
reporter that writes every metric to the database as it is logged, and sets the final status, all conditional
on still owning the attempt: a worker whose run was cancelled, failed, or taken over by a later attempt writes
nothing more. A watchdog thread heartbeats and stops the attempt on its own (within ``HEARTBEAT_S`` plus a grace
period) when its run row, its Ray job's supervisor or its head says it should not be running. The same
``execute`` runs in-process for ``python -m app.cli run``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import psutil

from db import config, store
from db.schema import HEARTBEAT_S
from engine.analysis.importance import default_hooks
from engine.errors import UserError
from engine.spec import parse_spec
from engine.train import Cancelled, Diverged, pick_device, train

GRACE_S = 15.0  # after the watchdog asks the loop to stop, it exits the process itself if the loop has not
HEAD_MISSES = 3  # consecutive failed connections to the Ray head before the worker gives up on it
SUPERVISOR_POLL_S = 0.2  # how often a forked worker looks at its warm client (a /proc read, not each step)


class Watchdog(threading.Thread):
    """Heartbeats for one attempt and decides, from outside the training loop, when it must stop.

    It stops the attempt when the run row says so (cancelled, failed, deleted, another attempt), when the process
    that started it (Ray's job supervisor) is gone, or when the Ray head stops answering. In the last two cases the
    attempt is marked ``lost`` so the keeper can retry it once a head is back. A stalled attempt that a reader
    marked lost but that is still the run's current attempt takes the run back.
    """

    def __init__(
        self, run_id: str, attempt: int, log, *, parent_pid: int | None, head: tuple[str, int] | None,
        supervisor_pid: int | None = None,
    ):  # fmt: skip
        super().__init__(name=f"watchdog-{run_id}", daemon=True)
        self.run_id, self.attempt, self.log = run_id, attempt, log
        self.parent_pid, self.head = parent_pid, head
        # A worker forked by the warm server (jobs.warm) is not the supervisor's child: it watches the process that
        # stands for it in Ray (the warm client) by pid instead, a /proc read at most every SUPERVISOR_POLL_S.
        self.supervisor_pid = supervisor_pid
        self._supervisor = _process(supervisor_pid) if supervisor_pid is not None else None
        self._supervisor_gone = supervisor_pid is not None and self._supervisor is None
        self._supervisor_checked = 0.0
        self.stop_reason: str | None = None
        self.progress: float | None = None
        self._done = threading.Event()
        self._misses = 0

    def run(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            try:
                self.check()
            except Exception as err:  # noqa: BLE001 - a database hiccup must not kill the watchdog
                self.log(f"watchdog: {type(err).__name__}: {err}")
            if self.stop_reason:
                if not self._done.wait(GRACE_S):  # the loop did not stop in time: end the process
                    self.log(f"watchdog: the training loop did not stop within {GRACE_S:.0f} s; exiting")
                    os._exit(3)
                return

    def orphaned(self) -> bool:
        """The process that started this worker (Ray's job supervisor, or the warm client that stands for it) is
        gone: one system call, checked each step."""
        if self.supervisor_pid is not None:
            now = time.monotonic()
            if (
                self._supervisor is not None
                and not self._supervisor_gone
                and (now - self._supervisor_checked >= SUPERVISOR_POLL_S)
            ):
                self._supervisor_checked = now
                self._supervisor_gone = not _running(self._supervisor)
            return self._supervisor_gone
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def check(self) -> None:
        if self.orphaned():
            return self.abandon("its Ray job supervisor exited (was the Ray head stopped?)")
        if self.head is not None:
            self._misses = 0 if _reachable(*self.head) else self._misses + 1
            if self._misses >= HEAD_MISSES:
                return self.abandon(f"the Ray head at {self.head[0]}:{self.head[1]} stopped answering")
        if store.heartbeat(self.run_id, self.progress, attempt=self.attempt):
            return None
        self.reclaim()

    def reclaim(self) -> bool:
        """The run refused this attempt's heartbeat or metrics: take it back if it was only marked lost while this
        attempt stalled (True), else stop (False) with the reason the row gives."""
        run = store.get_run(self.run_id)
        if run is None:
            self.request_stop("the run was deleted")
            return False
        if run["attempt"] != self.attempt:
            self.request_stop(f"attempt {run['attempt']} took the run over")
            return False
        if run["status"] == "lost" and store.transition(
            self.run_id, "running", of_attempt=self.attempt, only_from=("lost",), error=None
        ):
            self.log("watchdog: the run was marked lost while this attempt stalled; it heartbeats again")
            return True
        if run["status"] == "running":  # ours again (another thread took it back first)
            return True
        self.request_stop(f"the run is {run['status']}: {run['error'] or 'no reason recorded'}")
        return False

    def abandon(self, reason: str) -> None:
        """Stop, and mark the attempt lost (retryable) if it is still ours."""
        store.transition(self.run_id, "lost", of_attempt=self.attempt, only_from=("running",), error=reason)
        self.request_stop(reason)

    def request_stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
            self.log(f"watchdog: stopping: {reason}")

    def close(self) -> None:
        self._done.set()


def _process(pid: int) -> psutil.Process | None:
    """The process with this pid, remembered with its start time (so a reused pid is not mistaken for it)."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3.0):
            return True
    except OSError:
        return False


def _ray_head() -> tuple[str, int] | None:
    """The GCS address Ray gives a job's entrypoint (``RAY_ADDRESS`` host:port), if any."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


class StoppedEarly(Exception):
    """A study's scheduler ended this trial early; the message says why. Its metrics so far are kept, and its last
    evaluation is its summary's ``final_metrics``."""

    def __init__(self, reason: str, last_eval: dict[str, float]):
        super().__init__(reason)
        self.last_eval = last_eval


# Called with each evaluation's (step, metrics) after they are stored: how a study's trial reports to Ray Tune.
OnEval = Callable[[int, dict[str, float]], None]


class DBReporter:
    """Writes each batch of metrics to the database as it is logged (nothing is lost on a kill), only while its
    attempt owns the run; progress goes with the heartbeat; stopping is the watchdog's decision."""

    def __init__(
        self, run_id: str, attempt: int, log_path: Path, echo: bool = True, on_eval: OnEval | None = None,
        started: float | None = None,
    ):  # fmt: skip
        self.run_id, self.attempt = run_id, attempt
        # When the attempt started (epoch seconds: a worker process's start, a trial's call): its start-up time is
        # measured from here to the first training step, and kept in the run's summary as ``startup_s``.
        self.started = started if started is not None else time.time()
        self.startup_s: float | None = None
        self._log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.echo = echo
        self.on_eval = on_eval
        self.watchdog: Watchdog | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        rows = [(step, k, float(v)) for k, v in metrics.items()]
        stored = store.log_metrics(self.run_id, rows, attempt=self.attempt)
        if stored == 0 and self.watchdog is not None and any(not math.isnan(v) for _, _, v in rows):
            # The row refused them. Either the run was only marked lost while this attempt stalled (take it back,
            # log again), or it is no longer this attempt's (cancelled, taken over): then the watchdog stops the
            # loop before anything else is written, above all a checkpoint past the last stored metric.
            if self.watchdog.reclaim():
                store.log_metrics(self.run_id, rows, attempt=self.attempt)
        if self.startup_s is None and "train_loss" in metrics:
            self.startup_s = round(time.time() - self.started, 3)
            self.log(f"first training step {self.startup_s:.2f} s after the attempt started")
        if self.on_eval is not None and any(k.startswith("eval_") for k in metrics):
            self.on_eval(step, metrics)

    def restart_from(self, step: int) -> None:
        dropped = store.truncate_metrics(self.run_id, after_step=step)
        if dropped:
            self.log(f"dropped {dropped} metric rows logged after step {step} by an earlier attempt")

    def set_progress(self, progress: float) -> None:
        if self.watchdog is not None:
            self.watchdog.progress = progress
        store.heartbeat(self.run_id, progress, attempt=self.attempt)

    def should_stop(self) -> bool:
        watchdog = self.watchdog
        if watchdog is None:
            return False
        if watchdog.stop_reason is None and watchdog.orphaned():  # the head died: stop now, not at the next beat
            watchdog.abandon("its Ray job supervisor exited (was the Ray head stopped?)")
        return watchdog.stop_reason is not None

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self._log.write(line + "\n")
        if self.echo:
            try:
                print(line, flush=True)
            except OSError:  # stdout was a pipe to a job supervisor that died: the log file still has every line
                self.echo = False

    def close(self) -> None:
        self._log.close()


class Terminated(Exception):
    """The process received SIGTERM or SIGINT (Ray's stop_job, a shutdown, Ctrl-C)."""


def _raise_terminated(signum, _frame):
    raise Terminated(f"the worker received {signal.Signals(signum).name}")


def _row(run_id: str) -> dict:
    """The run's row, re-read. It exists: a run is deleted only when its import fails, and no worker runs those."""
    run = store.get_run(run_id)
    assert run is not None, f"run {run_id} is no longer in the database"
    return run


def _startup(reporter: DBReporter) -> dict[str, float]:
    return {} if reporter.startup_s is None else {"startup_s": reporter.startup_s}


def execute(
    run_id: str, *, attempt: int | None = None, echo: bool = True, parent_pid: int | None = None,
    on_eval: OnEval | None = None, node_id: str | None = None, started: float | None = None,
    supervisor_pid: int | None = None,
) -> dict:  # fmt: skip
    """Run one attempt of a run recorded in the database (its current attempt by default); returns the run row.

    ``on_eval`` is called after each evaluation is stored (a study's trial reports it to its scheduler, which may
    raise ``StoppedEarly``); ``node_id`` is the Ray node recorded with the attempt; ``started`` (epoch seconds,
    default now) is when the attempt began, for its ``startup_s``. The attempt is orphaned when this process's
    parent is no longer ``parent_pid`` or, for a worker forked by the warm server, when the process
    ``supervisor_pid`` (its warm client) is gone."""
    run = store.get_run(run_id)
    if run is None:
        raise UserError(
            f"no run {run_id} in the database at {config.db_location()}: list runs with python -m app.cli ls"
        )
    attempt = attempt or run["attempt"]
    out_dir = config.run_dir(run_id)
    log_path = out_dir / "worker.log"
    reporter = DBReporter(run_id, attempt, log_path, echo=echo, on_eval=on_eval, started=started)
    try:
        spec = parse_spec(run["spec"])
        device = pick_device(spec.train.device)
        owner = f"{store.owner_id()}" + (f" attempt {attempt}" if attempt > 1 else "")
        if not store.claim(run_id, attempt, owner, f"{device.type} @ {socket.gethostname()}"):
            now = _row(run_id)
            reporter.log(f"attempt {attempt} not started: the run is {now['status']} at attempt {now['attempt']}")
            return now
        if node_id:
            store.update_run(run_id, node_id=node_id)
    except BaseException:
        reporter.close()
        raise
    watchdog = Watchdog(run_id, attempt, reporter.log, parent_pid=parent_pid, head=_ray_head(),
                        supervisor_pid=supervisor_pid)  # fmt: skip
    reporter.watchdog = watchdog
    watchdog.start()
    try:
        reporter.log(f"run {run_id} attempt {attempt}: {spec.method.name} on {spec.model} / {spec.dataset.name}, "
                     f"seed {spec.train.seed}")  # fmt: skip
        result = train(spec, reporter, out_dir, hooks=default_hooks)
        if _row(run_id)["attempt"] == attempt:  # a later attempt owns the run's files from now on
            for kind, path in result.artifacts.items():
                store.add_artifact(run_id, kind, path)
            store.update_run(run_id, trainable_params=result.trainable_params, total_params=result.total_params,
                             device=result.device)  # fmt: skip
        if store.finish_run(run_id, "succeeded", summary=result.summary() | _startup(reporter), attempt=attempt):
            reporter.log(f"succeeded: {result.final_metrics}")
        else:
            reporter.log("finished, but the run is no longer this attempt's: result not recorded")
    except StoppedEarly as err:
        reporter.log(f"stopped: {err}")
        summary = {"final_metrics": err.last_eval} | _startup(reporter)
        store.finish_run(run_id, "stopped", error=str(err), summary=summary, attempt=attempt)
    except Cancelled as err:
        # The watchdog asked to stop: the run row already says why (cancelled, failed, lost, another attempt).
        reporter.log(f"stopped: {watchdog.stop_reason or err}")
    except Terminated as err:
        # Ray's stop_job after a cancel (the row is cancelled already, so this writes nothing) or a shutdown:
        # the attempt is lost, and the keeper may retry it.
        if store.transition(run_id, "lost", of_attempt=attempt, only_from=("running",), error=str(err)):
            reporter.log(f"lost: {err}")
        else:
            reporter.log(f"stopped: {err}")
    except KeyboardInterrupt:
        store.finish_run(run_id, "cancelled", error="interrupted by the user (Ctrl-C)", attempt=attempt)
        raise
    except Diverged as err:
        reporter.log(str(err))
        store.finish_run(run_id, "failed", error=str(err), attempt=attempt)
    except BaseException as err:  # noqa: BLE001 - record every failure, then let the process fail
        reporter.log(traceback.format_exc())
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        store.finish_run(run_id, "failed", error=message, attempt=attempt)
        if not isinstance(err, Exception):
            raise
    finally:
        watchdog.close()
        if log_path.exists():
            store.add_artifact(run_id, "log", log_path)
        reporter.close()
    return _row(run_id)


def main(argv: list[str] | None = None, *, supervisor_pid: int | None = None, started: float | None = None) -> int:
    """The worker process: its parent is Ray's job supervisor, or (forked by ``jobs.warm``) ``supervisor_pid`` is
    the warm client that Ray started, and ``started`` that client's start."""
    parser = argparse.ArgumentParser(prog="python -m jobs.worker")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--attempt", type=int, help="the attempt to run (default: the run's current one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)  # Ray's stop_job sends SIGTERM first
    if started is None:
        started = psutil.Process().create_time()  # start-up counts from the process's start: imports included
    parent_pid = None if supervisor_pid is not None else os.getppid()
    final = execute(args.run_id, attempt=args.attempt, parent_pid=parent_pid, started=started,
                    supervisor_pid=supervisor_pid)  # fmt: skip
    return 0 if final["status"] in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
