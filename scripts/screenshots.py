"""Screenshots of every dashboard view, for the docs: ``python scripts/screenshots.py --url URL --out DIR``.

Point it at a running dashboard (``./run_app.sh``) whose database holds finished runs. It picks the runs to show
from that database (the newest succeeded run of each method), opens every page in headless Chromium and saves
one full-page PNG per view. Views that need a computed analysis (spectra, landscape) show it only when it is
stored: compute those first with ``python -m app.cli analyze``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import store  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1400, 1000


def pick_model(model: str | None) -> str:
    """``model``, or the model with the most succeeded runs."""
    if model:
        return model
    models = [r["model"] for r in store.list_runs(status=["succeeded"], limit=None)]
    if not models:
        raise SystemExit("no succeeded runs in this database: train some first")
    return max(set(models), key=models.count)


def newest_by_method(model: str) -> dict[str, list[str]]:
    """Succeeded run ids of ``model`` per method, newest first."""
    runs: dict[str, list[str]] = {}
    for run in store.list_runs(status=["succeeded"], limit=None):
        if run["model"] == model:
            runs.setdefault(run["method"], []).append(run["id"])
    return runs


def views(runs: dict[str, list[str]], model: str) -> list[tuple[str, str]]:
    """(file name, page path with query) for every view worth a picture."""
    first = lambda method: (runs.get(method) or [None])[0]  # noqa: E731
    lora = first("lora")
    overlay = [r for r in (lora, first("neat"), first("full")) if r]
    with_landscape = [r for rs in runs.values() for r in rs if store.list_artifacts(r, "analysis:landscape")]
    pages = [("launch", ""), ("runs", "runs"), ("compare", f"compare?model={model}&group=name")]
    if lora:
        pages += [("run_detail", f"run_detail?run={lora}"), ("export", f"export?run={lora}")]
    if with_landscape:
        pages.append(("landscape", f"landscape?run={with_landscape[0]}"))
    if overlay:
        pages.append(("spectra", f"spectra?run={','.join(overlay)}"))
    for method in ("heat", "pear", "lily"):
        if first(method):
            pages.append((f"importance_{method}", f"importance?run={first(method)}"))
    study = pick_study()
    if study:
        pages.append(("study", f"study?study={study}"))
    merged = pick_merged_run()
    if merged:
        pages.append(("merge", f"merge?run={merged}"))
    return pages


def pick_merged_run() -> str | None:
    """The newest run with kept checkpoints that has merges (the Merge page then shows them all)."""
    from db import merges

    for run in store.list_runs(status=["succeeded"], limit=None):
        kept = run["executor"] != "merge" and store.list_artifacts(run["id"], "trajectory")
        if kept and merges.merges_of([run["id"]]):
            return run["id"]
    return None


def pick_study() -> str | None:
    """The finished study with the most trials, those with an ASHA scheduler first (they show stopped trials)."""
    from db import studies

    done = [s for s in studies.list_studies() if s["status"] == "succeeded"]
    ranked = sorted(done, key=lambda s: ("asha" in str(s["spec"].get("scheduler")), s["n_trials"]), reverse=True)
    return ranked[0]["id"] if ranked else None


def settle(page, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Wait until Streamlit has been idle (no running script, no stale element) for ``quiet_s``."""
    running = page.locator('[data-testid="stStatusWidget"]')
    stale = page.locator('[data-testid="stElementContainer"][data-stale="true"]')
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if (running.count() and running.first.is_visible()) or stale.count():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{page.url} kept running for {timeout_s} s")


def full_page_screenshot(page, path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """The whole page as a PNG. Streamlit scrolls its main block, not the document, so the viewport is grown to
    the content's height first (and put back afterwards)."""
    content = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight")
    page.set_viewport_size({"width": width, "height": max(height, int(content) + 120)})
    page.wait_for_timeout(800)  # charts redraw at the new size
    settle(page)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": height})
    return path


def shoot(url: str, out: Path, only: set[str] | None, model: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}).new_page()
        page.goto(url)  # the home page first: it sets up the navigation that deep links then use
        page.locator('[data-testid="stMain"] h1').first.wait_for(timeout=120_000)
        settle(page)
        for name, path in views(newest_by_method(model), model):
            if only and name not in only:
                continue
            page.goto(f"{url.rstrip('/')}/{path}")
            page.locator('[data-testid="stMain"] h1').first.wait_for(timeout=120_000)
            settle(page)
            saved.append(full_page_screenshot(page, out / f"{name}.png"))
            print(saved[-1], flush=True)
        browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--out", default="docs/screenshots", type=Path)
    parser.add_argument("--only", default="", help="comma-separated view names (default: all)")
    parser.add_argument("--model", help="show runs of this model (default: the one with the most finished runs)")
    args = parser.parse_args(argv)
    shoot(args.url, args.out, set(filter(None, args.only.split(","))) or None, pick_model(args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
