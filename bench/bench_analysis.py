"""Benchmark the two fast paths of the analyses against their references, measured in the same run.

(a) Rank spectra of every adapted layer from the LoRA factors (QR + SVD of the r × r core) against a dense
    ``torch.linalg.svdvals`` of each materialised ΔW. Target ratio ≤ 0.1.
(b) A 2-D loss landscape evaluated in vmapped chunks against the naive loop (one in-place write and one forward
    per grid point). Target ratio ≤ 0.5.

Each repetition times the reference and the candidate back to back (alternating which goes first), and the
report gives the median and the spread (min–max) of the per-repetition ratios, with the median absolute times.
The model is MiniLM-L6 with LoRA r = 8 on q, v, o, fc1, fc2; B is filled with noise so ΔW is a real rank-8
update. Run on demand::

    python bench/bench_analysis.py [--reps 5] [--steps 21] [--examples 16] [--length 32] [--threads 2]
                                   [--landscape-model tiny-bert] [--device cuda] [--skip spectra|landscape]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.analysis.landscape import landscape_2d  # noqa: E402
from engine.analysis.spectra import adapter_spectra  # noqa: E402
from engine.data import iterate_batches, load_data, read_raw  # noqa: E402
from engine.methods import build_method  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.spec import DatasetSpec  # noqa: E402
from engine.train import classification_loss  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    name: str,
    reference: Callable[[], object],
    candidate: Callable[[], object],
    reps: int,
    target: float,
    warmup: Callable[[], object] | None = None,
) -> float:
    """Time both ``reps`` times (alternating order) and print the ratio candidate / reference."""
    if warmup is None:  # first calls pay for allocation and lazy initialisation
        reference(), candidate()
    else:
        warmup()
    ref_times, cand_times = [], []
    for rep in range(reps):
        if rep % 2 == 0:
            ref_times.append(timed(reference))
            cand_times.append(timed(candidate))
        else:
            cand_times.append(timed(candidate))
            ref_times.append(timed(reference))
    ratios = [c / r for c, r in zip(cand_times, ref_times)]
    median = statistics.median(ratios)
    print(
        f"{name}: ratio median {median:.4f} (min {min(ratios):.4f}, max {max(ratios):.4f}; target ≤ {target}) "
        f"{'OK' if median <= target else 'MISSED'} | reference median {statistics.median(ref_times) * 1000:.1f} ms, "
        f"candidate median {statistics.median(cand_times) * 1000:.1f} ms, {reps} repetitions",
        flush=True,
    )
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per comparison")
    parser.add_argument("--steps", type=int, default=21, help="landscape grid points per axis")
    parser.add_argument("--examples", type=int, default=16, help="evaluation examples for the landscape")
    parser.add_argument("--length", type=int, default=32, help="token length of the evaluation examples")
    parser.add_argument("--chunk-size", type=int, default=32, help="grid points per vmapped forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--landscape-model", default="minilm-l6", help="model of (b), e.g. tiny-bert")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip", choices=["spectra", "landscape"], default=None, help="skip one benchmark")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    raw = read_raw(DatasetSpec())
    model = load_model("minilm-l6", len(raw.label_names))
    method = build_method("lora", {"rank": 8, "alpha": 16, "target_roles": ["q", "v", "o", "fc1", "fc2"]})
    method.apply(model)
    with torch.no_grad():
        for layer in method.adapted_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.02)
    model = model.to(device).eval()
    layers = method.adapted_layers(model)
    print(
        f"minilm-l6 + LoRA r=8 on q,v,o,fc1,fc2: {len(layers)} adapted layers; device {device}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    if args.skip != "spectra":
        compare(
            "(a) spectra, factors vs dense SVD",
            lambda: adapter_spectra(model, use_factors=False, intruder_k=0),
            lambda: adapter_spectra(model, use_factors=True, intruder_k=0),
            args.reps,
            0.1,
        )

    if args.skip != "landscape":
        if args.landscape_model != "minilm-l6":
            torch.manual_seed(0)
            model = load_model(args.landscape_model, len(raw.label_names))
            build_method("lora", {"rank": 8, "alpha": 16, "target_roles": ["q", "v", "o", "fc1", "fc2"]}).apply(model)
            model = model.to(device).eval()
        data = load_data(DatasetSpec(max_eval=args.examples, max_length=args.length), model.tokenizer, raw)
        batches = list(iterate_batches(data.eval, args.examples, shuffle=False))[:1]
        kwargs = dict(model_loss=classification_loss, steps=args.steps, span=1.0, seed=0)
        compare(
            f"(b) {args.landscape_model}: {args.steps}x{args.steps} landscape on {len(batches[0]['labels'])} examples "
            f"of {batches[0]['input_ids'].shape[1]} tokens, vmap vs naive loop",
            lambda: landscape_2d(model, batches, batched=False, **kwargs),
            lambda: landscape_2d(model, batches, batched=True, chunk_size=args.chunk_size, **kwargs),
            args.reps,
            0.5,
            warmup=lambda: [
                landscape_2d(model, batches, batched=b, chunk_size=args.chunk_size, **(kwargs | {"steps": 3}))
                for b in (False, True)
            ],
        )


if __name__ == "__main__":
    main()
