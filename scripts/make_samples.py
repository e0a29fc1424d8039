"""Generate the small finance datasets in ``samples/``.

QLoRA Studio has to be demonstrable and testable with no internet access, so
the repo ships its own datasets instead of pulling one from the Hub. This script
writes the same kind of finance Q&A in every input format the studio accepts:

    finance_alpaca.jsonl             ~400 {"instruction", "input", "output"} (about 1/3 empty input)
    finance_alpaca.parquet           the same records as parquet
    finance_alpaca_val.jsonl         40 held-out alpaca records (numbers unseen in training files)
    finance_prompt_completion.jsonl  ~300 {"prompt", "completion"}
    finance_messages.jsonl           ~200 {"messages": [system?, user, assistant]}
    finance_sharegpt.json            ~200 ShareGPT records, one JSON array
    finance_columns.csv              ~200 rows, columns system,user,assistant

Every numeric answer is computed from the numbers in the question, so a fine-tuned
model's output can be checked, and every answer is one short sentence in a fixed
style ("The compound amount is $1,276.28.") so even a tiny model can learn the
format. Output is deterministic: same script, same bytes (the parquet file also
depends on the installed pyarrow version, which it records in its metadata).

Run from anywhere:  python scripts/make_samples.py [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from pathlib import Path
from typing import Callable

SEED = 1234
REPO_ROOT = Path(__file__).resolve().parent.parent

N_ALPACA = 400
N_PROMPT_COMPLETION = 300
N_MESSAGES = 200
N_SHAREGPT = 200
N_COLUMNS = 200
N_VAL = 40

SYSTEM_PROMPTS = [
    "You are a concise financial assistant. Answer with the final figure in one sentence.",
    "You are a helpful finance tutor. Give short, exact answers.",
    "You answer personal finance and investing questions briefly and precisely.",
]

# Keeping the generated fact-style answers to short, fixed texts lets a tiny model memorise them.
DEFINITIONS = {
    "liquidity": "Liquidity is how quickly an asset can be converted into cash without a large loss in value.",
    "diversification": "Diversification is spreading investments across different assets to reduce overall risk.",
    "inflation": "Inflation is the general rise in prices over time, which lowers the purchasing power of money.",
    "compound interest": "Compound interest is interest earned on both the original principal and the interest already added.",
    "simple interest": "Simple interest is interest paid only on the original principal, not on earlier interest.",
    "dividend": "A dividend is a payment a company makes to its shareholders out of its profits.",
    "bond": "A bond is a loan to a government or company that pays interest and returns the principal at maturity.",
    "equity": "Equity is the ownership value left after subtracting liabilities from assets.",
    "asset": "An asset is anything of value that a person or company owns.",
    "liability": "A liability is an amount of money that a person or company owes.",
    "collateral": "Collateral is an asset pledged to a lender that can be seized if a loan is not repaid.",
    "amortization": "Amortization is paying off a loan through regular payments that cover interest and principal.",
    "net worth": "Net worth is total assets minus total liabilities.",
    "cash flow": "Cash flow is the net amount of money moving into and out of a business or account.",
    "budget": "A budget is a plan that sets expected income and spending for a period of time.",
    "ETF": "An ETF is an exchange-traded fund that holds a basket of assets and trades like a stock.",
    "index fund": "An index fund is a fund that tracks a market index, such as the S&P 500, at low cost.",
    "market capitalization": "Market capitalization is a company's share price multiplied by its number of shares outstanding.",
    "bear market": "A bear market is a period when prices fall 20% or more from a recent high.",
    "bull market": "A bull market is a period of rising prices and strong investor confidence.",
    "credit score": "A credit score is a number that estimates how likely a borrower is to repay debt.",
    "APR": "APR is the annual percentage rate, the yearly cost of borrowing including fees.",
    "emergency fund": "An emergency fund is cash set aside to cover unexpected expenses, often three to six months of costs.",
    "capital gain": "A capital gain is the profit made when an asset is sold for more than its purchase price.",
}

CURRENCIES = [
    ("USD", "EUR"), ("EUR", "USD"), ("USD", "GBP"), ("GBP", "USD"), ("USD", "JPY"),
    ("EUR", "GBP"), ("USD", "CAD"), ("CAD", "USD"), ("AUD", "USD"), ("USD", "CHF"),
]


# ---------------------------------------------------------------- formatting

def money(x: float) -> str:
    return f"${x:,.2f}"


def money_in(x: float) -> str:
    # Questions show whole amounts without cents, the way people usually write them.
    return f"${x:,.0f}" if float(x).is_integer() else f"${x:,.2f}"


def pct_in(r: float) -> str:
    s = f"{r:.2f}".rstrip("0").rstrip(".")
    return f"{s}%"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------- task generators
# Each generator returns a dict with:
#   q      - the whole question as one sentence (used when "input" is empty)
#   instr  - a generic instruction (used with "input")
#   inp    - the numbers as a short "Key: value; ..." input
#   out    - the computed answer
#   key    - a tuple identifying the numbers, used to keep validation data unseen

Example = dict


def gen_simple_interest(rng: random.Random) -> Example:
    p = rng.choice(range(500, 50001, 250))
    r = rng.choice([1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8])
    t = rng.randint(1, 10)
    interest = p * r / 100 * t
    q = rng.choice([
        f"What is the simple interest on {money_in(p)} at {pct_in(r)} per year for {plural(t, 'year')}?",
        f"Calculate the simple interest earned on {money_in(p)} at an annual rate of {pct_in(r)} over {plural(t, 'year')}.",
        f"How much simple interest does {money_in(p)} earn in {plural(t, 'year')} at {pct_in(r)} a year?",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the simple interest.", "Compute the simple interest for the loan below."]),
        inp=f"Principal: {money_in(p)}; annual rate: {pct_in(r)}; time: {plural(t, 'year')}",
        out=f"The simple interest is {money(interest)}.",
        key=("si", p, r, t),
    )


COMPOUNDING = {1: "annually", 2: "semiannually", 4: "quarterly", 12: "monthly"}


def gen_compound_interest(rng: random.Random) -> Example:
    p = rng.choice(range(1000, 100001, 500))
    r = rng.choice([2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10])
    t = rng.randint(1, 20)
    n = rng.choice(list(COMPOUNDING))
    amount = p * (1 + r / 100 / n) ** (n * t)
    freq = COMPOUNDING[n]
    q = rng.choice([
        f"What will {money_in(p)} grow to in {plural(t, 'year')} at {pct_in(r)} compounded {freq}?",
        f"Calculate the compound amount for {money_in(p)} invested at {pct_in(r)} per year, compounded {freq}, for {plural(t, 'year')}.",
        f"If I invest {money_in(p)} at {pct_in(r)} annual interest compounded {freq}, how much will I have after {plural(t, 'year')}?",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the compound amount.", "Find the future value with compound interest."]),
        inp=f"Principal: {money_in(p)}; annual rate: {pct_in(r)}; compounding: {freq}; time: {plural(t, 'year')}",
        out=f"The compound amount is {money(amount)}.",
        key=("ci", p, r, t, n),
    )


def gen_percent_change(rng: random.Random) -> Example:
    old = rng.choice(range(20, 5001, 5))
    factor = rng.choice([x / 100 for x in range(50, 201) if x != 100])
    new = round(old * factor)
    if new == old:
        new += 5
    change = (new - old) / old * 100
    thing = rng.choice(["a stock price", "monthly revenue", "a home's value", "rent", "a portfolio"])
    q = rng.choice([
        f"What is the percentage change if {thing} goes from {money_in(old)} to {money_in(new)}?",
        f"Calculate the percentage change from {money_in(old)} to {money_in(new)}.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the percentage change.", "Find the percentage change between the two values."]),
        inp=f"Old value: {money_in(old)}; new value: {money_in(new)}",
        out=f"The percentage change is {change:+.2f}%.",
        key=("pc", old, new),
    )


def gen_roi(rng: random.Random) -> Example:
    cost = rng.choice(range(1000, 200001, 500))
    factor = rng.choice([x / 100 for x in range(60, 301) if x != 100])
    final = round(cost * factor / 10) * 10
    roi = (final - cost) / cost * 100
    q = rng.choice([
        f"What is the ROI on an investment that cost {money_in(cost)} and is now worth {money_in(final)}?",
        f"I invested {money_in(cost)} and sold for {money_in(final)}. What was my return on investment?",
        f"Calculate the ROI for a cost of {money_in(cost)} and a final value of {money_in(final)}.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the return on investment (ROI).", "Compute the ROI."]),
        inp=f"Cost: {money_in(cost)}; final value: {money_in(final)}",
        out=f"The ROI is {roi:.2f}%.",
        key=("roi", cost, final),
    )


def gen_loan_payment(rng: random.Random) -> Example:
    p = rng.choice(range(5000, 500001, 5000))
    r = rng.choice([2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 9, 10])
    years = rng.choice([2, 3, 4, 5, 7, 10, 15, 20, 25, 30])
    i = r / 100 / 12
    n = years * 12
    payment = p * i / (1 - (1 + i) ** -n)
    q = rng.choice([
        f"What is the monthly payment on a {money_in(p)} loan at {pct_in(r)} annual interest for {plural(years, 'year')}?",
        f"Calculate the monthly payment for borrowing {money_in(p)} over {plural(years, 'year')} at {pct_in(r)} APR.",
        f"I take out a {plural(years, 'year')} loan of {money_in(p)} at {pct_in(r)} per year. What is my monthly payment?",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the monthly loan payment.", "Find the fixed monthly payment for this loan."]),
        inp=f"Loan amount: {money_in(p)}; annual rate: {pct_in(r)}; term: {plural(years, 'year')}",
        out=f"The monthly payment is {money(payment)}.",
        key=("loan", p, r, years),
    )


def gen_break_even(rng: random.Random) -> Example:
    var = rng.choice(range(2, 201))
    margin = rng.choice(range(1, 101))
    units = rng.choice(range(50, 20001, 10))
    # Building fixed costs from the answer keeps the break-even point a whole number of units.
    fixed = units * margin
    price = var + margin
    q = rng.choice([
        f"How many units must be sold to break even with fixed costs of {money_in(fixed)}, a price of {money_in(price)} and a variable cost of {money_in(var)} per unit?",
        f"Calculate the break-even point in units: fixed costs {money_in(fixed)}, selling price {money_in(price)}, variable cost {money_in(var)} per unit.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the break-even point in units.", "How many units are needed to break even?"]),
        inp=f"Fixed costs: {money_in(fixed)}; price per unit: {money_in(price)}; variable cost per unit: {money_in(var)}",
        out=f"The break-even point is {units:,} units.",
        key=("be", fixed, price, var),
    )


def gen_profit_margin(rng: random.Random) -> Example:
    revenue = rng.choice(range(10000, 5000001, 1000))
    margin = rng.choice(range(1, 61)) + rng.choice([0, 0.25, 0.5, 0.75])
    profit = round(revenue * margin / 100 / 10) * 10
    actual = profit / revenue * 100
    q = rng.choice([
        f"What is the net profit margin for a company with revenue of {money_in(revenue)} and net income of {money_in(profit)}?",
        f"Calculate the profit margin if revenue is {money_in(revenue)} and net profit is {money_in(profit)}.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the net profit margin.", "Find the profit margin."]),
        inp=f"Revenue: {money_in(revenue)}; net income: {money_in(profit)}",
        out=f"The profit margin is {actual:.2f}%.",
        key=("pm", revenue, profit),
    )


def gen_currency(rng: random.Random) -> Example:
    src, dst = rng.choice(CURRENCIES)
    amount = rng.choice(range(10, 100001, 10))
    if dst == "JPY":
        rate = rng.choice([x / 100 for x in range(10000, 16001, 25)])
    else:
        rate = rng.choice([x / 10000 for x in range(6000, 15001, 25)])
    converted = amount * rate
    q = rng.choice([
        f"Convert {amount:,} {src} to {dst} at an exchange rate of 1 {src} = {rate:g} {dst}.",
        f"How much is {amount:,} {src} in {dst} if 1 {src} equals {rate:g} {dst}?",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Convert the amount at the given exchange rate.", "Perform the currency conversion."]),
        inp=f"Amount: {amount:,} {src}; rate: 1 {src} = {rate:g} {dst}",
        out=f"{amount:,.2f} {src} is {converted:,.2f} {dst}.",
        key=("fx", src, dst, amount, rate),
    )


def gen_rule_of_72(rng: random.Random) -> Example:
    r = rng.choice([x / 4 for x in range(4, 81)])
    years = 72 / r
    q = rng.choice([
        f"Using the rule of 72, how long does it take to double money at {pct_in(r)} per year?",
        f"Estimate the doubling time at an annual return of {pct_in(r)} with the rule of 72.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Use the rule of 72 to estimate the doubling time.", "Estimate how many years it takes to double the money."]),
        inp=f"Annual rate: {pct_in(r)}",
        out=f"It takes about {years:.1f} years to double.",
        key=("r72", r),
    )


def gen_dividend_yield(rng: random.Random) -> Example:
    price = rng.choice([x / 4 for x in range(40, 2001)])
    dividend = rng.choice([x / 100 for x in range(5, 1201, 5)])
    yld = dividend / price * 100
    q = rng.choice([
        f"What is the dividend yield of a stock priced at {money(price)} that pays {money(dividend)} per share each year?",
        f"Calculate the dividend yield: annual dividend {money(dividend)}, share price {money(price)}.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the dividend yield.", "Find the stock's dividend yield."]),
        inp=f"Annual dividend per share: {money(dividend)}; share price: {money(price)}",
        out=f"The dividend yield is {yld:.2f}%.",
        key=("dy", price, dividend),
    )


def gen_pe_ratio(rng: random.Random) -> Example:
    eps = rng.choice([x / 100 for x in range(25, 2001, 5)])
    pe_target = rng.choice(range(5, 61))
    price = round(eps * pe_target + rng.choice([0, 0.5, 1.25, -0.75]), 2)
    pe = price / eps
    q = rng.choice([
        f"What is the P/E ratio of a stock trading at {money(price)} with earnings per share of {money(eps)}?",
        f"Calculate the price-to-earnings ratio for a share price of {money(price)} and EPS of {money(eps)}.",
    ])
    return dict(
        q=q,
        instr=rng.choice(["Calculate the P/E ratio.", "Find the price-to-earnings ratio."]),
        inp=f"Share price: {money(price)}; EPS: {money(eps)}",
        out=f"The P/E ratio is {pe:.2f}.",
        key=("pe", price, eps),
    )


def gen_definition(rng: random.Random) -> Example:
    term = rng.choice(sorted(DEFINITIONS))
    q = rng.choice([f"What is {term}?", f"Define {term}.", f"Explain the term \"{term}\" in one sentence."])
    return dict(
        q=q,
        instr=rng.choice(["Define the following finance term.", "Explain this term in one sentence."]),
        inp=term,
        out=DEFINITIONS[term],
        key=("def", term),  # one record per term per file, so rendered rows never repeat
    )


NUMERIC_GENERATORS: list[Callable[[random.Random], Example]] = [
    gen_simple_interest, gen_compound_interest, gen_percent_change, gen_roi,
    gen_loan_payment, gen_break_even, gen_profit_margin, gen_currency,
    gen_rule_of_72, gen_dividend_yield, gen_pe_ratio,
]


def draw(rng: random.Random, *, definitions: bool = True, avoid: set | None = None, seen: set | None = None) -> Example:
    """Draw one example whose numbers are new to this file (``seen``) and absent from ``avoid``."""
    avoid = avoid or set()
    seen = seen if seen is not None else set()
    for _ in range(1000):
        if definitions and rng.random() < 0.12:
            ex = gen_definition(rng)
        else:
            ex = rng.choice(NUMERIC_GENERATORS)(rng)
        if ex["key"] in avoid or ex["key"] in seen:
            continue
        seen.add(ex["key"])
        return ex
    raise RuntimeError("could not draw a fresh example")


# ---------------------------------------------------------------- record shapes

def to_alpaca(ex: Example, with_input: bool) -> dict:
    if with_input:
        return {"instruction": ex["instr"], "input": ex["inp"], "output": ex["out"]}
    return {"instruction": ex["q"], "input": "", "output": ex["out"]}


def user_text(ex: Example, rng: random.Random) -> str:
    # Mostly the natural one-line question; sometimes instruction plus the numbers on their own line.
    if rng.random() < 0.25:
        return f"{ex['instr']}\n{ex['inp']}"
    return ex["q"]


def make_alpaca(rng: random.Random, n: int, seen: set, avoid: set | None = None, definitions: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        ex = draw(rng, definitions=definitions, avoid=avoid, seen=seen)
        # Every third record gets an empty input, deterministic rather than random so the ratio is exact.
        rows.append(to_alpaca(ex, with_input=(i % 3 != 0)))
    return rows


def make_prompt_completion(rng: random.Random, n: int, seen: set) -> list[dict]:
    return [
        {"prompt": user_text(ex, rng), "completion": ex["out"]}
        for ex in (draw(rng, seen=seen) for _ in range(n))
    ]


def make_messages(rng: random.Random, n: int, seen: set) -> list[dict]:
    rows = []
    for _ in range(n):
        ex = draw(rng, seen=seen)
        msgs = []
        if rng.random() < 0.6:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        msgs.append({"role": "user", "content": user_text(ex, rng)})
        msgs.append({"role": "assistant", "content": ex["out"]})
        rows.append({"messages": msgs})
    return rows


def make_sharegpt(rng: random.Random, n: int, seen: set) -> list[dict]:
    rows = []
    for _ in range(n):
        ex = draw(rng, seen=seen)
        rows.append({"conversations": [
            {"from": "human", "value": user_text(ex, rng)},
            {"from": "gpt", "value": ex["out"]},
        ]})
    return rows


def make_columns(rng: random.Random, n: int, seen: set) -> list[dict]:
    rows = []
    for i in range(n):
        ex = draw(rng, seen=seen)
        user = user_text(ex, rng)
        # Force a steady supply of the awkward CSV cases (embedded newline, quotes) in addition to
        # the commas that "$1,000"-style amounts already bring.
        if i % 10 == 3:
            user = f"{ex['instr']}\n{ex['inp']}"
        elif i % 10 == 7:
            user = f"Quick question, \"{ex['q']}\""
        system = rng.choice(SYSTEM_PROMPTS) if i % 4 else ""
        rows.append({"system": system, "user": user, "assistant": ex["out"]})
    return rows


# ---------------------------------------------------------------- writers

def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8", newline="\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["system", "user", "assistant"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pandas as pd  # only this output needs pandas/pyarrow

    df = pd.DataFrame(rows, columns=["instruction", "input", "output"])
    df.to_parquet(path, index=False, engine="pyarrow")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "samples", help="output folder (default: samples/)")
    parser.add_argument("--no-parquet", action="store_true", help="skip the parquet file (no pandas/pyarrow needed)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # One RNG per file: changing one file's size or recipe leaves the others byte-identical.
    # Each file de-duplicates its own numbers; the union of all of them is kept out of validation.
    seen = {name: set() for name in ["alpaca", "pc", "messages", "sharegpt", "columns"]}
    alpaca = make_alpaca(random.Random(SEED + 1), N_ALPACA, seen["alpaca"])
    files: dict[str, list[dict]] = {
        "finance_alpaca.jsonl": alpaca,
        "finance_prompt_completion.jsonl": make_prompt_completion(random.Random(SEED + 2), N_PROMPT_COMPLETION, seen["pc"]),
        "finance_messages.jsonl": make_messages(random.Random(SEED + 3), N_MESSAGES, seen["messages"]),
        "finance_sharegpt.json": make_sharegpt(random.Random(SEED + 4), N_SHAREGPT, seen["sharegpt"]),
        "finance_columns.csv": make_columns(random.Random(SEED + 5), N_COLUMNS, seen["columns"]),
    }
    all_train_keys = set().union(*seen.values())
    files["finance_alpaca_val.jsonl"] = make_alpaca(
        random.Random(SEED + 100), N_VAL, set(), avoid=all_train_keys, definitions=False
    )

    for name, rows in files.items():
        path = out / name
        if name.endswith(".jsonl"):
            write_jsonl(path, rows)
        elif name.endswith(".json"):
            write_json(path, rows)
        else:
            write_csv(path, rows)
        print(f"wrote {path} ({len(rows)} records)")
    if not args.no_parquet:
        path = out / "finance_alpaca.parquet"
        write_parquet(path, alpaca)
        print(f"wrote {path} ({len(alpaca)} records)")


if __name__ == "__main__":
    main()
