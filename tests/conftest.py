"""Shared fixtures. Tests run against real components: a SQLite file, a local Ray head, Streamlit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def lab_env(tmp_path, monkeypatch):
    """A fresh PEFT Lab home (SQLite file + artifact root) for one test."""
    from db import store

    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PEFTLAB_DB_URL", f"sqlite:///{tmp_path / 'home' / 'lab.db'}")
    monkeypatch.setenv("PEFTLAB_ARTIFACTS", str(tmp_path / "home" / "artifacts"))
    store.get_engine.cache_clear()
    yield tmp_path / "home"
    store.get_engine.cache_clear()


def tiny_text_batch(model, n: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(n, dtype=torch.long)}


def tiny_image_batch(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, 8, 8, generator=g), "labels": torch.zeros(n, dtype=torch.long)}


def batch_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_text_batch(model, seed=seed) if model.info.modality == "text" else tiny_image_batch(seed=seed)
