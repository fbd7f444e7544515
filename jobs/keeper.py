"""The keeper: ``python -m jobs.keeper``, one long-lived Ray job per cluster and database.

Every ``EVERY_S`` seconds it runs ``jobs.runs.sweep``: runs whose worker stopped heartbeating, or whose Ray job
ended without a word, become lost, and lost runs are retried from their last checkpoint (or failed once their
retries are used up). It takes no CPU from the runs (``entrypoint_num_cpus=0``) and lives as long as the
cluster, so a dead run is noticed and retried whether or not anyone has the dashboard open. It also fails a study
whose driver job died (``jobs.studies.sweep_studies``).
"""

from __future__ import annotations

import sys
import time
import traceback

from jobs.runs import sweep
from jobs.studies import sweep_studies

EVERY_S = 5.0


def main() -> int:
    print(f"keeper: sweeping every {EVERY_S:.0f} s", flush=True)
    while True:
        try:
            for run_or_study_id, what in (sweep() | sweep_studies()).items():
                print(f"{time.strftime('%H:%M:%S')} {run_or_study_id}: {what}", flush=True)
        except Exception:  # noqa: BLE001 - a database or Ray hiccup: log it and sweep again next time
            traceback.print_exc()
        time.sleep(EVERY_S)


if __name__ == "__main__":
    sys.exit(main())
