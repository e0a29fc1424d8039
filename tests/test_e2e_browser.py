"""End to end in headless Chromium: a person uploads data, caps the tiny demo at 30 steps, trains it,
compares base and tuned answers, and visits the Evaluate and Export tabs.

The studio runs as ``python app.py`` in a subprocess (its own STUDIO_HOME); Playwright drives Debian's
Chromium through the elem_ids the tabs declare.  Every step waits on what the user would see (texts,
plot points), never on a sleep.  Full-page screenshots land in ``artifacts/screenshots/`` for review.
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from conftest import SAMPLES
from e2e_helpers import (CHROMIUM_ARGS, TOAST_WATCH, VIEWPORT, arm, chromium_path, open_tab, screenshot,
                         serve_app, settled, tail)

pytestmark = pytest.mark.browser

UPLOAD = SAMPLES / "finance_alpaca.jsonl"
APP_READY_MS = 60_000  # first page load builds every tab (tokenizer, presets, fit estimate)
TRAIN_FIRST_STEP_MS = 120_000  # worker start, NF4 quantization of the tiny model, data preparation
TRAIN_DONE_MS = 240_000  # MAX_STEPS of the tiny demo on two busy CPU cores, plus final eval and save
MAX_STEPS = 30
LOSS_TOKEN = ".token.highlighted[style*='22, 163, 74']"  # data.COLORS["loss"], as the browser writes it
MASKED_TOKEN = ".token.highlighted[style*='156, 163, 175']"  # data.COLORS["prompt (masked)"]

# How many lines an element's text takes on screen (distinct tops of its text's line boxes).
TEXT_LINES = """el => {
  const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT), tops = new Set();
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    if (!n.textContent.trim()) continue;
    const r = document.createRange(); r.selectNodeContents(n);
    for (const rect of r.getClientRects()) tops.add(Math.round(rect.top));
  }
  return tops.size;
}"""


def first_instruction() -> str:
    with UPLOAD.open(encoding="utf-8") as f:
        return json.loads(f.readline())["instruction"]


def data_tab(page) -> None:
    open_tab(page, "1 · Data")
    arm(page, "data-preview")
    page.locator("#data-upload input[type=file]").set_input_files(str(UPLOAD))
    # The upload is stored under a content-addressed name, so the source line names the copy, not the sample.
    expect(page.locator("#data-source")).to_contain_text(re.compile(r"finance_alpaca-[0-9a-f]{10}\.jsonl"),
                                                         timeout=30_000)
    expect(page.locator("#data-schema")).to_contain_text("400 records")
    settled(page, "data-preview")
    expect(page.locator("#data-status")).to_contain_text("examples ready")
    preview = page.locator("#data-preview")
    expect(preview).to_contain_text("example 1")
    # The legend names both categories; response tokens are green (loss), prompt tokens grey (masked).
    expect(preview.get_by_role("button", name="loss", exact=True)).to_be_visible()
    expect(preview.get_by_role("button", name="prompt (masked)", exact=True)).to_be_visible()
    expect(preview.locator(LOSS_TOKEN).first).to_be_visible()
    expect(preview.locator(MASKED_TOKEN).first).to_be_visible()
    expect(page.locator("#data-lengths .js-plotly-plot .bars path").first).to_be_visible()
    expect(page.locator("#data-length-summary")).not_to_be_empty()
    screenshot(page, "01-data")


def presets_tab(page) -> None:
    open_tab(page, "2 · Presets")
    expect(page.locator("#presets-choice input")).to_have_value("tiny-demo")
    expect(page.locator("#presets-changes")).to_contain_text("No changes")
    # Cap the run at MAX_STEPS (the preset trains 4 epochs, 188 steps) to keep the test short.
    max_steps = page.locator("#presets-train-max-steps input[type=number]")
    max_steps.fill(str(MAX_STEPS))
    max_steps.press("Tab")
    changes = page.locator("#presets-changes")
    expect(changes).to_contain_text(f"train.max_steps: 0 → {MAX_STEPS}", timeout=20_000)
    expect(changes).to_contain_text("1 changed from tiny-demo")
    expect(page.locator("#presets-fit-verdict")).to_contain_text("Estimated peak")
    expect(page.locator("#presets-fit")).to_contain_text("T4 16 GB")
    screenshot(page, "02-presets")


def train_tab(page) -> str:
    open_tab(page, "3 · Train")
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Started run", timeout=30_000)
    run_id = re.search(r"Started run (\S+?):", message.inner_text()).group(1)
    # Mid-run: a few logged steps (logging_steps is 2), so the curve has points, not one dot.
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step [1-9]\d+ / \d+"),
                                                            timeout=TRAIN_FIRST_STEP_MS)
    expect(page.locator("#train-loss-plot .scatterlayer .trace:first-child .point")).not_to_have_count(
        0, timeout=15_000)
    expect(page.locator("#train-status")).to_contain_text("running")
    screenshot(page, "03-train-running")
    status = page.locator("#train-status")
    expect(status).to_contain_text(re.compile(r": (completed|failed|halted|stopped|interrupted)"),
                                   timeout=TRAIN_DONE_MS)
    expect(status).to_contain_text(f"Run {run_id}: completed")
    expect(status).to_contain_text("The adapter is in the run folder")
    expect(page.locator("#train-history")).to_contain_text(run_id)
    # The answers at each evaluation: a prompt with an input shows it on its own lines, as every cell's text is
    # drawn with its line breaks (innerText reads a collapsed line break as a space).
    expect(page.locator("#train-samples [role=gridcell][data-col='1']").first).to_be_visible(timeout=30_000)
    cells = page.evaluate("""() => [...document.querySelectorAll("#train-samples [role=gridcell] .text")]
                                   .map(e => [e.innerText, e.textContent])""")
    assert any("\n\n" in drawn for drawn, _ in cells), cells
    assert all(drawn.strip() == held.strip() for drawn, held in cells), cells
    screenshot(page, "04-train-completed")
    return run_id


def chat_texts(page, elem_id: str, role: str) -> list[str]:
    """The messages of one role in a chat as the page shows them."""
    return page.locator(f"#{elem_id} .message-row.{role}-row").all_inner_texts()


def wait_answered(page, elem_id: str, turns: int) -> None:
    """Wait until the chat holds ``turns`` answers and its stream has ended."""
    expect(page.locator(f"#{elem_id} .message-row.bot-row")).to_have_count(turns, timeout=90_000)
    expect(page.locator(f"#{elem_id} [data-testid='status-tracker']").first).to_have_class(re.compile(r"\bhide\b"),
                                                                                            timeout=90_000)


def playground_tab(page, run_id: str, home) -> None:
    open_tab(page, "4 · Playground")
    # The run finished after the page was loaded: the list follows it without a click.
    expect(page.locator("#pg-run input")).to_have_value(re.compile(re.escape(run_id)), timeout=20_000)
    page.locator("#pg-load").click()
    expect(page.locator("#pg-status")).to_contain_text("Loaded", timeout=60_000)
    expect(page.locator("#pg-right-model input")).to_have_value("final")
    # A two-turn conversation with both models at once: one input, two chats.
    box = page.locator("#pg-chat-input textarea")
    arm(page, "pg-right-chat")
    box.fill(first_instruction())
    box.press("Enter")
    settled(page, "pg-right-chat", timeout=90_000)
    wait_answered(page, "pg-right-chat", 1)
    base_text = chat_texts(page, "pg-left-chat", "bot")[0]
    tuned_text = chat_texts(page, "pg-right-chat", "bot")[0]
    assert base_text.strip() and tuned_text.strip()
    assert base_text != tuned_text, "the tuned adapter should change the answer to a training prompt"
    arm(page, "pg-right-chat")
    box.fill("And what if revenue doubles?")
    page.locator("#pg-send").click()
    settled(page, "pg-right-chat", timeout=90_000)
    wait_answered(page, "pg-right-chat", 2)
    wait_answered(page, "pg-left-chat", 2)
    assert chat_texts(page, "pg-right-chat", "user")[1] == "And what if revenue doubles?"
    screenshot(page, "05-playground-chat")
    before = [chat_texts(page, elem, "bot") for elem in ("pg-left-chat", "pg-right-chat")]
    arm(page, "pg-right-chat")
    page.locator("#pg-regenerate").click()  # answers the last message again (the next seed): still two turns
    settled(page, "pg-right-chat", timeout=90_000)
    wait_answered(page, "pg-right-chat", 2)
    wait_answered(page, "pg-left-chat", 2)
    after = [chat_texts(page, elem, "bot") for elem in ("pg-left-chat", "pg-right-chat")]
    assert [a[0] for a in after] == [b[0] for b in before], "regenerate changed the first answers"
    assert [a[1] for a in after] != [b[1] for b in before], "regenerate gave the same last answers"
    assert all(a[1].strip() for a in after)
    assert chat_texts(page, "pg-left-chat", "user") == [first_instruction(), "And what if revenue doubles?"]
    screenshot(page, "05-playground-regenerated")
    page.locator("#pg-clear").click()
    expect(page.locator("#pg-right-chat .message-row")).to_have_count(0, timeout=10_000)
    expect(page.locator("#pg-left-chat .message-row")).to_have_count(0)

    # Compare checkpoints on an example with an input: the table shows the whole prompt, every column in view.
    page.get_by_role("tab", name="Compare checkpoints").click()
    prompts = page.locator("#pg-prompts textarea")
    expect(prompts).to_have_value(re.compile(r"\S"), timeout=10_000)  # prefilled from the run's validation split
    prompts.fill("Calculate the break-even point in units. ### Input: Fixed costs: $1,000; price $10; cost $6.")
    page.locator("#pg-compare").click()
    table = page.locator("#pg-compare-table")
    expect(table).to_contain_text("Fixed costs: $1,000", timeout=120_000)
    expect(table.locator("[data-testid='status-tracker']").first).to_have_class(re.compile(r"\bhide\b"),
                                                                                timeout=120_000)
    box = table.bounding_box()
    headers = table.locator("thead th")
    expect(headers).to_have_count(4)  # prompt, base, final, ckpt-30
    for i in range(4):
        h = headers.nth(i).bounding_box()
        assert h and h["x"] + h["width"] <= box["x"] + box["width"] + 1, f"column {i} is off screen"
    screenshot(page, "05a-playground-compare")

    # Blind A/B over a conversation: each vote saves a pair and carries the conversation on.
    page.get_by_role("tab", name="Blind A/B").click()
    ab_box = page.locator("#pg-ab-input textarea")
    for turn, text in enumerate([first_instruction(), "Explain it in one sentence."], 1):
        arm(page, "pg-ab-chat-b")
        ab_box.fill(text)
        page.locator("#pg-ab-generate").click()
        settled(page, "pg-ab-chat-b", timeout=90_000)
        wait_answered(page, "pg-ab-chat-b", turn)
        page.locator("#pg-ab-choice").get_by_label("A", exact=True).check()
        page.locator("#pg-vote").click()
        expect(page.locator("#pg-ab-status")).to_contain_text("Saved: A", timeout=20_000)
    expect(page.locator("#pg-votes-path")).to_contain_text("2 pairs", timeout=20_000)
    expect(page.locator("#pg-votes-download")).to_be_visible()
    with page.expect_download() as dl:
        page.locator("#pg-votes-download").click()
    votes = [json.loads(line) for line in open(dl.value.path(), encoding="utf-8").read().splitlines()]
    assert [v["turn"] for v in votes] == [1, 2]
    # The second pair's prompt is the whole conversation up to it, rendered as the model read it.
    assert first_instruction() in votes[1]["prompt"] and votes[0]["chosen"] in votes[1]["prompt"]
    assert votes[1]["prompt"].rstrip().endswith("### Response:")
    assert {"prompt", "chosen", "rejected"} <= set(votes[1])
    saved = (home / "preferences.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in saved] == votes
    screenshot(page, "05b-playground-blind-ab")
    # Every button label on one line (a label broken over two lines looked like two buttons).
    for elem in ("pg-ab-generate", "pg-ab-clear", "pg-vote", "pg-votes-download"):
        assert page.locator(f"#{elem}").evaluate(TEXT_LINES) == 1, f"#{elem}'s label wraps"


def evaluate_and_export(page, run_id: str, tiny_model_dir) -> None:
    open_tab(page, "5 · Evaluate")
    expect(page.locator("#eval-run input")).to_have_value(re.compile(re.escape(run_id)), timeout=20_000)
    # Choosing the run shows its saved evaluation (none yet); the status and tables come from one event.
    expect(page.locator("#eval-status")).to_contain_text(run_id, timeout=20_000)
    expect(page.locator("#eval-table [data-testid='status-tracker']").first).to_have_class(re.compile(r"\bhide\b"))
    expect(page.locator("#eval-start")).to_be_enabled()
    screenshot(page, "06-evaluate")
    open_tab(page, "6 · Export")
    expect(page.locator("#export-run input")).to_have_value(re.compile(re.escape(run_id)), timeout=20_000)
    snippet = page.locator("#export-snippet")
    expect(snippet).to_contain_text(run_id, timeout=20_000)
    # The snippet runs outside the studio: the demo's base model by its folder, not the studio's own name.
    expect(snippet).to_contain_text(f'from_pretrained("{tiny_model_dir}")')
    expect(snippet).not_to_contain_text('"studio-tiny-mistral"')
    screenshot(page, "07-export")


def test_person_trains_and_compares_in_the_browser(studio_home, tiny_model_dir, tmp_path):
    browser_exe = chromium_path()
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_exe, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page_errors: list[str] = []
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        try:
            page.goto(url)
            page.evaluate(TOAST_WATCH)
            expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=APP_READY_MS)
            data_tab(page)
            presets_tab(page)
            run_id = train_tab(page)
            playground_tab(page, run_id, studio_home)
            evaluate_and_export(page, run_id, tiny_model_dir)
        except (AssertionError, PlaywrightError) as e:  # PlaywrightError: a wait_for_function timed out
            screenshot(page, "99-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None
        toasts = page.evaluate("window.__toasts")
        browser.close()
        # Nothing went wrong on the way: no warning or error toast, and the page's scripts raised nothing.
        assert not toasts, toasts
        assert not page_errors, page_errors
