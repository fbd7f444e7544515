"""Security: imported files cannot run code, exports cannot leave their root, the lab's state is private.

- An adapter folder whose config asks for ``trust_remote_code`` and names, as its base model, a folder with a
  Python file (``auto_map``) that would write a marker when imported: the real CLI imports with trust off (or
  refuses in one line), the marker never appears, and the recorded spec says ``trust_remote_code: false``.
- A pickled checkpoint in such a model folder is refused without being unpickled.
- ``app.cli export`` refuses every way out of the export root (``..``, absolute paths elsewhere, a symlinked
  folder, the root itself) and writes nothing outside it.
- ``PEFTLAB_HOME`` and the artifact root are 0700, the SQLite database 0600, whatever the umask.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from app.cli import main
from db import config, store
from engine.methods import build_method
from engine.models import load_model, minilm_path
from engine.spec import parse_spec
from tests.conftest import ROOT, tiny_spec

# Imported by transformers only when remote code is trusted; it leaves a marker file behind.
EVIL_MODULE = "from pathlib import Path\n\nPath({marker!r}).write_text('remote code ran')\n"
AUTO_MAP = {
    "AutoConfig": "evil.EvilConfig",
    "AutoModelForSequenceClassification": "evil.EvilForSequenceClassification",
    "AutoTokenizer": ["evil.EvilTokenizer", None],
}


def cli_subprocess(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python -m app.cli ARGV`` in a fresh process, on the test's PEFT Lab home, offline; remote code (if it ever
    ran) would be copied into a modules cache under ``tmp_path``, not the user's."""
    env = os.environ | {
        "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(stderr: str, *words: str) -> str:
    """stderr ends with exactly one ``error: ...`` line holding ``words``, and holds no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def armed_config(directory: Path, marker: Path, model_type: str) -> None:
    """Give ``directory`` a config whose ``auto_map`` points at ``evil.py``, which writes ``marker`` on import."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.update({"model_type": model_type, "architectures": ["EvilForSequenceClassification"], "auto_map": AUTO_MAP})
    path.write_text(json.dumps(cfg))
    (directory / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))


def armed_bert(directory: Path, marker: Path) -> None:
    """tiny-bert saved as safetensors with its tokenizer, its config armed (model type still ``bert``)."""
    from transformers import AutoTokenizer

    load_model("tiny-bert", 3).net.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(directory))
    armed_config(directory, marker, "bert")


def native_adapter(directory: Path, model: str) -> None:
    """A native adapter folder whose config names ``model`` and asks for trust_remote_code everywhere it could."""
    directory.mkdir(parents=True)
    method = build_method("lora", {"rank": 2})
    spec = tiny_spec(model=model, trust_remote_code=True)
    meta = {"method": "lora", "method_config": method.config.model_dump(mode="json"), "model": model,
            "num_labels": 3, "spec": spec, "trust_remote_code": True}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    save_file({"net.classifier.weight": torch.zeros(3, 32)}, str(directory / "adapter.safetensors"))


def test_import_never_runs_the_code_of_a_model_named_by_the_files(lab_env, tmp_path):
    marker = tmp_path / "remote-code-ran"
    model_dir = tmp_path / "evil-model"
    model_dir.mkdir()
    armed_config(model_dir, marker, "peftlab-evil")  # a model type only its own code defines
    native_adapter(tmp_path / "adapter", str(model_dir))

    done = cli_subprocess(tmp_path, "import", str(tmp_path / "adapter"))
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, str(model_dir), "trust_remote_code", "--trust-remote-code")
    assert not marker.exists()
    assert store.list_runs() == [] and os.listdir(config.artifacts_root()) == []

    # The folder is armed: trusting it would have run evil.py (a control, in a throwaway process).
    control = (
        "from transformers import AutoConfig\n"
        "try:\n"
        f"    AutoConfig.from_pretrained({str(model_dir)!r}, trust_remote_code=True)\n"
        "except AttributeError:\n"
        "    pass  # evil.py defines no classes: it only leaves the marker\n"
    )
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", control], env=env, check=True, timeout=300, capture_output=True)
    assert marker.read_text() == "remote code ran"


