"""The studio keeps a person's work, in headless Chromium: typing into number fields digit by digit, a page
reload, a second browser, their own messy file, the Train tab's pre-Start summary, and Start training on
exactly what that summary said.

Each test serves its own ``python app.py`` (its own STUDIO_HOME, so its own draft) and acts as a person does:
clicks, keystrokes with a pause between them, reloads.  Screenshots land in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from e2e_helpers import (CHROMIUM_ARGS, TOAST_WATCH, VIEWPORT, arm, chromium_path, open_tab, screenshot, serve_app,
                         settled, tail)

pytestmark = pytest.mark.browser

APP_READY_MS = 60_000
KEY_DELAY_MS = 180  # a person's typing: each keystroke reaches the server as its own event
# A panel whose event raised shows Gradio's red "Error" badge in its status tracker.
ERROR_BADGE = "[data-testid='status-tracker'].error, .error[data-testid='status-tracker'], .status-tracker .error"


def messy_csv(path):
    """A user's own file: a BOM, Windows line ends, column names the detector cannot guess, an empty answer,
    a quoted comma and a stray blank line."""
    rows = ["q_text,a_text,notes"]
    for i in range(40):
        answer = "" if i == 7 else f"\"Answer {i}, with a comma\""
        rows.append(f"What is item {i} worth?,{answer},n{i}")
    rows.insert(12, "")
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    return path


def no_error_badges(page, *elems: str) -> None:
    assert page.locator(ERROR_BADGE).count() == 0
    for elem in elems:
        text = page.locator(f"#{elem}").inner_text()
        assert not re.search(r"\bError\b", text), (elem, text)


def quiet(page, *elems: str) -> None:
    """Wait until no panel among ``elems`` shows a pending update (its status tracker hidden), so a screenshot
    shows the panels as a person reads them, not greyed out mid-update."""
    for elem in elems:
        expect(page.locator(f"#{elem} [data-testid='status-tracker']:not(.hide)")).to_have_count(0, timeout=30_000)


def markdown_of(page, elem: str):
    """The Markdown ``elem`` as a person reads it: its content, without its status tracker.  A tracker hidden by
    ``show_progress="hidden"`` is only transparent (opacity 0), so its timer ("0.1s") is still in the block's
    text while an update is pending."""
    return page.locator(f"#{elem} [data-testid='markdown']")


def type_slowly(page, locator, text: str) -> None:
    """Select what the box holds, then type ``text`` one key at a time (the first key replaces it)."""
    locator.click()
    locator.press("Control+a")
    locator.press_sequentially(text, delay=KEY_DELAY_MS)


def open_accordion(page, label: str) -> None:
    page.get_by_role("button", name=re.compile(label)).first.click()


def choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a Gradio dropdown as a person does: open it, click the entry."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.fixture
def browser():
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_page(browser, url):
    page = browser.new_context(viewport=VIEWPORT).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=APP_READY_MS)
    page.evaluate(TOAST_WATCH)
    page.errors = errors
    return page


def clean(page) -> None:
    assert not page.evaluate("window.__toasts"), page.evaluate("window.__toasts")
    assert not page.errors, page.errors


def test_number_fields_take_any_typing_and_the_panels_show_the_final_value(studio_home, tiny_model_dir, browser,
                                                                           tmp_path):
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        try:
            expect(page.locator("#data-status")).to_contain_text("examples ready", timeout=APP_READY_MS)
            open_accordion(page, "Length, validation split and sampling")
            box = page.locator("#data-max-length input[type=number]")
            arm(page, "data-lengths")
            type_slowly(page, box, "48")  # sends 4 (below the minimum of 8), then 48
            settled(page, "data-lengths")
            expect(page.locator("#data-status")).to_contain_text("examples ready", timeout=30_000)
            expect(page.locator("#data-lengths")).to_contain_text("max length 48", timeout=30_000)
            expect(page.locator("#data-length-summary")).to_contain_text("48")
            no_error_badges(page, "data-status", "data-lengths", "data-preview", "data-counts")
            screenshot(page, "state-01-typed-max-length-48")

            open_tab(page, "2 · Presets")
            lr = page.locator("#presets-train-learning-rate input[type=number]")
            arm(page, "presets-changes")
            type_slowly(page, lr, "0.003")  # 0, 0., 0.0, 0.00: each below the minimum until the last key
            settled(page, "presets-changes")
            changes = page.locator("#presets-changes")
            expect(changes).to_contain_text("train.learning_rate", timeout=30_000)
            expect(changes).to_contain_text("→ 0.003")
            expect(page.locator("#presets-fit-verdict")).to_contain_text("Estimated peak", timeout=30_000)
            no_error_badges(page, "presets-changes", "presets-fit-verdict", "presets-fit")
            # Out of range on purpose: a sentence naming the key, not a red badge; fixing it clears it.
            type_slowly(page, lr, "5")
            expect(changes).to_contain_text("train.learning_rate: 5.0 is above the maximum", timeout=30_000)
            type_slowly(page, lr, "0.0002")
            expect(changes).to_contain_text("→ 0.0002", timeout=30_000)
            no_error_badges(page, "presets-changes", "presets-fit-verdict", "presets-fit")
            quiet(page, "presets-changes", "presets-fit-verdict", "presets-fit")
            screenshot(page, "state-02-typed-learning-rate")

            open_tab(page, "3 · Train")
            summary = page.locator("#train-summary")
            expect(summary).to_contain_text("max length 48 tokens", timeout=30_000)
            expect(summary).to_contain_text("train.learning_rate")
            clean(page)
        except (AssertionError, PlaywrightError) as e:
            screenshot(page, "99-state-typing-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None


def test_choices_survive_a_reload_and_show_in_a_second_browser_and_start_trains_on_the_summary(
        studio_home, tiny_model_dir, browser, tmp_path):
    log = tmp_path / "app.log"
    own = messy_csv(tmp_path / "My Quarterly Q&A.csv")
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        try:
            expect(page.locator("#data-status")).to_contain_text("examples ready", timeout=APP_READY_MS)
            # Their own file: the detector cannot guess its columns, so they map them by hand.
            page.locator("#data-upload input[type=file]").set_input_files(str(own))
            expect(page.locator("#data-schema")).to_contain_text("40 records", timeout=30_000)
            choose(page, "data-map-instruction", "q_text")
            arm(page, "data-preview")
            choose(page, "data-map-response", "a_text")
            settled(page, "data-preview")
            expect(page.locator("#data-status")).to_contain_text("39 examples ready", timeout=30_000)
            choose(page, "data-template", "qa")
            expect(page.locator("#data-template-text textarea")).to_have_value(re.compile("### Question"), timeout=10_000)

            open_tab(page, "2 · Presets")
            steps = page.locator("#presets-train-max-steps input[type=number]")
            type_slowly(page, steps, "6")
            steps.press("Tab")
            expect(page.locator("#presets-changes")).to_contain_text("train.max_steps: 0 → 6", timeout=20_000)

            open_tab(page, "3 · Train")
            summary = page.locator("#train-summary")
            expect(summary).to_contain_text("My_Quarterly_Q_A", timeout=30_000)
            expect(summary).to_contain_text("instruction ← q_text")
            expect(summary).to_contain_text("Template qa")
            expect(summary).to_contain_text("train.max_steps")
            expect(summary).to_contain_text(re.compile(r"\d+ training and \d+ validation examples"))
            expect(summary).to_contain_text("checks Start makes pass")
            shown_before = markdown_of(page, "train-summary").inner_text()
            screenshot(page, "state-03-summary-before-reload")

            page.reload()  # a person presses F5
            expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=APP_READY_MS)
            page.evaluate(TOAST_WATCH)
            expect(page.locator("#data-source")).to_contain_text("My_Quarterly_Q_A", timeout=30_000)
            expect(page.locator("#data-map-instruction input")).to_have_value("q_text")
            expect(page.locator("#data-map-response input")).to_have_value("a_text")
            expect(page.locator("#data-template input")).to_have_value("qa")
            expect(page.locator("#data-status")).to_contain_text("39 examples ready", timeout=30_000)
            screenshot(page, "state-04-data-after-reload")
            open_tab(page, "2 · Presets")
            expect(page.locator("#presets-train-max-steps input[type=number]")).to_have_value("6")
            expect(page.locator("#presets-changes")).to_contain_text("train.max_steps: 0 → 6", timeout=20_000)
            open_tab(page, "3 · Train")
            expect(markdown_of(page, "train-summary")).to_have_text(shown_before, timeout=30_000)

            # A second browser (another person, or the same one on a laptop) sees the same choices.
            other = new_page(browser, url)
            expect(other.locator("#data-source")).to_contain_text("My_Quarterly_Q_A", timeout=30_000)
            expect(other.locator("#data-map-response input")).to_have_value("a_text")
            open_tab(other, "3 · Train")
            expect(markdown_of(other, "train-summary")).to_have_text(shown_before, timeout=30_000)
            screenshot(other, "state-05-second-browser-summary")

            # A check that would fail shows before anything loads: a GPU-only optimizer on this CPU machine.
            open_tab(other, "2 · Presets")
            choose(other, "presets-train-optimizer", "paged_adamw_8bit")
            open_tab(other, "3 · Train")
            expect(other.locator("#train-summary")).to_contain_text("needs a CUDA GPU", timeout=30_000)
            expect(other.locator("#train-summary")).to_contain_text("Start would refuse")
            screenshot(other, "state-06-summary-refuses")
            other.locator("#train-start").click()
            expect(other.locator("#train-message")).to_contain_text("needs a CUDA GPU", timeout=30_000)
            open_tab(other, "2 · Presets")
            choose(other, "presets-train-optimizer", "adamw_torch")
            open_tab(other, "3 · Train")
            expect(other.locator("#train-summary")).to_contain_text("checks Start makes pass", timeout=30_000)
            clean(other)
            other.context.close()

            # Start (in the first browser, after a reload) trains on what the summary says.
            page.reload()
            expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=APP_READY_MS)
            open_tab(page, "3 · Train")
            expect(summary).to_contain_text("checks Start makes pass", timeout=30_000)
            said = summary.inner_text()
            page.locator("#train-start").click()
            message = page.locator("#train-message")
            expect(message).to_contain_text("Started run", timeout=30_000)
            run_id = re.search(r"Started run (\S+?):", message.inner_text()).group(1)
            cfg = yaml.safe_load((studio_home / "runs" / run_id / "config.yaml").read_text())
            assert "My_Quarterly_Q_A" in cfg["data"]["path"]
            assert cfg["data"]["mapping"] == {"instruction": "q_text", "response": "a_text"}
            assert cfg["data"]["template"] == "qa" and cfg["train"]["max_steps"] == 6
            assert cfg["train"]["optimizer"] == "adamw_torch"
            counts = re.search(r"(\d+) training and (\d+) validation examples", said)
            status = page.locator("#train-status")
            expect(status).to_contain_text(f"{counts.group(1)} training and {counts.group(2)} validation examples",
                                           timeout=120_000)
            screenshot(page, "state-07-started-as-summarised")
        except (AssertionError, PlaywrightError) as e:
            screenshot(page, "99-state-reload-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None


def test_lists_follow_saved_presets_loaded_yaml_and_new_runs(studio_home, tiny_model_dir, browser, tmp_path):
    log = tmp_path / "app.log"
    yaml_file = tmp_path / "colleague.yaml"
    yaml_file.write_text("name: colleague\ndescription: from a colleague\nmodel:\n  base_model: studio-tiny-mistral\n"
                         "  quantization: nf4\n  compute_dtype: auto\ntrain:\n  optimizer: adamw_torch\n"
                         "  learning_rate: 0.0007\n")
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        open_already = new_page(browser, url)  # a second browser open all along, never reloaded
        try:
            # Every tab is visited once first, so their lists were drawn before anything changed.
            for tab in ("4 · Playground", "5 · Evaluate", "6 · Export", "2 · Presets"):
                open_tab(page, tab)
            open_tab(open_already, "2 · Presets")
            with page.expect_file_chooser() as chooser:
                page.locator("#presets-yaml").click()
            chooser.value.set_files(str(yaml_file))
            expect(page.locator("#presets-choice input")).to_have_value(re.compile(r"colleague\.yaml"), timeout=30_000)
            expect(page.locator("#presets-train-learning-rate input[type=number]")).to_have_value("0.0007")
            screenshot(page, "lists-01-yaml-named-in-the-list")
            steps = page.locator("#presets-train-max-steps input[type=number]")
            type_slowly(page, steps, "4")
            steps.press("Tab")
            page.locator("#presets-save-name textarea, #presets-save-name input").first.fill("my-short")
            page.locator("#presets-save").click()
            expect(page.locator("#presets-status")).to_contain_text("Saved preset", timeout=30_000)
            expect(page.locator("#presets-choice input")).to_have_value("my-short")
            expect(page.locator("#presets-changes")).to_contain_text("No changes from my-short", timeout=30_000)
            page.locator("#presets-choice input").click()
            expect(page.get_by_role("option", name="my-short", exact=True)).to_be_visible()
            page.keyboard.press("Escape")

            # The browser open all along lists it too and shows it chosen, with its values, without a reload.
            expect(open_already.locator("#presets-choice input")).to_have_value("my-short", timeout=20_000)
            expect(open_already.locator("#presets-train-max-steps input[type=number]")).to_have_value("4", timeout=20_000)
            open_already.locator("#presets-choice input").click()
            expect(open_already.get_by_role("option", name="my-short", exact=True)).to_be_visible()
            open_already.keyboard.press("Escape")
            screenshot(open_already, "lists-02a-saved-preset-in-an-open-browser")
            clean(open_already)
            open_already.context.close()

            other = new_page(browser, url)  # a new browser lists it too, and shows it chosen
            open_tab(other, "2 · Presets")
            expect(other.locator("#presets-choice input")).to_have_value("my-short", timeout=30_000)
            other.locator("#presets-choice input").click()
            expect(other.get_by_role("option", name="my-short", exact=True)).to_be_visible()
            expect(other.get_by_role("option", name="tiny-demo", exact=True)).to_be_visible()
            screenshot(other, "lists-02-saved-preset-in-a-new-browser")
            other.context.close()

            open_tab(page, "3 · Train")
            expect(page.locator("#train-summary")).to_contain_text("checks Start makes pass", timeout=30_000)
            page.locator("#train-start").click()
            message = page.locator("#train-message")
            expect(message).to_contain_text("Started run", timeout=30_000)
            run_id = re.search(r"Started run (\S+?):", message.inner_text()).group(1)
            expect(page.locator("#train-run input")).to_have_value(run_id, timeout=10_000)  # "Run shown" follows
            expect(page.locator("#train-status")).to_contain_text(f"Run {run_id}: completed", timeout=240_000)
            # The other tabs were drawn before the run existed; their lists follow without a click on Refresh.
            for tab, elem in (("4 · Playground", "pg-run"), ("5 · Evaluate", "eval-run"), ("6 · Export", "export-run")):
                open_tab(page, tab)
                expect(page.locator(f"#{elem} input")).to_have_value(f"{run_id} · completed", timeout=15_000)
            screenshot(page, "lists-03-export-follows-the-new-run")
            # The run's log starts with the run, not with a warning about an optional package.
            worker_log = (studio_home / "runs" / run_id / "logs" / "worker.log").read_text(errors="replace")
            assert worker_log.strip() and "kernels-community" not in worker_log, worker_log[:500]
            clean(page)
        except (AssertionError, PlaywrightError) as e:
            screenshot(page, "99-lists-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None


def test_first_things_first_on_a_cpu_machine_with_an_odd_file(studio_home, tiny_model_dir, browser, tmp_path):
    """A file with one very long example and accented text: the histogram keeps its shape, the odd tokens are
    explained; the Presets tab leads with what a person sets, the GPU-only switches folded away, and the fit
    panel names this machine."""
    log = tmp_path / "app.log"
    odd = tmp_path / "café notes.jsonl"
    lines = [json.dumps({"instruction": f"Price of café item {i}?", "output": f"It costs €{i} at the café."},
                        ensure_ascii=False) for i in range(60)]
    lines.append(json.dumps({"instruction": "Summarise the ledger.", "output": " ".join(["entry"] * 3000)}))
    odd.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        try:
            expect(page.locator("#data-status")).to_contain_text("examples ready", timeout=APP_READY_MS)
            arm(page, "data-preview")
            page.locator("#data-upload input[type=file]").set_input_files(str(odd))
            settled(page, "data-preview")
            expect(page.locator("#data-status")).to_contain_text("61 examples ready", timeout=30_000)
            expect(page.locator("#data-status")).to_contain_text("byte-level token")
            expect(page.locator("#data-lengths")).to_contain_text("1 longer example off the axis", timeout=30_000)
            screenshot(page, "layout-01-data-odd-file")

            open_tab(page, "2 · Presets")
            expect(page.locator("#presets-fit-verdict")).to_contain_text("This machine: CPU only", timeout=30_000)
            expect(page.locator("#presets-fit")).to_contain_text("estimated peak")
            # This machine is the fit table's first row, with the estimate; the plan says why each part is off.
            expect(page.locator("#presets-fit")).to_contain_text("CPU only (this machine)")
            expect(page.locator("#presets-plan")).to_contain_text("Needs a CUDA GPU")
            expect(page.locator("#presets-train-learning-rate")).to_be_visible()
            expect(page.locator("#presets-speed-cuda-graphs")).not_to_be_visible()  # speed overrides folded away
            expect(page.locator("#presets-train-num-gpus")).not_to_be_visible()
            screenshot(page, "layout-02-presets-first-things-first")
            page.locator("#presets-section-speed").get_by_text("Speed: how it computes, never what it learns").click()
            expect(page.locator("#presets-speed-cuda-graphs")).to_be_visible()
            page.locator("#presets-train-advanced").get_by_text("More: memory and GPU-only switches").click()
            expect(page.locator("#presets-train-num-gpus")).to_be_visible()
            screenshot(page, "layout-03-presets-speed-overrides")
            # Gradio's own footer keeps no link named like the studio's runs.
            assert not page.locator("footer").get_by_text(re.compile(r"\bRuns?\b")).count()
            clean(page)
        except (AssertionError, PlaywrightError) as e:
            screenshot(page, "99-layout-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None
