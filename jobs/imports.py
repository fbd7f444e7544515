"""Record an exported adapter (native or Hugging Face PEFT) as a run: the database side of an import.

The engine reads, validates and stages the files (``engine.export.plan_import``, ``write_imported_files``); this
module gives the run its id and artifact directory and writes its row and artifacts (the engine never writes the
database).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from db import config, store
from db.schema import utcnow
from engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from engine.export import README_FILE, plan_import, write_imported_files


def record_import(
    directory: str | Path,
    *,
    name: str | None = None,
    experiment: str | None = None,
    dataset: str | None = None,
    model_name: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """Record an exported adapter as a succeeded run (executor ``import``); returns the run id.

    The adapter is first loaded into its base model (so a corrupt or mismatched adapter creates nothing), then
    its files are staged in the artifact root and renamed into the run's directory (native files are copied
    byte for byte), the run row is created and every file is recorded as an artifact with its sha256. On any
    failure the run row and its directory are removed.

    The base model runs its repository's Python only with ``trust_remote_code=True`` (the CLI's
    ``--trust-remote-code``); the run's recorded spec holds that choice, so later analyses and exports of the run
    follow it, and a ``trust_remote_code`` in the imported files is ignored.
    """
    plan = plan_import(
        directory, name=name, experiment=experiment, dataset=dataset, model_name=model_name,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    run_id = store.new_run_id()
    target = config.artifacts_root() / run_id
    created = False
    try:
        write_imported_files(plan.imported, target)
        store.create_run(plan.spec, executor="import", run_id=run_id, status="succeeded")
        created = True
        now = utcnow()
        store.update_run(run_id, progress=1.0, started_at=now, finished_at=now, device="import",
                         trainable_params=plan.trainable_params, total_params=plan.total_params,
                         summary=plan.summary)  # fmt: skip
        for kind, file in (
            ("adapter", ADAPTER_FILE),
            ("adapter_config", ADAPTER_CONFIG_FILE),
            ("model_card", README_FILE),
        ):
            if (target / file).is_file():
                store.add_artifact(run_id, kind, target / file)
    except BaseException:
        if created:
            store.delete_run(run_id)
        shutil.rmtree(target, ignore_errors=True)
        raise
    return run_id