def test_peft_adapter_on_an_armed_model_imports_with_trust_off(lab_env, tmp_path, capsys):
    """A known model type with an ``auto_map``: imported with the library's own classes, evil.py never imported,
    and the run (its analyses and exports too) keeps trust off although every file asks for it."""
    marker = tmp_path / "remote-code-ran"
    model_dir = tmp_path / "armed-bert"
    armed_bert(model_dir, marker)
    base = load_model(str(model_dir), 3)
    peft_model = get_peft_model(base.net, LoraConfig(r=2, target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))  # fmt: skip
    adapter = tmp_path / "peft-adapter"
    peft_model.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    lab = {"model": str(model_dir), "num_labels": 3, "spec": tiny_spec(model=str(model_dir), trust_remote_code=True)}
    (adapter / "peftlab.json").write_text(json.dumps(lab))
    assert not marker.exists()

    done = cli_subprocess(tmp_path, "import", str(adapter), "--json")
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    assert not marker.exists()
    run = store.get_run(run_id)
    assert run["executor"] == "import" and run["spec"]["trust_remote_code"] is False

    # Its analyses and exports read the run's spec, not the adapter_config.json in its artifacts (which asks).
    stored = json.loads((config.run_dir(run_id) / "adapter_config.json").read_text())
    assert stored["spec"]["trust_remote_code"] is True
    assert main(["analyze", run_id, "--kind", "spectra", "--json"]) == 0
    assert main(["export", run_id, "--format", "merged", "--out", "merged", "--json"]) == 0
    capsys.readouterr()
    assert not marker.exists()


def test_pickled_checkpoint_of_a_named_model_is_refused_unread(lab_env, tmp_path, capsys):
    marker = tmp_path / "pickle-ran"

    class Payload:  # unpickling it would run exec(...) and leave the marker
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pickle ran')",))

    model_dir = tmp_path / "pickled-bert"
    net = load_model("tiny-bert", 3).net
    net.config.save_pretrained(str(model_dir))
    torch.save({**net.state_dict(), "payload": Payload()}, model_dir / "pytorch_model.bin")
    native_adapter(tmp_path / "adapter", str(model_dir))

    assert main(["import", str(tmp_path / "adapter")]) == 2
    assert_one_line_error(capsys.readouterr().err, str(model_dir), "safetensors")
    assert not marker.exists() and store.list_runs() == []


# --- export paths --------------------------------------------------------------------------------------


