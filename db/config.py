"""Where PEFT Lab keeps its state, configured by environment (the MLflow model).

- ``PEFTLAB_HOME``: local state directory (default ``.peftlab`` in the project root).
- ``PEFTLAB_DB_URL``: any SQLAlchemy URL (default: a SQLite file in the home directory), e.g.
  ``postgresql+psycopg://user:password@host/peftlab`` for a database every node of a cluster reaches.
- ``PEFTLAB_ARTIFACTS``: artifact root shared by every worker (default: ``artifacts`` in the home).
- ``PEFTLAB_EXPORTS``: export root of the Export page (default: ``exports`` in the home; the command line's is
  ``engine.export.command_line_export_root``).

The home and the artifact root are readable by their owner only (mode 0700), and so is the SQLite database
(0600, ``db.store.get_engine``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or tighten it to 0700 if it exists with wider modes and is ours.

    The mode is set with ``chmod`` after ``mkdir``, so it does not depend on the umask. A directory owned by
    someone else is left as it is (we could not change it).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o777 != 0o700:
        path.chmod(0o700)
    return path


def home() -> Path:
    return private_dir(Path(os.environ.get("PEFTLAB_HOME", PROJECT_ROOT / ".peftlab")).resolve())


def db_url() -> str:
    return os.environ.get("PEFTLAB_DB_URL") or f"sqlite:///{home() / 'peftlab.db'}"


def artifacts_root() -> Path:
    return private_dir(Path(os.environ.get("PEFTLAB_ARTIFACTS", home() / "artifacts")).resolve())


def exports_root() -> Path:
    """The Export page's export root: ``PEFTLAB_EXPORTS`` if set, else ``exports`` in the home directory."""
    return Path(os.environ.get("PEFTLAB_EXPORTS") or home() / "exports")


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


class DatabaseError(RuntimeError):
    """The database cannot be opened (a bad ``PEFTLAB_DB_URL``, a server that does not answer, a missing driver).

    Its message is one line naming ``PEFTLAB_DB_URL`` (its password hidden) and the fix; the cause is chained.
    """


def hide_password(url: str) -> str:
    """``url`` as shown in messages: its password replaced by ``***``, even when SQLAlchemy cannot parse it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL: hide whatever sits between "user:" and "@"
        return re.sub(r"^((?:[\w+.-]+://)?[^/:@]*:)[^/@]*@", r"\1***@", url)


def db_location(url: str | None = None) -> str:
    """The database URL (``url``, else the configured one) as shown in messages (a password in it is hidden)."""
    return hide_password(url or db_url())
