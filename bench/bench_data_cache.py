"""The encoded-data cache's effect on a 12-trial study: ``python -m bench.bench_data_cache [--separate]``.

One local Ray head (2 CPUs, one per trial) and one PEFT Lab home; after a small warm-up study (so that none of the
measured ones pays the head's first start-up), the same 12-trial grid study (tiny-bert, 6 learning rates x 2 seeds,
5 steps each) on the whole bundled tweets set (34k training texts tokenised at length 32) runs three times:

* ``off``: ``PEFTLAB_DATA_CACHE=0`` (every process reads and tokenises; a reused trial actor still keeps what it
  encoded in memory);
* ``cold``: the disk cache on and empty (the first trial encodes and stores, the other actor reads it);
* ``warm``: the disk cache filled by the ``cold`` study (a second study on the same data).

It prints each study's wall time (submission to its end) and the sum over its trials of ``data_s`` (the seconds a
trial spent reading and encoding data). ``--separate`` also submits the 12 configurations as 12 separate runs (each
its own process: the case where only the disk cache helps), without and with a warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

from bench.bench_infra import temporary_lab, wait_for_final
from bench.bench_study import _wait_study
from db import studies as db_studies

SPEC: dict[str, Any] = {
    "name": "bench-data-cache",
    "model": "tiny-bert",
    "dataset": {"name": "tweets-sentiment", "max_train": None, "max_eval": 256, "max_length": 32},
    "method": {"name": "lora", "rank": 4},
    "train": {"max_steps": 5, "batch_size": 16, "log_every": 5, "num_threads": 1, "device": "cpu"},
    "resources": {"num_cpus": 1},
}
STUDY: dict[str, Any] = {
    "name": "bench-data-cache-12",
    "spec": SPEC,
    "space": {"train.lr": {"grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}},
    "seeds": [0, 1],
    "search": "grid",
    "max_concurrent": 2,
}


def _data_seconds(runs: list[dict[str, Any]]) -> float:
    return sum(float(((r.get("summary") or {}).get("timings") or {}).get("data_s", 0.0)) for r in runs)


def _set_cache(on: bool) -> None:
    if on:
        os.environ.pop("PEFTLAB_DATA_CACHE", None)
    else:
        os.environ["PEFTLAB_DATA_CACHE"] = "0"


def run_study(on: bool, study: dict[str, Any] = STUDY) -> dict[str, float]:
    from jobs.studies import submit_study

    _set_cache(on)
    t0 = time.perf_counter()
    study_id = submit_study(study)
    _wait_study(study_id, 1800)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "data_s": _data_seconds(db_studies.trial_runs(study_id))}


def run_separately(on: bool) -> dict[str, float]:
    from engine.study import expand, parse_study, trial_spec
    from jobs.runs import submit_run

    _set_cache(on)
    parsed = parse_study(STUDY)
    assert parsed.spec is not None
    specs = [trial_spec(parsed.spec, params).model_dump(mode="json") for params in expand(parsed)]
    t0 = time.perf_counter()
    runs = [wait_for_final(run_id, 1800) for run_id in [submit_run(spec) for spec in specs]]
    return {"wall_s": time.perf_counter() - t0, "data_s": _data_seconds(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_data_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--separate", action="store_true", help="also 12 separate runs, cache off and warm")
    args = parser.parse_args(argv)
    from jobs import cluster

    results: dict[str, dict[str, float]] = {}
    with temporary_lab() as home:
        cluster.start_local_head(num_cpus=2)
        try:
            # A 2-trial study on 64 examples first, so that no measured study pays the head's first driver and
            # trial-actor start-up.
            warm_up = STUDY | {"spec": SPEC | {"dataset": SPEC["dataset"] | {"max_train": 64}}, "seeds": [0],
                               "space": {"train.lr": {"grid": [1e-3, 3e-3]}}}  # fmt: skip
            run_study(False, warm_up)
            results["study, cache off"] = run_study(False)
            shutil.rmtree(home / "cache" / "data", ignore_errors=True)
            results["study, cache cold"] = run_study(True)
            results["study, cache warm"] = run_study(True)
            if args.separate:
                results["12 runs, cache off"] = run_separately(False)
                results["12 runs, cache warm"] = run_separately(True)
        finally:
            _set_cache(True)
            cluster.stop_local_head()
    for name, r in results.items():
        print(f"{name:<22} wall {r['wall_s']:6.1f} s   data (sum over trials) {r['data_s']:6.2f} s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
