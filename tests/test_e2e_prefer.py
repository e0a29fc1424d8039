"""Closing the loop in headless Chromium: a person votes blind in the Playground, presses "Train on these votes",
watches the DPO stage's chart move on the Train tab, then compares SFT and DPO side by side and blind.

The SFT run is trained in-process before the app starts (the browser path of training is test_e2e_browser's);
everything after is the page: ``python app.py`` in a subprocess with its own STUDIO_HOME, driven through the
elem_ids the tabs declare, waiting on what the user would see, never on a sleep.  Screenshots land in
``artifacts/screenshots/``.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from e2e_helpers import CHROMIUM_ARGS, TOAST_WATCH, VIEWPORT, arm, chromium_path, open_tab, screenshot, serve_app, \
    settled, tail

pytestmark = pytest.mark.browser

APP_READY_MS = 60_000
ANSWER_MS = 90_000
STAGE_FIRST_POINT_MS = 180_000  # worker start, NF4 quantization of the tiny model, TRL's tokenizing of the pairs
STAGE_DONE_MS = 240_000
PAIRS = 8  # the dpo-tiny preset's min_pairs
PROMPTS = ["Calculate the ROI for a cost of $7,500 and a final value of $19,500.",
           "What is the simple interest on $1,000 at 5% per year for 3 years?",
           "What is compound interest?", "Define liquidity.", "What is a bond?", "Explain inflation.",
           "What is a dividend?", "Calculate the margin for revenue $500 and cost $300.",
           "What is a stock split?", "Define working capital.", "What is an index fund?", "Explain leverage."]


@pytest.fixture
def sft_run(studio_home):
    """A finished tiny-demo run (8 steps) in the home the app will serve."""
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = load_preset("tiny-demo").replace({"train.max_steps": 8, "train.eval_steps": 0, "train.save_steps": 0,
                                            "train.sample_prompts": 0})
    run = RunStore().create(cfg, "sft-demo")
    assert Recipe(run).execute() == "completed"
    return run.id


def chat_answered(page, elem_id: str, turns: int) -> None:
    expect(page.locator(f"#{elem_id} .message-row.bot-row")).to_have_count(turns, timeout=ANSWER_MS)
    expect(page.locator(f"#{elem_id} [data-testid='status-tracker']").first).to_have_class(re.compile(r"\bhide\b"),
                                                                                            timeout=ANSWER_MS)


def choose(page, elem_id: str, option) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()


def vote_pairs(page, run_id: str) -> None:
    """Blind pairs, one prompt a conversation, until the run has PAIRS votes (equal answers are ties)."""
    open_tab(page, "4 · Playground")
    expect(page.locator("#pg-run input")).to_have_value(re.compile(re.escape(run_id)), timeout=20_000)
    page.locator("#pg-load").click()
    expect(page.locator("#pg-status")).to_contain_text("Loaded", timeout=60_000)
    page.get_by_role("tab", name="Blind A/B").click()
    pairs = page.locator("#pg-pairs")
    expect(pairs).to_contain_text(f"No votes for run {run_id} yet")
    expect(page.locator("#pg-train-votes")).to_be_disabled()
    box, saved = page.locator("#pg-ab-input textarea"), 0
    for i, text in enumerate(PROMPTS):
        page.locator("#pg-ab-clear").click()
        expect(page.locator("#pg-ab-chat-b .message-row")).to_have_count(0, timeout=10_000)
        arm(page, "pg-ab-chat-b")
        box.fill(text)
        box.press("Enter")
        settled(page, "pg-ab-chat-b", timeout=ANSWER_MS)
        chat_answered(page, "pg-ab-chat-b", 1)
        page.locator("#pg-ab-choice").get_by_label("A" if i % 2 else "B", exact=True).check()
        page.locator("#pg-vote").click()
        status = page.locator("#pg-ab-status")
        expect(status).to_contain_text(re.compile(r"Saved|counted as a tie"), timeout=20_000)
        if "Saved" in status.inner_text():
            saved += 1
            # The count is live: it follows each vote.
            expect(pairs).to_contain_text(f"{saved} pair{'s' if saved > 1 else ''} voted for run {run_id}",
                                          timeout=20_000)
        if saved == PAIRS:
            break
    assert saved == PAIRS, f"only {saved} distinct pairs from {len(PROMPTS)} prompts"
    expect(page.locator("#pg-train-votes")).to_be_enabled()
    screenshot(page, "p1-playground-votes")


def train_on_votes(page, run_id: str) -> str:
    page.locator("#pg-train-votes").click()
    # One click: the Train tab, the preference stage open on this run, its votes as the pairs.
    expect(page.get_by_role("tab", name="3 · Train")).to_have_attribute("aria-selected", "true", timeout=20_000)
    expect(page.locator("#stage-parent input")).to_have_value(re.compile(re.escape(run_id)), timeout=20_000)
    expect(page.locator("#stage-preset input")).to_have_value("dpo-tiny")
    summary = page.locator("#stage-summary")
    expect(summary).to_contain_text(f"{PAIRS} pairs from the studio's votes for run {run_id}", timeout=60_000)
    expect(summary).to_contain_text("Fit: estimated peak")
    # Four epochs over the eight pairs: four steps, logged every two, so the chart draws a line.
    epochs = page.locator("#stage-epochs input")
    epochs.fill("4")
    epochs.press("Tab")
    expect(summary).to_contain_text("4 epochs", timeout=30_000)
    expect(summary).to_contain_text("about 4 optimizer steps")
    page.locator("#stage-summary").scroll_into_view_if_needed()
    screenshot(page, "p2-train-stage-section")
    page.locator("#stage-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Started DPO stage", timeout=60_000)
    stage_id = re.search(r"Started DPO stage (\S+) on run", message.inner_text()).group(1)
    expect(page.locator("#train-run input")).to_have_value(stage_id, timeout=20_000)
    # The chart moves: once the stage's worker has started, the chart is the stage's (its legend names the
    # rewards and log-probs), then the loss line gets its points.
    status, plot = page.locator("#train-status"), page.locator("#train-loss-plot")
    expect(status).to_contain_text(f"Preference stage: DPO on run {run_id} from its final adapter",
                                   timeout=STAGE_FIRST_POINT_MS)
    expect(plot).to_contain_text("reward margin", timeout=20_000)
    expect(plot).to_contain_text("log-prob chosen")
    loss_points = plot.locator(".scatterlayer").first.locator(".trace").first.locator(".point")
    expect(loss_points).not_to_have_count(0, timeout=STAGE_FIRST_POINT_MS)
    screenshot(page, "p3-train-stage-chart")
    expect(status).to_contain_text(re.compile(r": (completed|failed|halted|stopped|interrupted)"),
                                   timeout=STAGE_DONE_MS)
    expect(status).to_contain_text(f"Run {stage_id}: completed")
    expect(status).to_contain_text(re.compile(r"Step 4: reward margin -?\d"))
    expect(loss_points).to_have_count(2)  # steps 2 and 4
    screenshot(page, "p4-train-stage-completed")
    return stage_id


def compare_sft_and_dpo(page, stage_id: str) -> None:
    open_tab(page, "4 · Playground")
    # The run list follows the runs folder; the stage is chosen as a person does.
    expect(page.locator("#pg-run")).to_be_visible()
    page.locator("#pg-refresh").click()
    choose(page, "pg-run", re.compile(re.escape(stage_id)))
    expect(page.locator("#pg-run input")).to_have_value(re.compile(re.escape(stage_id)))
    page.locator("#pg-load").click()
    expect(page.locator("#pg-status")).to_contain_text("adapters: dpo, sft", timeout=60_000)
    page.get_by_role("tab", name="Chat side by side").click()
    expect(page.locator("#pg-left-model input")).to_have_value("sft", timeout=20_000)
    expect(page.locator("#pg-right-model input")).to_have_value("dpo")
    box = page.locator("#pg-chat-input textarea")
    arm(page, "pg-right-chat")
    box.fill(PROMPTS[0])
    box.press("Enter")
    settled(page, "pg-right-chat", timeout=ANSWER_MS)
    chat_answered(page, "pg-left-chat", 1)
    chat_answered(page, "pg-right-chat", 1)
    expect(page.locator("#pg-left-chat")).to_contain_text("Left: sft")
    expect(page.locator("#pg-right-chat")).to_contain_text("Right: dpo")
    screenshot(page, "p5-playground-sft-vs-dpo")
    # Blind: DPO against the SFT adapter it started from; the vote reveals which was which.
    page.get_by_role("tab", name="Blind A/B").click()
    expect(page.locator("#pg-ab-against input")).to_have_value("sft")
    page.locator("#pg-ab-clear").click()
    arm(page, "pg-ab-chat-b")
    ab = page.locator("#pg-ab-input textarea")
    ab.fill(PROMPTS[1])
    ab.press("Enter")
    settled(page, "pg-ab-chat-b", timeout=ANSWER_MS)
    chat_answered(page, "pg-ab-chat-b", 1)
    page.locator("#pg-ab-choice").get_by_label("A", exact=True).check()
    page.locator("#pg-vote").click()
    status = page.locator("#pg-ab-status")
    expect(status).to_contain_text(re.compile(r"A was (dpo|sft)"), timeout=20_000)
    expect(status).to_contain_text(re.compile(r"B was (dpo|sft)"))
    # The vote is the stage's first pair: the count follows it.
    expect(page.locator("#pg-pairs")).to_contain_text(f"1 pair voted for run {stage_id}", timeout=20_000)
    screenshot(page, "p6-playground-blind-sft-vs-dpo")


def test_person_votes_trains_on_the_votes_and_compares_sft_and_dpo(studio_home, sft_run, tmp_path):
    exe = chromium_path()
    log = tmp_path / "app.log"
    with serve_app(studio_home, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page_errors: list[str] = []
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        try:
            page.goto(url)
            page.evaluate(TOAST_WATCH)
            expect(page.get_by_role("tab", name="1 · Data")).to_be_visible(timeout=APP_READY_MS)
            vote_pairs(page, sft_run)
            stage_id = train_on_votes(page, sft_run)
            compare_sft_and_dpo(page, stage_id)
        except (AssertionError, PlaywrightError) as e:
            screenshot(page, "p99-failure")
            raise AssertionError(f"{e}\n--- app log ---\n{tail(log)}") from None
        toasts = page.evaluate("window.__toasts")
        browser.close()
        assert not toasts, toasts
        assert not page_errors, page_errors
