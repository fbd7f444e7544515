"""The benchmark suite: ``python -m bench [--quick] [--only NAME[,NAME]] [--device cpu|cuda] [--json OUT]``.

Run on demand, never by the test suite. Benchmarks (``--only`` takes these names):

* ``peft``: our LoRA train step / PEFT's LoRA train step (target ≤ 0.95), and the frozen floor (head only);
* ``methods``: each method's step / our LoRA step at a similar trainable budget (≤ 1.25), peak memory;
* ``merged``: merged LoRA inference / base model inference (≤ 1.02);
* ``causal-peft``: our LoRA train step / PEFT's on tiny-llama and a ~100M-parameter random-init Llama (≤ 1.0), and
  the peak memory of each; ``causal-methods``: each method's step / our LoRA's on that Llama (≤ 1.25), see
  ``bench/bench_causal.py``;
* ``analysis``: ΔW spectra via factors / via SVD (≤ 0.1), 21×21 landscape batched / loop (≤ 0.5), by running
  ``bench/bench_analysis.py`` and reading its report;
* ``ray``: submit → first training step on a warm local Ray head (≤ 5 s);
* ``study``: a 6-trial study / the same 6 runs submitted separately (≤ 0.6), trial start → first step on a reused
  trial actor (≤ 1.5 s), and (not with ``--quick``) a 12-trial MiniLM study with ASHA / with FIFO (≤ 0.5, the best
  accuracy within 0.01), see ``bench/bench_study.py``;
* ``ui``: metric ingestion into SQLite (≥ 50k points/s) and the Runs page render with 1,000 runs × 1,000
  points (≤ 1 s).

Every speed figure is a ratio to a reference timed in the same repetitions, reported as the median with the
spread over repetitions; the table ends with pass / MISS per target. ``--quick`` uses fewer repetitions and,
for ``methods``, a smaller batch (8 × 32 instead of 16 × 64) and the tiny-bert landscape.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import Figure, device_from, error_figure, machine_info, print_table, write_json

ANALYSIS_SCRIPT = "bench/bench_analysis.py"


@dataclass
class Settings:
    quick: bool
    device: torch.device
    threads: int | None
    reps: int | None  # overrides every benchmark's repetition count
    methods: list[str] | None
    profile: bool
    clock: str  # wall | cpu, for the train-step and inference ratios (see bench.common.CLOCKS)

    def count(self, quick: int, full: int) -> int:
        return self.reps if self.reps else (quick if self.quick else full)


def run_peft(s: Settings) -> list[Figure]:
    from bench.bench_train import Workload, bench_peft

    work = Workload(16, 64, reps=s.count(3, 12), inner=1, warmup=1 if s.quick else 2, clock=s.clock)
    return bench_peft(s.device, work, s.profile)


def run_methods(s: Settings) -> list[Figure]:
    from bench.bench_train import Workload, bench_methods

    size = (8, 32) if s.quick else (16, 64)
    work = Workload(*size, reps=s.count(2, 6), inner=1, warmup=1, clock=s.clock)
    return bench_methods(s.device, work, s.threads, s.methods)


def run_merged(s: Settings) -> list[Figure]:
    from bench.bench_train import Workload, bench_merged

    work = Workload(16, 64, reps=s.count(5, 15), inner=1 if s.quick else 2, warmup=1, clock=s.clock)
    return bench_merged(s.device, work)


# One line of bench_analysis.compare's report.
ANALYSIS_LINE = re.compile(
    r"^(?P<label>\((?P<tag>[ab])\) .*?): ratio median (?P<median>[\d.]+) \(min (?P<min>[\d.]+), max (?P<max>[\d.]+); "
    r"target ≤ (?P<target>[\d.]+)\).*reference median (?P<ref>[\d.]+) ms, candidate median (?P<cand>[\d.]+) ms, "
    r"(?P<reps>\d+) repetitions"
)
ANALYSIS_NAMES = {"a": "ΔW spectra: via factors / via full SVD", "b": "2-D landscape 21×21: batched / naive loop"}


def run_causal_peft(s: Settings) -> list[Figure]:
    from bench.bench_causal import Workload, bench_causal_peft

    work = Workload(4, 64, reps=s.count(2, 5), inner=1, warmup=1, clock=s.clock)
    return bench_causal_peft(s.device, work, ("tiny-llama", "llama-100m"))


def run_causal_methods(s: Settings) -> list[Figure]:
    from bench.bench_causal import Workload, bench_causal_methods

    work = Workload(4, 64, reps=s.count(2, 3), inner=1, warmup=1, clock=s.clock)  # the batch of causal-peft
    return bench_causal_methods(s.device, work, s.methods)


def run_analysis(s: Settings) -> list[Figure]:
    """``bench/bench_analysis.py`` in a child process; its two report lines become two figures."""
    cmd = [sys.executable, ANALYSIS_SCRIPT, "--reps", str(s.count(2, 5)), "--device", s.device.type]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    if s.quick:
        cmd += ["--landscape-model", "tiny-bert"]
    env = os.environ | {"TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    figures = []
    for line in proc.stdout.splitlines():
        m = ANALYSIS_LINE.match(line.strip())
        if m:
            figures.append(
                Figure("analysis", ANALYSIS_NAMES[m["tag"]], float(m["median"]), "×", float(m["target"]),
                       spread=(float(m["min"]), float(m["max"])), reps=int(m["reps"]),
                       detail=f"{m['label'][4:]}; reference {m['ref']} ms, candidate {m['cand']} ms")
            )  # fmt: skip
    if proc.returncode != 0 or len(figures) != 2:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"{ANALYSIS_SCRIPT} exited {proc.returncode} with {len(figures)} figures: {' / '.join(tail)}"
        )
    return figures


def run_ray(s: Settings) -> list[Figure]:
    from bench.bench_infra import bench_ray

    return bench_ray(reps=s.count(2, 5))


def run_study(s: Settings) -> list[Figure]:
    from bench.bench_study import bench_study

    return bench_study(reps=s.count(1, 2), quick=s.quick)


def run_ui(s: Settings) -> list[Figure]:
    from bench.bench_infra import bench_ui

    return bench_ui(runs=1000, points=1000, timed_runs=100 if s.quick else 1000, reps=s.count(3, 5))


BENCHMARKS: dict[str, Callable[[Settings], list[Figure]]] = {
    "peft": run_peft,
    "methods": run_methods,
    "merged": run_merged,
    "causal-peft": run_causal_peft,
    "causal-methods": run_causal_methods,
    "analysis": run_analysis,
    "ray": run_ray,
    "study": run_study,
    "ui": run_ui,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller workloads")
    parser.add_argument("--only", default=None, help=f"comma-separated benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where models run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="clock of the step and inference ratios: wall time, or this process's CPU time (steadier on a busy "
        "machine with --threads 1; CPU device only)",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every benchmark (overrides)")
    parser.add_argument("--methods", default=None, help="comma-separated methods for 'methods' (default: all)")
    parser.add_argument("--profile", action="store_true", help="profile our LoRA and PEFT's step even if ours wins")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the figures and the machine here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures host CPU time: use the wall clock with --device cuda")
    if args.only:
        unknown = set(args.only.split(",")) - set(BENCHMARKS)
        if unknown:
            parser.error(
                f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}"
            )
    return args


def print_profile(figure: Figure) -> None:
    rows = figure.extra.get("profile")
    if not rows:
        return
    totals = figure.extra["profile_total_ms"]
    print(f"\nprofile of one step (self time, ms): ours {totals['ours']:.1f}, PEFT {totals['peft']:.1f}")
    print(f"{'operator':40} {'ours':>9} {'PEFT':>9} {'ours−PEFT':>10}")
    for r in rows:
        print(f"{r['op'][:40]:40} {r['ours_ms']:9.2f} {r['peft_ms']:9.2f} {r['diff_ms']:10.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the load report of every model, otherwise
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        quick=args.quick, device=device_from(args.device), threads=args.threads, reps=args.reps,
        methods=args.methods.split(",") if args.methods else None, profile=args.profile,
        clock=args.clock,
    )  # fmt: skip
    selected = args.only.split(",") if args.only else list(BENCHMARKS)
    meta = {"mode": "quick" if args.quick else "full", "clock": args.clock, "machine": machine_info(settings.device),
            "argv": sys.argv[1:] if argv is None else argv, "groups": {}}  # fmt: skip
    print(f"benchmarks {', '.join(selected)} ({meta['mode']}) on {meta['machine']}", flush=True)
    figures: list[Figure] = []
    t_all = time.perf_counter()
    for name in selected:
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        print(f"[{name}] running (1-min load average {load_before:.2f})", flush=True)
        try:
            group = BENCHMARKS[name](settings)
        except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others
            group = [error_figure(name, f"{name}: failed", err)]
        elapsed = time.perf_counter() - t0
        meta["groups"][name] = {"seconds": round(elapsed, 1), "load_before": load_before,
                                "load_after": os.getloadavg()[0]}  # fmt: skip
        print(f"[{name}] {elapsed:.0f} s", flush=True)
        figures.extend(group)
    meta["seconds"] = round(time.perf_counter() - t_all, 1)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print_table(figures)
    for f in figures:
        print_profile(f)
    print(f"\n{meta['seconds']:.0f} s in all; load average at the end {meta['load_average_end']}")
    if args.json:
        write_json(args.json, figures, meta)
    return 1 if any(f.status == "error" for f in figures) else 0
