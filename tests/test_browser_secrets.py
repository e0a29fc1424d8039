"""No secret in the browser: a person logs in, types a Hub token on the Export tab and pushes; afterwards the
token is in none of the browser's storage (localStorage, sessionStorage, IndexedDB, cookies, Cache Storage),
not in the page, not after a reload, and not in the app's log or any file of the studio home.

Gradio 6's run history used to keep every call's inputs, the typed token included, in localStorage; the
studio turns it off.  The studio runs as ``python app.py`` with ``STUDIO_PASSWORD`` set (``serve_app``), and
Debian's Chromium is driven by Playwright.  The push fails (the tests run offline), which is the path where
a token is most likely to be echoed.
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import CANARY
from e2e_helpers import CHROMIUM_ARGS, VIEWPORT, chromium_path, screenshot, serve_app

from studio.presets import load_preset
from studio.runs import RunStore

pytestmark = pytest.mark.browser

PASSWORD = "browser-test-password"
TYPED = ["s3cret-Typed-Write-Token-77", "hf_TypedInTheBrowserAbcdef123456"]  # one of any shape, one hf_ shaped

DUMP = """async () => {
  const out = {local: {}, session: {}, idb: {}, caches: [], cookie: document.cookie};
  for (let i = 0; i < localStorage.length; i++) { const k = localStorage.key(i); out.local[k] = localStorage.getItem(k); }
  for (let i = 0; i < sessionStorage.length; i++) { const k = sessionStorage.key(i); out.session[k] = sessionStorage.getItem(k); }
  if (indexedDB.databases) {
    for (const db of await indexedDB.databases()) {
      out.idb[db.name] = await new Promise(resolve => {
        const req = indexedDB.open(db.name);
        req.onerror = () => resolve("unreadable");
        req.onsuccess = () => {
          const d = req.result, names = Array.from(d.objectStoreNames), rows = {};
          if (!names.length) { d.close(); resolve(rows); return; }
          const tx = d.transaction(names, "readonly");
          let left = names.length;
          names.forEach(n => { const g = tx.objectStore(n).getAll();
            g.onsuccess = () => { rows[n] = g.result; if (--left === 0) { d.close(); resolve(rows); } };
            g.onerror = () => { rows[n] = "unreadable"; if (--left === 0) { d.close(); resolve(rows); } }; });
        };
      });
    }
  }
  if (window.caches) out.caches = await caches.keys();
  return out;
}"""


def _finished_run() -> str:
    run = RunStore().create(load_preset("tiny-demo"), "finished-run")
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"{}")
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    run.emit("status", status="completed", step=1)
    return run.id


def _login(page, url: str) -> None:
    page.goto(url)
    page.get_by_label(re.compile("username", re.I)).fill("admin")
    page.get_by_label(re.compile("password", re.I)).fill(PASSWORD)
    page.get_by_role("button", name=re.compile("login", re.I)).click()
    expect(page.get_by_role("tab", name="6 · Export")).to_be_visible(timeout=60_000)


def test_a_typed_hub_token_reaches_no_browser_storage_page_or_file(studio_home, tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("STUDIO_PASSWORD", PASSWORD)
    run_id = _finished_run()
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            _login(page, url)
            page.get_by_role("tab", name="6 · Export").click()
            expect(page.locator("#export-run input")).to_have_value(re.compile(run_id), timeout=30_000)
            page.locator("#export-repo input, #export-repo textarea").first.fill("someone/studio-adapter")
            token_box = page.locator("#export-token input").first
            for typed in TYPED:
                token_box.fill(typed)
                page.locator("#export-push").click()
                expect(page.locator("#export-status")).to_contain_text("Could not push", timeout=60_000)
                expect(token_box).to_have_value("")  # the box is cleared after each push
                assert typed not in page.content()
            screenshot(page, "secrets-export-after-push")
            stores = [page.evaluate(DUMP), json.dumps(context.storage_state(indexed_db=True))]
            page.reload()
            expect(page.get_by_role("tab", name="6 · Export")).to_be_visible(timeout=60_000)
            stores += [page.evaluate(DUMP), page.content()]
        finally:
            browser.close()
    text = json.dumps(stores, default=str)
    for secret in TYPED + [CANARY, PASSWORD]:
        assert secret not in text, f"{secret[:6]}… found in the browser's storage or page"
    for path in [log, *(p for p in studio_home.rglob("*") if p.is_file() and not p.is_symlink())]:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in TYPED + [CANARY, PASSWORD]), path
