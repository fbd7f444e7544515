"""Where PEFT Lab keeps its state, configured by environment (the MLflow model).

- ``PEFTLAB_HOME``: local state directory (default ``.peftlab`` in the project root).
- ``PEFTLAB_DB_URL``: any SQLAlchemy URL (default: a SQLite file in the home directory).
- ``PEFTLAB_ARTIFACTS``: artifact root shared by every worker (default: ``artifacts`` in the home).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    path = Path(os.environ.get("PEFTLAB_HOME", PROJECT_ROOT / ".peftlab")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_url() -> str:
    return os.environ.get("PEFTLAB_DB_URL") or f"sqlite:///{home() / 'peftlab.db'}"


def artifacts_root() -> Path:
    path = Path(os.environ.get("PEFTLAB_ARTIFACTS", home() / "artifacts")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(run_id: str) -> Path:
    """The artifact directory of one run (created on demand)."""
    path = artifacts_root() / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def home_env(path: Path) -> dict[str, str]:
    """The environment that puts everything PEFT Lab keeps (database, artifacts, exports) below ``path``."""
    return {
        "PEFTLAB_HOME": str(path),
        "PEFTLAB_DB_URL": f"sqlite:///{path / 'lab.db'}",
        "PEFTLAB_ARTIFACTS": str(path / "artifacts"),
        "PEFTLAB_EXPORTS": str(path / "exports"),
    }
