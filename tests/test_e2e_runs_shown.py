"""What a person sees of their runs and their draft, in headless Chromium: the Evaluate tables (the whole prompt
on its own lines, every model's column in view, the same scores after a reload), the Playground's comparison
table (line breaks kept), checkpoint and run lists that drop what was deleted on disk while the page is open,
and a second open browser that follows the first one's edits without a reload.

Each test serves its own ``python app.py`` on its own STUDIO_HOME; a short real run (4 steps, a checkpoint
every 2) is trained there through the command line first, as a person who trained earlier would have.
Screenshots land in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from e2e_helpers import ROOT, open_tab, screenshot, serve_app, tail
from test_e2e_state import (browser, choose, clean, markdown_of, new_page, quiet,  # noqa: F401 - a fixture
                             type_slowly)

pytestmark = pytest.mark.browser

LIST_FOLLOWS_MS = 20_000  # the lists' timer ticks every 2 s; a busy two-core machine may lag a few ticks
EVAL_MS = 180_000


def trained_run(home) -> str:
    """A finished tiny-demo run of 4 steps with checkpoints checkpoint-2 and checkpoint-4 and a final adapter."""
    env = dict(os.environ, STUDIO_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "studio", "train", "--preset", "tiny-demo",
                          "--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "train.eval_steps=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_id = re.search(r"run (\S+): completed", out.stdout).group(1)
    run_dir = home / "runs" / run_id
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return run_id


def columns_in_view(page, elem_id: str, names: list[str]) -> None:
    """Every header of the table is drawn inside the table's box and inside the window: no column is pushed
    off to the right."""
    table = page.locator(f"#{elem_id}")
    box = table.bounding_box()
    width = page.viewport_size["width"]
    headers = table.locator("thead th")
    expect(headers).to_have_count(len(names))
    for i, name in enumerate(names):
        expect(headers.nth(i)).to_contain_text(name)
        h = headers.nth(i).bounding_box()
        assert h and h["width"] > 40, (name, h)
        assert h["x"] + h["width"] <= min(box["x"] + box["width"], width) + 1, f"column {name!r} is out of view"


def cell_texts(page, elem_id: str, col: int) -> list[str]:
    """The texts of one column as drawn (innerText keeps a line break only where the page shows one)."""
    return page.locator(f"#{elem_id} [role=gridcell][data-col='{col}']").all_inner_texts()


def drawn_and_held(page, elem_id: str) -> list[tuple[str, str]]:
    """Each cell's text as drawn and as the table holds it."""
    return [tuple(x) for x in page.evaluate(
        """id => [...document.querySelectorAll(`#${id} [role=gridcell] .text`)]
                 .map(e => [e.innerText, e.textContent])""", elem_id)]


def whole_prompt(example: dict) -> str:
    extra = (example.get("input") or "").strip()
    return f"{example['prompt']}\n\n{extra}" if extra else example["prompt"]


