"""The job entrypoint: ``python -m jobs.worker --run-id ID``.

Loads the run's spec from the database, trains with a reporter that writes metrics and heartbeats to
the database, records the adapter and logs as artifacts, and sets the final status. Whatever happens,
the metrics logged so far and the log file are kept. The same ``execute`` runs in-process for
``python -m app.cli run``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from db import config, store
from engine.spec import parse_spec
from engine.train import Cancelled, pick_device, train


class DBReporter:
    """Batches metrics into the database and throttles heartbeats and cancellation checks."""

    def __init__(self, run_id: str, log_path: Path, echo: bool = True, flush_every_s: float = 1.0):
        self.run_id = run_id
        self.buffer: list[tuple[int, str, float]] = []
        self.flush_every_s = flush_every_s
        self._last_flush = self._last_check = time.monotonic()
        self._stopped = False
        self._log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.echo = echo

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.buffer.extend((step, k, float(v)) for k, v in metrics.items())
        if time.monotonic() - self._last_flush > self.flush_every_s or len(self.buffer) > 500:
            self.flush()

    def flush(self) -> None:
        store.log_metrics(self.run_id, self.buffer)
        self.buffer = []
        self._last_flush = time.monotonic()

    def set_progress(self, progress: float) -> None:
        store.heartbeat(self.run_id, progress)

    def should_stop(self) -> bool:
        """True once the run was cancelled in the database (the UI or CLI may cancel without Ray)."""
        if time.monotonic() - self._last_check > 2.0:
            self._last_check = time.monotonic()
            run = store.get_run(self.run_id)
            self._stopped = run is None or run["status"] == "cancelled"
        return self._stopped

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self._log.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    def close(self) -> None:
        self._log.close()


def _raise_cancelled(signum, _frame):
    raise Cancelled(f"received signal {signal.Signals(signum).name}")


def execute(run_id: str, *, echo: bool = True) -> dict:
    """Train one run recorded in the database; returns the final run row."""
    run = store.get_run(run_id)
    if run is None:
        raise SystemExit(f"no run {run_id} in {config.db_url()}")
    out_dir = config.run_dir(run_id)
    log_path = out_dir / "worker.log"
    reporter = DBReporter(run_id, log_path, echo=echo)
    try:
        spec = parse_spec(run["spec"])
        device = pick_device(spec.train.device)
        store.mark_running(run_id, f"{device.type} @ {socket.gethostname()}")
        reporter.log(f"run {run_id}: {spec.method.name} on {spec.model} / {spec.dataset.name}, seed {spec.train.seed}")
        result = train(spec, reporter, out_dir)
        reporter.flush()
        for kind, path in result.artifacts.items():
            store.add_artifact(run_id, kind, path)
        store.update_run(run_id, trainable_params=result.trainable_params, total_params=result.total_params,
                         device=result.device)  # fmt: skip
        store.finish_run(run_id, "succeeded", summary=result.summary())
        reporter.log(f"succeeded: {result.final_metrics}")
    except Cancelled as err:
        reporter.log(f"cancelled: {err}")
        reporter.flush()
        store.finish_run(run_id, "cancelled", error=str(err))
    except BaseException as err:  # noqa: BLE001 - record every failure, then let the process fail
        reporter.log(traceback.format_exc())
        try:
            reporter.flush()
        finally:
            store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}")
        if not isinstance(err, Exception):
            raise
    finally:
        store.add_artifact(run_id, "log", log_path)
        reporter.close()
    return store.get_run(run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_cancelled)  # Ray's stop_job sends SIGTERM first
    final = execute(args.run_id)
    return 0 if final["status"] in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