def trained_run(tmp_path: Path, capsys) -> str:
    """A 4-step tiny-bert LoRA run trained by ``app.cli run``; its id."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(train={"max_steps": 4})))
    assert main(["run", str(spec_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "succeeded", result["error"]
    return result["run_id"]


def listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")) if directory.exists() else []


def test_export_outside_the_root_is_refused_by_every_path_trick(lab_env, tmp_path, capsys, monkeypatch):
    run_id = trained_run(tmp_path, capsys)
    outside = tmp_path / "outside"
    outside.mkdir()
    system_path = Path(f"/etc/peftlab-security-test-{uuid.uuid4().hex[:8]}")

    def refused(out: str) -> None:
        code = main(["export", run_id, "--format", "native", "--out", out])
        err = capsys.readouterr().err
        assert code == 2, f"{out!r} was not refused"
        assert_one_line_error(err, "export")

    # The root is PEFTLAB_EXPORTS when set, else the current directory; never the output's own parent.
    exports_root = Path(os.environ["PEFTLAB_EXPORTS"])
    cwd_root = tmp_path / "work"
    cwd_root.mkdir()
    try:
        for root, use_cwd in ((exports_root, False), (cwd_root, True)):
            if use_cwd:
                monkeypatch.delenv("PEFTLAB_EXPORTS")
                monkeypatch.chdir(cwd_root)
            root.mkdir(parents=True, exist_ok=True)
            (root / "link").symlink_to(outside, target_is_directory=True)
            tricks = [
                "../x",  # relative '..'
                "a/../../x",
                str(system_path),  # absolute, elsewhere
                str(outside / "abs"),  # absolute, a sibling of the root (the old CLI took its parent as the root)
                f"{root}/../../y",  # absolute, inside by its prefix, '..' out
                f"{root}/../{root.name}/z",  # '..' that would land back inside: refused all the same
                "link/inside",  # a symlinked folder inside the root that points outside
                str(root / "link" / "inside"),
                "link",
                ".",  # the root itself
                str(root),
                "",
            ]
            for out in tricks:
                refused(out)
            assert listing(root) == ["link"], listing(root)
            assert listing(outside) == [] and not system_path.exists()
            assert not (root.parent.parent / "y").exists() and not (root.parent / "x").exists()

            # An absolute path inside the root works, and so does a plain relative name.
            for out, expected in ((str(root / "nested" / "ok"), root / "nested" / "ok"), ("rel", root / "rel")):
                assert main(["export", run_id, "--format", "native", "--out", out, "--json"]) == 0
                written = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path"])
                assert written == expected.resolve() and (written / "adapter.safetensors").is_file()
        assert listing(outside) == []

        # Only the flag records trust_remote_code for an imported run (tiny-bert has no code of its own to run).
        for flag, expected in (([], False), (["--trust-remote-code"], True)):
            assert main(["import", str(cwd_root / "rel"), "--json", *flag]) == 0
            new_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"]
            assert store.get_run(new_id)["spec"]["trust_remote_code"] is expected
    finally:
        if system_path.exists():  # only if the refusal failed: do not leave it behind
            shutil.rmtree(system_path, ignore_errors=True)


def test_resolve_export_dir_accepts_the_root_through_a_symlink(tmp_path):
    """A root reached through a symlink (``/tmp`` → ``/private/tmp``): absolute names under either spelling."""
    from engine.export import UnsafePathError, resolve_export_dir

    real = tmp_path / "real-root"
    real.mkdir()
    alias = tmp_path / "alias-root"
    alias.symlink_to(real, target_is_directory=True)
    assert resolve_export_dir(str(alias / "a"), root=alias) == real / "a"
    assert resolve_export_dir(str(real / "b"), root=alias) == real / "b"
    with pytest.raises(UnsafePathError, match="export root"):
        resolve_export_dir(str(alias), root=alias)


# --- private state -------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_and_database_are_private_whatever_the_umask(lab_env, tmp_path, monkeypatch):
    previous = os.umask(0)  # the modes must not depend on it
    try:
        run_id = store.create_run(parse_spec(tiny_spec()).model_dump(mode="json"))
        config.run_dir(run_id)
    finally:
        os.umask(previous)
    database = Path(os.environ["PEFTLAB_DB_URL"].removeprefix("sqlite:///"))
    assert database.parent == lab_env
    assert mode(config.home()) == 0o700 and mode(config.artifacts_root()) == 0o700
    assert mode(database) == 0o600
    for suffix in ("-wal", "-shm"):
        sidecar = database.with_name(database.name + suffix)
        assert not sidecar.exists() or mode(sidecar) == 0o600

    # An existing home and database with wider modes are tightened.
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    wide.chmod(0o755)
    for key, value in config.home_env(wide).items():
        monkeypatch.setenv(key, value)
    old_db = wide / "lab.db"
    old_db.touch()
    old_db.chmod(0o644)
    store.get_engine.cache_clear()
    config.run_dir(store.create_run(parse_spec(tiny_spec()).model_dump(mode="json")))
    assert mode(wide) == 0o700 and mode(old_db) == 0o600 and mode(config.artifacts_root()) == 0o700
    store.get_engine.cache_clear()