def test_evaluate_shows_the_whole_prompt_on_its_lines_and_every_column_after_a_reload(
        studio_home, tiny_model_dir, browser, tmp_path):
    run_id = trained_run(studio_home)
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        try:
            open_tab(page, "5 · Evaluate")
            expect(page.locator("#eval-run input")).to_have_value(f"{run_id} · completed", timeout=30_000)
            expect(page.locator("#eval-status")).to_contain_text("has not been evaluated yet", timeout=30_000)
            for elem, value in (("eval-limit", "6"), ("eval-max-new-tokens", "24")):
                box = page.locator(f"#{elem} input[type=number]")
                type_slowly(page, box, value)
                box.press("Tab")
            page.locator("#eval-start").click()
            expect(page.locator("#eval-status")).to_contain_text("on 6 held-out examples", timeout=EVAL_MS)
            ev = json.loads((studio_home / "runs" / run_id / "evaluation.json").read_text())
            by_prompt = {e["prompt"]: e for e in ev["rows"]}
            assert any((e.get("input") or "").strip() for e in ev["rows"]), "no example with an input"
            shown = 0
            for elem in ("eval-best", "eval-worst"):
                expect(page.locator(f"#{elem} [role=gridcell]").first).to_be_visible(timeout=30_000)
                columns_in_view(page, elem, ["prompt", "reference", "base", "tuned", "ROUGE-L"])
                for text in cell_texts(page, elem, 0):
                    example = by_prompt[text.split("\n")[0]]
                    assert text == whole_prompt(example), (text, example)  # the input below, after a blank line
                    shown += bool((example.get("input") or "").strip())
                # All three examples in view: no inner scroll hides the last one.
                rows = page.locator(f"#{elem} [role=gridcell][data-col='0']")
                expect(rows).to_have_count(3)
                last, frame = rows.nth(2).bounding_box(), page.locator(f"#{elem} .table-wrap").bounding_box()
                assert last["y"] + last["height"] <= frame["y"] + frame["height"] + 1, (last, frame)
            assert shown, "no prompt with an input was shown"
            screenshot(page, "keep-01-evaluate-whole-prompt")
            status = page.locator("#eval-status").inner_text()
            worst_shown = cell_texts(page, "eval-worst", 0)

            page.reload()  # the same numbers after F5, though the app was started before they existed
            expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=60_000)
            open_tab(page, "5 · Evaluate")
            expect(page.locator("#eval-status")).to_contain_text(f"Saved evaluation of {run_id} on 6 held-out",
                                                                 timeout=30_000)
            expect(page.locator("#eval-worst [role=gridcell][data-col='0']").first).to_be_visible(timeout=30_000)
            assert cell_texts(page, "eval-worst", 0) == worst_shown, status
            columns_in_view(page, "eval-worst", ["prompt", "reference", "base", "tuned", "ROUGE-L"])
            screenshot(page, "keep-02-evaluate-after-reload")
            clean(page)
        except (AssertionError, PlaywrightError, KeyError) as e:
            screenshot(page, "99-keep-evaluate-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None


def test_compare_keeps_line_breaks_and_deleted_checkpoints_and_adapters_leave_every_list(
        studio_home, tiny_model_dir, browser, tmp_path):
    run_id = trained_run(studio_home)
    run_dir = studio_home / "runs" / run_id
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        try:
            open_tab(page, "4 · Playground")
            expect(page.locator("#pg-run input")).to_have_value(f"{run_id} · completed", timeout=30_000)
            checkpoints = page.locator("#pg-checkpoints")
            expect(checkpoints.get_by_label("checkpoint-2")).to_be_checked(timeout=30_000)
            expect(checkpoints.get_by_label("checkpoint-4")).to_be_checked()
            page.locator("#pg-load").click()
            expect(page.locator("#pg-status")).to_contain_text("Loaded", timeout=120_000)

            # An example with an input: the prompt cell shows the instruction, a blank line, then the input.
            page.get_by_role("tab", name="Compare checkpoints").click()
            page.locator("#pg-prompts textarea").fill(
                "Find the profit margin. ### Input: Revenue: $2,064,000; net income: $608,880\n"
                "Compute the ROI.")
            page.locator("#pg-compare").click()
            table = page.locator("#pg-compare-table")
            expect(table.locator("[role=gridcell][data-col='0']")).to_have_count(2, timeout=EVAL_MS)
            expect(table.locator("[data-testid='status-tracker']").first).to_have_class(re.compile(r"\bhide\b"),
                                                                                        timeout=EVAL_MS)
            assert cell_texts(page, "pg-compare-table", 0) == [
                "Find the profit margin.\n\nRevenue: $2,064,000; net income: $608,880", "Compute the ROI."]
            columns_in_view(page, "pg-compare-table", ["prompt", "base", "final", "ckpt-2", "ckpt-4"])
            # An answer's own line breaks are drawn as line breaks: the text as drawn (innerText, where a collapsed
            # line break reads as a space) is the answer's text itself.
            drawn = drawn_and_held(page, "pg-compare-table")
            assert len(drawn) == 10 and all(held.strip() for _, held in drawn), drawn
            assert any("\n" in held for _, held in drawn), "no answer had a line break to show"
            for shown_text, held in drawn:
                assert shown_text.strip() == held.strip(), (shown_text, held)
            screenshot(page, "keep-03-compare-line-breaks")

            # A checkpoint deleted on disk while the page is open leaves the list (and its tick) without a reload.
            shutil.rmtree(run_dir / "checkpoints" / "checkpoint-2")
            expect(checkpoints.get_by_label("checkpoint-2")).to_have_count(0, timeout=LIST_FOLLOWS_MS)
            expect(checkpoints.get_by_label("checkpoint-4")).to_be_checked()
            screenshot(page, "keep-04-deleted-checkpoint-left-the-list")

            # The final adapter deleted: the run leaves the Evaluate and Export lists (they need one) and stays in
            # the Playground's for its last checkpoint; with that gone too it leaves the Playground's.
            for tab, elem in (("5 · Evaluate", "eval-run"), ("6 · Export", "export-run")):
                open_tab(page, tab)
                expect(page.locator(f"#{elem} input")).to_have_value(f"{run_id} · completed", timeout=30_000)
            shutil.rmtree(run_dir / "adapter")
            for tab, elem in (("5 · Evaluate", "eval-run"), ("6 · Export", "export-run")):
                open_tab(page, tab)
                expect(page.locator(f"#{elem} input")).to_have_value("", timeout=LIST_FOLLOWS_MS)
                page.locator(f"#{elem} input").click()
                expect(page.get_by_role("option", name=re.compile(re.escape(run_id)))).to_have_count(0)
                page.keyboard.press("Escape")
            screenshot(page, "keep-05-export-list-without-the-run")
            open_tab(page, "4 · Playground")
            expect(page.locator("#pg-run input")).to_have_value(re.compile(re.escape(run_id)))
            shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
            expect(page.locator("#pg-run input")).to_have_value("", timeout=LIST_FOLLOWS_MS)
            expect(checkpoints.get_by_label("checkpoint-4")).to_have_count(0, timeout=LIST_FOLLOWS_MS)
            clean(page)
        except (AssertionError, PlaywrightError, KeyError) as e:
            screenshot(page, "99-keep-lists-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None


def wait_for_draft(home, key: str, value, timeout: float = 30.0) -> None:
    """Wait until the draft on disk holds ``key: value`` (what the other page saved)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if json.loads((home / "draft.json").read_text())["values"].get(key) == value:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, f"the draft never held {key}={value!r}"
        time.sleep(0.2)


def ticks(page) -> int:
    return page.evaluate("window.__draftTicks || 0")


def test_a_second_open_browser_follows_the_first_ones_edits_live(studio_home, tiny_model_dir, browser, tmp_path):
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url:
        page = new_page(browser, url)
        other = new_page(browser, url)  # another person's browser, open at the same time, never reloaded
        try:
            for p in (page, other):
                open_tab(p, "2 · Presets")
            steps = page.locator("#presets-train-max-steps input[type=number]")
            type_slowly(page, steps, "7")
            open_tab(page, "2 · Presets")  # a click elsewhere: the person has left the box
            expect(other.locator("#presets-train-max-steps input[type=number]")).to_have_value(
                "7", timeout=LIST_FOLLOWS_MS)
            expect(other.locator("#presets-changes")).to_contain_text("train.max_steps: 0 → 7", timeout=30_000)
            screenshot(other, "keep-06-second-browser-follows-presets")

            open_tab(page, "1 · Data")
            open_tab(other, "1 · Data")
            choose(page, "data-template", "qa")
            expect(other.locator("#data-template input")).to_have_value("qa", timeout=LIST_FOLLOWS_MS)
            expect(other.locator("#data-template-text textarea")).to_have_value(re.compile("### Question"),
                                                                                timeout=30_000)
            expect(other.locator("#data-preview")).to_contain_text("### Question", timeout=30_000)
            screenshot(other, "keep-07-second-browser-follows-data")

            # The other person is typing a learning rate when the first one changes max steps: their half-typed
            # value is not replaced; once they leave the box, both edits are kept, in both browsers.
            open_tab(page, "2 · Presets")
            open_tab(other, "2 · Presets")
            lr = other.locator("#presets-train-learning-rate input[type=number]")
            type_slowly(other, lr, "0.00")
            wait_for_draft(studio_home, "train.learning_rate", 0)
            expect(page.locator("#presets-train-learning-rate input[type=number]")).to_have_value(
                re.compile(r"^0(\.0*)?$"), timeout=LIST_FOLLOWS_MS)
            type_slowly(page, steps, "9")
            open_tab(page, "2 · Presets")
            wait_for_draft(studio_home, "train.max_steps", 9)
            seen = ticks(other)
            other.wait_for_function(f"(window.__draftTicks || 0) >= {seen + 2}", timeout=30_000)
            expect(lr).to_be_focused()
            expect(lr).to_have_value("0.00")  # two ticks after the other edit: still as typed
            expect(other.locator("#presets-train-max-steps input[type=number]")).to_have_value("7")
            lr.press_sequentially("3", delay=180)
            open_tab(other, "2 · Presets")  # leaves the box
            expect(other.locator("#presets-train-max-steps input[type=number]")).to_have_value(
                "9", timeout=LIST_FOLLOWS_MS)
            expect(lr).to_have_value("0.003")
            expect(page.locator("#presets-train-learning-rate input[type=number]")).to_have_value(
                "0.003", timeout=LIST_FOLLOWS_MS)
            expect(steps).to_have_value("9")
            for p in (page, other):
                open_tab(p, "3 · Train")
                summary = p.locator("#train-summary")
                expect(summary).to_contain_text("train.max_steps", timeout=30_000)
                expect(summary).to_contain_text("→ 9")
                expect(summary).to_contain_text("→ 0.003")
                expect(summary).to_contain_text("Template qa")
            for p in (page, other):
                quiet(p, "train-summary")  # compare the summaries as drawn, not one mid-redraw
            expect(other.locator("#train-summary")).to_have_text(page.locator("#train-summary").inner_text())
            screenshot(other, "keep-08-second-browser-summary")
            clean(page)
            clean(other)
        except (AssertionError, PlaywrightError, KeyError) as e:
            screenshot(page, "99-keep-live-failure")
            screenshot(other, "99-keep-live-failure-other")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None
