"""``importance``: the tables a method recorded during training, in ``analysis/importance.json``.

``engine.analysis.importance.artifact_tables`` reads the method's analysis data (``<method>_analysis.json``,
artifact ``method_analysis``); the per-layer norm profile (artifact ``norm_profile``,
``LayerNormProfiler.to_dict()``) is added when the run has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from engine.analysis.kinds.base import (
    Analysis,
    AnalysisError,
    AnalysisInputs,
    AnalysisParams,
    Progress,
    register_analysis,
)


class ImportanceParams(AnalysisParams):
    """Importance tables have no settings: they are read from what the method recorded during training."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def save_importance(tables: dict[str, pd.DataFrame], path: str | Path, meta: dict[str, Any]) -> Path:
    """Write the tables (columns and records; NaN as null) and ``meta`` to one JSON file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "artifact": "importance",
        **meta,
        "tables": {
            name: {"columns": list(t.columns), "records": t.astype(object).where(t.notna(), None).to_dict("records")}
            for name, t in tables.items()
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)
    return path


def load_importance(path: str | Path) -> dict[str, pd.DataFrame]:
    """The tables ``save_importance`` wrote."""
    import pandas as pd

    data = json.loads(Path(path).read_text())
    if data.get("artifact") != "importance":
        raise ValueError(f"{path} is not an importance artifact (artifact = {data.get('artifact')!r})")
    return {name: pd.DataFrame(t["records"], columns=t["columns"]) for name, t in data["tables"].items()}


@register_analysis
class Importance(Analysis):
    kind = "importance"
    order = 20
    params_cls = ImportanceParams
    needs = ("method_analysis", "norm_profile")
    suffixes = (".json",)

    def check(self, inputs: AnalysisInputs) -> None:
        if not any(inputs.artifacts.values()):
            run = inputs.run
            raise AnalysisError(
                f"run {run['id']} (method {run['method']}) has no method_analysis or norm_profile artifact: "
                "importance tables come from what a method records during training (e.g. heat's head scores, pear's "
                "position scores, mola's router loads); pick a run of such a method"
            )

    def compute(
        self, inputs: AnalysisInputs, params: ImportanceParams, record: dict, json_path: Path, progress: Progress
    ) -> None:
        from engine.analysis.importance import artifact_tables, norm_profile_table

        run_id = inputs.run["id"]
        tables: dict[str, pd.DataFrame] = {}
        sources: dict[str, str] = {}
        for source in self.needs:
            path = inputs.artifacts.get(source)
            if path is None:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise AnalysisError(f"run {run_id}: artifact {source} ({path}) cannot be read: {err}") from None
            sources[source] = str(path)
            if source == "method_analysis":
                tables |= artifact_tables(data)
            else:
                tables["norm_profile"] = norm_profile_table(data)
        meta = {"run_id": run_id, "method": inputs.run["method"], "sources": sources, "analysis": record}
        save_importance(tables, json_path, meta)

    def load(self, json_path: Path) -> dict[str, pd.DataFrame]:
        return load_importance(json_path)

    def headline(self, json_path: Path) -> dict[str, Any]:
        """Each table's rows and columns."""
        tables = self.load(json_path)
        return {"tables": {name: {"rows": len(t), "columns": list(t.columns)} for name, t in tables.items()}}
