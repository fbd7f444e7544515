"""Where exports go and how they are written: export roots, safe path resolution, atomic staged writes.

Every export is written into a temporary directory beside the target and renamed into place, with a
``manifest.json`` holding the sha256 of every file; output names that leave the export root (``..``, absolute
paths elsewhere, symlinks) are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.artifacts import MANIFEST_FILE, ExportError, sha256_file

FORMAT_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class UnsafePathError(ExportError):
    """An output name that would leave the export root."""


def lab_version() -> str:
    """``peftlab <version>``, from the installed package metadata or the project's ``pyproject.toml``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"peftlab {version('peftlab')}"
    except PackageNotFoundError:
        pyproject = PROJECT_ROOT / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return f"peftlab {found.group(1) if found else 'unknown'}"


def command_line_export_root() -> Path:
    """The command line's export root: ``PEFTLAB_EXPORTS`` if set, else the current directory.

    Never derived from the output path itself (an output's own parent would let any absolute path through).
    """
    return Path(os.environ.get("PEFTLAB_EXPORTS") or Path.cwd())


def resolve_export_dir(out: str | Path, root: str | Path) -> Path:
    """The directory ``out`` (relative to ``root``, or absolute inside it), refusing anything that leaves ``root``.

    The caller chooses the root: the Export page's is ``db.config.exports_root()``, the command line's
    ``command_line_export_root()``.

    Refused, each with a one-line ``UnsafePathError`` naming the path and the fix: an empty name, any ``..``
    component (``../x``, ``/tmp/x/../../y``), an absolute path outside the root, the root itself, and a symlink
    anywhere between the root and the target (a link could redirect the write even when the name looks inside).
    The result is resolved (symlinks of the root itself included) and checked to lie inside the resolved root.
    """
    given_root = Path(root).expanduser().absolute()
    given_root.mkdir(parents=True, exist_ok=True)
    root_path = given_root.resolve()
    if not str(out).strip():
        raise UnsafePathError(f"the export name is empty: give a directory name inside the export root {root_path}")
    out_path = Path(out)
    if ".." in out_path.parts:
        raise UnsafePathError(
            f"export path {str(out)!r} contains '..': give a directory name inside the export root {root_path}"
        )
    relative = out_path
    if out_path.is_absolute():
        # An absolute path may name the root as given or with its symlinks resolved.
        inside = [out_path.relative_to(r) for r in (given_root, root_path) if out_path.is_relative_to(r)]
        if not inside:
            raise UnsafePathError(
                f"export path {out_path} is outside the export root {root_path}: give a name inside it "
                "(the command line's root is PEFTLAB_EXPORTS, or the current directory)"
            )
        relative = inside[0]
    if not relative.parts:
        raise UnsafePathError(
            f"export path {str(out)!r} is the export root {root_path} itself: give a directory name inside it"
        )
    current = root_path
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePathError(
                f"export path {str(out)!r} goes through the symlink {current}: symlinks are refused, give a plain "
                f"directory inside the export root {root_path}"
            )
    resolved = (root_path / relative).resolve()
    if root_path not in resolved.parents:
        raise UnsafePathError(
            f"export path {str(out)!r} resolves to {resolved}, outside the export root {root_path}: give a directory "
            "name inside the root"
        )
    return resolved


def _file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST_FILE:
            entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def staging_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` (same filesystem, so the final rename is atomic), mode 0755."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users of a shared artifact root
    return staging


@contextmanager
def staged_directory(target: Path, *, fmt: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; on success add ``manifest.json`` and rename it.

    On any error the temporary directory is removed, so the target is either the complete export or untouched.
    An existing non-empty target is replaced only with ``overwrite`` (the old one is moved aside, then deleted).
    """
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{target} already exists and is not empty: choose another name or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        yield staging
        manifest = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "lab_version": lab_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": _file_entries(staging),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
