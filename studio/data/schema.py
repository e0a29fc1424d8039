"""Detect a dataset's schema, propose a column mapping, and map records to canonical examples.

Contract:
- ``detect(records)`` returns a ``Detection``: the schema kind (``alpaca``, ``prompt_completion``,
  ``messages``, ``sharegpt``, ``columns`` or ``unknown``), a proposed ``mapping`` from roles to column
  names, the columns found, and a sentence explaining it.  The user may override the mapping.
- ``to_example(record, mapping)`` returns an ``Example``: ``system``, ``instruction``, ``input``,
  ``response`` strings, plus ``messages`` (role/content dicts) for conversations.  Records with an
  empty instruction or response raise ``DataError`` naming the record and the field; callers decide
  whether to skip or stop.
Roles: ``system``, ``instruction``, ``input``, ``response`` (flat schemas) or ``messages``
(a list of turns, either role/content or ShareGPT from/value; in CSV, a cell may hold that list as
JSON text).

What counts as text (``text_of``): a string; a number (written as JSON writes it); null or a missing
value (empty); content given as a list of parts (``[{"type": "text", "text": ...}]``, joined as the
models' chat templates join them).  Anything else (a list of values, an object, an image part) is
refused with the place and the field, never trained on as its Python text.  A conversation is an
optional system turn, then user and assistant turns that alternate, ending with the assistant; tool
or function turns, a second turn of the same role in a row, or a system turn later on are refused with
the turn's number.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

from studio.data.files import DataError

ROLES = ("system", "instruction", "input", "response", "messages")

# Candidate column names per role, most specific first.
_CANDIDATES = {
    "instruction": ("instruction", "prompt", "question", "user", "query", "input_text", "human"),
    "input": ("input", "context"),
    "response": ("output", "response", "completion", "answer", "assistant", "target", "gpt"),
    "system": ("system", "system_prompt"),
    "messages": ("messages", "conversations", "conversation", "chat"),
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "bot": "assistant"}
_TOOL_ROLES = {"tool", "function", "ipython", "function_call", "function_response", "observation", "tool_call",
               "tool_response", "tool_calls"}
_NON_TEXT_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file"}
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 40, 40, 2


@dataclass
class Detection:
    kind: str
    mapping: dict[str, str]
    columns: list[str]
    message: str


@dataclass
class Example:
    instruction: str = ""
    response: str = ""
    input: str = ""
    system: str = ""
    messages: list[dict] = field(default_factory=list)


def columns_of(records: list[dict], limit: int = 200) -> list[str]:
    cols: dict[str, None] = {}
    for r in records[:limit]:
        for k in r:
            cols.setdefault(str(k), None)
    return list(cols)


def _as_turns(value: Any) -> Any:
    """A conversation given as JSON text (a CSV cell) becomes the list it spells; anything else is unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _turns_kind(value: Any) -> str | None:
    value = _as_turns(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return None
    first = value[0]
    if "role" in first and "content" in first:
        return "messages"
    if "from" in first and "value" in first:
        return "sharegpt"
    return None


def detect(records: list[dict]) -> Detection:
    cols = columns_of(records)
    lower = {c.strip().lower(): c for c in cols}  # "Instruction" or " output " (JSON keys are not trimmed)
    for cand in _CANDIDATES["messages"]:
        if cand in lower:
            # The first record that has a conversation decides (the first may hold an empty one).
            kind = next((k for r in records[:200] if (k := _turns_kind(r.get(lower[cand])))), None)
            if kind:
                return Detection(kind, {"messages": lower[cand]}, cols,
                                 f"Found a conversation column '{lower[cand]}' ({kind} format).")
    mapping: dict[str, str] = {}
    for role in ("instruction", "response", "input", "system"):
        for cand in _CANDIDATES[role]:
            if cand in lower and lower[cand] not in mapping.values():
                mapping[role] = lower[cand]
                break
    if "instruction" in mapping and "response" in mapping:
        names = {v.lower() for v in mapping.values()}
        if {"instruction", "output"} <= names or {"instruction", "response"} <= names:
            kind = "alpaca"
        elif {"prompt", "completion"} <= names:
            kind = "prompt_completion"
        elif {"user", "assistant"} <= names:
            kind = "columns"
        else:
            kind = "alpaca" if "input" in mapping else "prompt_completion"
        shown = ", ".join(f"{r} ← '{c}'" for r, c in mapping.items())
        return Detection(kind, mapping, cols, f"Detected {kind} schema: {shown}.")
    found = ", ".join(f"'{c}'" for c in cols) or "none"
    return Detection("unknown", mapping, cols,
                     f"Could not tell which columns hold the prompt and the answer. Columns found: {found}. "
                     "Map 'instruction' and 'response' (or 'messages') to columns.")


def check_mapping(mapping: dict[str, str], columns: list[str]) -> None:
    for role, col in mapping.items():
        if role not in ROLES:
            raise DataError(f"mapping: unknown role '{role}'; roles are {', '.join(ROLES)}.")
        if col and col not in columns:
            raise DataError(f"mapping: column '{col}' for role '{role}' is not in the data; "
                            f"columns found: {', '.join(columns)}.")
    if not mapping.get("messages") and not (mapping.get("instruction") and mapping.get("response")):
        raise DataError("mapping: map 'instruction' and 'response' to columns, or 'messages' to a "
                        "conversation column.")
    flat = [r for r in ("instruction", "input", "response", "system") if mapping.get(r)]
    if mapping.get("messages") and flat:
        # A conversation carries its own roles; the flat ones would be ignored without a word.
        raise DataError(f"mapping: 'messages' is mapped to '{mapping['messages']}', so {', '.join(flat)} would be "
                        "ignored; map either a conversation column or the flat roles, not both.")
    for i, r in enumerate(flat):
        other = next((o for o in flat[i + 1:] if mapping[o] == mapping[r]), None)
        if other:
            raise DataError(f"mapping: column '{mapping[r]}' is mapped to both '{r}' and '{other}'; each role "
                            "needs its own column.")


def _part_text(part: Any, where: str, n: int) -> str:
    if isinstance(part, dict):
        kind = str(part.get("type", "text")).lower()
        if kind == "text" and isinstance(part.get("text"), str):
            return part["text"]
        if kind in _NON_TEXT_PARTS:
            raise DataError(f"{where} part {n} is an '{kind}' part; only text can be trained on: remove that "
                            "part or the example.")
    raise DataError(f"{where} part {n} is not a text part {{'type': 'text', 'text': ...}} "
                    f"(found {_short.repr(part)}).")


def text_of(value: Any, where: str) -> str:
    """The text a field holds (see the module docstring), or DataError naming ``where`` (place and field)."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): no tokenizer can read it
            raise DataError(f"{where} holds an invalid character ({value[e.start]!r}, half of a UTF-16 pair, at "
                            f"character {e.start + 1}); fix or remove it.") from None
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return text_of(value.tolist(), where)  # numpy scalars and arrays from callers' own records
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # a missing value in pandas/Parquet
            return ""
        return json.dumps(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(p, dict) for p in value):
            # OpenAI-style content parts; chat templates write the text parts one after another.
            return "".join(_part_text(p, where, i) for i, p in enumerate(value, 1))
        raise DataError(f"{where} holds a list of {len(value)} values, not text; map a column that holds text "
                        "(or give the text as a string).")
    if isinstance(value, dict):
        if "text" in value and isinstance(value.get("text"), str) and str(value.get("type", "text")) == "text":
            return value["text"]
        raise DataError(f"{where} holds an object ({_short.repr(value)}), not text; map a column that holds text.")
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} holds binary data, not UTF-8 text.") from None
    import datetime
    import decimal

    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal)):
        return str(value)
    raise DataError(f"{where} holds a {type(value).__name__}, not text; map a column that holds text.")


def _norm_turns(value: Any, where: str) -> list[dict]:
    """Normalized role/content turns of one conversation, checked (see the module docstring)."""
    value = _as_turns(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: the conversation is missing.")
    if not isinstance(value, list):
        raise DataError(f"{where}: the conversation is not a list of turns (found {type(value).__name__}).")
    if not value:
        raise DataError(f"{where}: the conversation is empty.")
    turns = []
    for n, t in enumerate(value, 1):
        at = f"{where} turn {n}"
        if not isinstance(t, dict):
            raise DataError(f"{at}: a turn is not an object (found {type(t).__name__}).")
        if "role" in t:
            raw_role, content = t.get("role"), t.get("content")
        else:
            raw_role, content = t.get("from"), t.get("value")
        name = str(raw_role or "").strip().lower()
        role = _SHAREGPT_ROLES.get(name, "")
        if name in _TOOL_ROLES or (role == "assistant" and t.get("tool_calls")):
            raise DataError(f"{at} is a tool or function turn ('{name}'{' with tool_calls' if t.get('tool_calls') else ''}); "
                            "the templates here train on system, user and assistant text only: remove those turns "
                            "or those conversations.")
        if not role:
            raise DataError(f"{at}: unknown role {_short.repr(raw_role)}; use system, user or assistant "
                            "(ShareGPT: system, human, gpt).")
        text = text_of(content, f"{at} ({role})")
        turns.append({"role": role, "content": text})
    return _check_order(turns, where)


def _check_order(turns: list[dict], where: str) -> list[dict]:
    numbered = list(enumerate(turns, 1))  # turn numbers in messages count the turns as written
    if numbered[0][1]["role"] == "system" and not numbered[0][1]["content"].strip():
        numbered = numbered[1:]  # an empty system turn says nothing
    body = numbered[1:] if numbered and numbered[0][1]["role"] == "system" else numbered
    if not body:
        raise DataError(f"{where}: the conversation has no user turn.")
    expected = "user"
    for k, (n, t) in enumerate(body):
        if t["role"] == "system":
            raise DataError(f"{where} turn {n}: a system turn after the conversation began; only the first turn "
                            "may be a system turn.")
        if t["role"] != expected:
            if k == 0:
                raise DataError(f"{where} turn {n}: the conversation starts with an assistant turn; it must start "
                                "with a user turn (after an optional system turn).")
            raise DataError(f"{where} turn {n}: a second '{t['role']}' turn in a row; user and assistant turns "
                            "must alternate (merge the two turns or remove one).")
        if not t["content"].strip() and k < len(body) - 1:
            raise DataError(f"{where} turn {n}: the {t['role']} turn is empty.")
        expected = "assistant" if expected == "user" else "user"
    if body[-1][1]["role"] != "assistant" or not body[-1][1]["content"].strip():
        raise DataError(f"{where}: the conversation must end with a non-empty assistant turn.")
    return [t for _, t in numbered]


def to_example(record: dict, mapping: dict[str, str], where: str = "record") -> Example:
    if mapping.get("messages"):
        col = mapping["messages"]
        turns = _norm_turns(record.get(col), f"{where}, field '{col}'")
        system = turns[0]["content"] if turns[0]["role"] == "system" else ""
        body = turns[1:] if system else turns
        # Earlier turns become context so flat templates still see the whole dialogue.
        history = "\n".join(f"{t['role']}: {t['content']}" for t in body[:-2])
        return Example(instruction=body[-2]["content"], response=body[-1]["content"], input=history,
                       system=system, messages=turns)

    def get(role: str) -> str:
        col = mapping.get(role)
        return text_of(record.get(col), f"{where}, field '{col}'") if col else ""

    ex = Example(instruction=get("instruction"), response=get("response"), input=get("input"), system=get("system"))
    if not ex.instruction.strip():
        raise DataError(f"{where}: field '{mapping.get('instruction')}' is empty or missing.")
    if not ex.response.strip():
        raise DataError(f"{where}: field '{mapping.get('response')}' is empty or missing.")
    return ex
