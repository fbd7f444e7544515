"""What every benchmark shares: the result record, interleaved timing, the fixed batch, memory and machine info.

The machine the suite runs on is shared and noisy, so every speed figure is a ratio against a reference
measured in the same process: each repetition times the reference and the candidate back to back (the order
rotates from one repetition to the next, so a burst of load hits both), and a figure reports the median of
the per-repetition ratios with their spread (min–max).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

MIB = 2**20


@dataclass
class Figure:
    """One row of the results table.

    ``target`` is the threshold the value must meet (``value ≤ target``, or ``≥`` when ``higher_is_better``);
    None means the figure is reported without a target. ``spread`` is (min, max) over ``reps`` repetitions.
    """

    group: str
    name: str
    value: float | None
    unit: str = "×"
    target: float | None = None
    higher_is_better: bool = False
    spread: tuple[float, float] | None = None
    reps: int = 0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.value is None:
            return "error"
        if self.target is None:
            return "report"
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "pass" if ok else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return "report"
        return f"{'≥' if self.higher_is_better else '≤'} {format_value(self.target, self.unit)}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status, "target_text": self.target_text()}


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "×":
        return f"{value:.3f}"
    if unit in ("points/s",):
        return f"{value:,.0f} {unit}"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    return f"{value:.3g} {unit}"


def error_figure(group: str, name: str, err: BaseException) -> Figure:
    return Figure(group, name, None, detail=f"{type(err).__name__}: {err}"[:300])


# --- timing --------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A barrier to call before reading the clock: CUDA kernels run asynchronously."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# ``wall``: elapsed time. ``cpu``: CPU time of this process (all its threads), which a busy machine inflates far
# less than wall time when torch runs one thread (with several, OpenMP's spin-waiting for a descheduled thread
# is counted too); meaningless for CUDA, where the work is on the GPU.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_times(
    contenders: dict[str, Callable[[], object]],
    *,
    reps: int,
    inner: int = 1,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each contender in each repetition (mean over ``inner`` calls), on ``CLOCKS[clock]``.

    Every contender runs ``warmup`` untimed calls first. In repetition k the contenders run in the order
    rotated by k, so none is always first (first after another's run may find caches cold).
    """
    now = CLOCKS[clock]
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            sync()
            t0 = now()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((now() - t0) / inner)
    return times


def ratio_stats(candidate: list[float], reference: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (min, max) of the per-repetition ratios candidate / reference."""
    ratios = [c / r for c, r in zip(candidate, reference)]
    return statistics.median(ratios), (min(ratios), max(ratios))


def ratio_figure(
    group: str,
    name: str,
    times: dict[str, list[float]],
    candidate: str,
    reference: str,
    target: float | None,
    detail: str = "",
) -> Figure:
    median, spread = ratio_stats(times[candidate], times[reference])
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    detail = (detail + "; " if detail else "") + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
    return Figure(group, name, median, "×", target, spread=spread, reps=len(times[candidate]), detail=detail,
                  extra={"median_ms": ms})  # fmt: skip


# --- memory --------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident set size of this process while the ``with`` block runs, sampled by a thread.

    Torch releases the GIL inside its kernels, so the sampler keeps running during forward and backward;
    a peak shorter than the sampling interval can be missed.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)


# --- workload ------------------------------------------------------------------------------------


def fixed_text_batch(tokenizer, batch_size: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` training examples of tweets-sentiment, padded or cut to exactly ``length`` tokens.

    The shape is fixed (no dynamic trimming) so every step of every contender does the same work.
    """
    from engine.data import load_data
    from engine.spec import DatasetSpec

    spec = DatasetSpec(max_train=batch_size, max_eval=1, max_length=length)
    split = load_data(spec, tokenizer).train
    return {k: v.to(device) for k, v in split.tensors.items()}


def device_from(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


# --- machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- output --------------------------------------------------------------------------------------


def print_table(figures: list[Figure]) -> None:
    rows = [("figure", "value", "spread (min–max)", "target", "result", "detail")]
    for f in figures:
        spread = f"{format_value(f.spread[0], f.unit)} – {format_value(f.spread[1], f.unit)}" if f.spread else ""
        rows.append((f.name, format_value(f.value, f.unit), spread, f.target_text(), f.status, f.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + " | " + row[5], flush=True)
        if i == 0:
            print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)


def write_json(path: str, figures: list[Figure], meta: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "figures": [fig.to_json() for fig in figures]}, f, indent=2, default=str)
