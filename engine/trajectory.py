"""Kept checkpoints: adapter snapshots along one run's training, the inputs of checkpoint merging (MWA).

``train.keep_checkpoints: K`` keeps K checkpoints spread evenly along training (at steps ``⌈i·T/K⌉``, i = 1..K, so
the last one is the final adapter); ``train.checkpoint_every: N`` keeps one every N steps and one at the last step.
Each kept checkpoint is a complete native adapter directory written through the artifact layer
(``engine.artifacts.save_adapter``: ``adapter.safetensors`` + ``adapter_config.json``) under
``checkpoints/step-<step>/`` of the run, and the run's ``trajectory.json`` lists them with

* ``step``: optimizer steps done;
* ``train_loss``: the training loss averaged over the steps since the previous kept checkpoint (since the start for
  the first), the quantity MWA weighs by (Yu & Choi 2025, arXiv 2504.18580; see docs/METHODS.md, "Merging");
* ``eval_loss`` and ``eval_accuracy`` on the run's held-out split, evaluated at that step;
* ``path`` (relative to the run's directory) and the sha256 of its adapter file.

These are not the resume checkpoint (``checkpoint.pt``, ``train.checkpoint_every_steps``), which holds the optimizer
and is overwritten. A resumed run keeps the kept checkpoints up to its resume step and drops later ones (its loop
makes them again); the loss accumulated since the last kept checkpoint travels in the resume checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from engine.artifacts import ADAPTER_FILE, AdapterFileError, save_adapter, sha256_file

if TYPE_CHECKING:
    from engine.spec import TrainSpec
    from engine.train import Prepared

TRAJECTORY_FILE = "trajectory.json"
CHECKPOINTS_DIR = "checkpoints"


def kept_steps(total_steps: int, keep: int | None = None, every: int | None = None) -> list[int]:
    """The steps at which checkpoints are kept: K spread evenly (``⌈i·T/K⌉``, at most one per step) or every N
    steps plus the last one; none when neither is set."""
    if total_steps < 1:
        return []
    if keep:
        k = min(keep, total_steps)
        return sorted({math.ceil(i * total_steps / k) for i in range(1, k + 1)})
    if every:
        return sorted(set(range(every, total_steps + 1, every)) | {total_steps})
    return []


class KeptCheckpoint(BaseModel):
    """One entry of ``trajectory.json``."""

    step: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    path: str  # the checkpoint's adapter directory, relative to the run's directory
    sha256: str  # of its adapter.safetensors


class Trajectory:
    """Keeps the adapter at the planned steps of one run (``engine.train`` calls ``add_loss`` each step and ``keep``
    when ``due``)."""

    def __init__(self, out_dir: Path, steps: list[int]):
        self.out_dir = out_dir
        self.steps = steps
        self.loss_sum, self.loss_n = 0.0, 0
        self.kept: list[KeptCheckpoint] = []

    @classmethod
    def for_run(cls, cfg: TrainSpec, total_steps: int, out_dir: Path) -> Trajectory | None:
        steps = kept_steps(total_steps, cfg.keep_checkpoints, cfg.checkpoint_every)
        return cls(out_dir, steps) if steps else None

    @property
    def index_path(self) -> Path:
        return self.out_dir / TRAJECTORY_FILE

    def add_loss(self, loss: float) -> None:
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1

    def due(self, step: int) -> bool:
        return step in self.steps

    def keep(self, prep: Prepared, step: int, metrics: dict[str, float]) -> KeptCheckpoint:
        """Save the adapter as it is now, with its averaged training loss and ``metrics`` (the evaluation at
        ``step``), and rewrite the index; the loss average starts again."""
        name = f"{CHECKPOINTS_DIR}/step-{step:07d}"
        train_loss = self.loss_sum / max(self.loss_n, 1)
        record = {"step": step, "train_loss": train_loss, "eval_loss": metrics["eval_loss"],
                  "eval_accuracy": metrics["eval_accuracy"]}  # fmt: skip
        weights, _ = save_adapter(prep, self.out_dir / name, extra={"checkpoint": record})
        kept = KeptCheckpoint(**record, path=name, sha256=sha256_file(weights))
        self.kept = [c for c in self.kept if c.step != step] + [kept]
        self.loss_sum, self.loss_n = 0.0, 0
        self._write_index()
        return kept

    def state(self) -> dict[str, float]:
        """What a resume needs besides the files: the loss accumulated since the last kept checkpoint."""
        return {"loss_sum": self.loss_sum, "loss_n": self.loss_n}

    def resume(self, state: dict[str, Any], step: int) -> None:
        """Continue from a resume checkpoint at ``step``: the kept checkpoints up to it stay, later ones go."""
        self.loss_sum, self.loss_n = float(state.get("loss_sum", 0.0)), int(state.get("loss_n", 0))
        found = read_trajectory(self.out_dir) if self.index_path.exists() else []
        self.kept = [c for c in found if c.step <= step]
        for later in (c for c in found if c.step > step):
            shutil.rmtree(self.out_dir / later.path, ignore_errors=True)
        self._write_index()

    def _write_index(self) -> None:
        data = {"planned_steps": self.steps, "checkpoints": [c.model_dump() for c in self.kept]}
        tmp = self.index_path.with_name(TRAJECTORY_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.index_path)


def read_trajectory(run_dir: str | Path) -> list[KeptCheckpoint]:
    """The kept checkpoints of a run directory, by step; an unreadable index raises ``AdapterFileError``."""
    path = Path(run_dir) / TRAJECTORY_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        kept = [KeptCheckpoint.model_validate(c) for c in data["checkpoints"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValidationError) as err:
        raise AdapterFileError(f"{path} is not a valid checkpoint index: {err}") from None
    return sorted(kept, key=lambda c: c.step)


def checkpoint_dir(run_dir: str | Path, kept: KeptCheckpoint) -> Path:
    """A kept checkpoint's adapter directory, its adapter file checked against the sha256 the index recorded."""
    directory = Path(run_dir) / kept.path
    weights = directory / ADAPTER_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{weights} (checkpoint at step {kept.step}) is missing")
    digest = sha256_file(weights)
    if digest != kept.sha256:
        raise AdapterFileError(f"{weights} is corrupt: its sha256 {digest[:12]}… differs from the index's")
    return directory
