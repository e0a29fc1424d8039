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
(a list of turns, either role/content or ShareGPT from/value).
"""

from __future__ import annotations

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


def _turns_kind(value: Any) -> str | None:
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
    lower = {c.lower(): c for c in cols}
    for cand in _CANDIDATES["messages"]:
        if cand in lower:
            kind = _turns_kind(records[0].get(lower[cand]))
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


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN from pandas
        return ""
    return str(v)


def _norm_turns(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: the conversation is not a list of turns.")
    turns = []
    for t in value:
        if not isinstance(t, dict):
            raise DataError(f"{where}: a turn is not an object.")
        if "role" in t:
            role, content = str(t.get("role", "")).lower(), _s(t.get("content"))
        else:
            role, content = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower(), ""), _s(t.get("value"))
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: unknown role {role or t!r}; use system, user or assistant.")
        turns.append({"role": role, "content": content})
    return turns


def to_example(record: dict, mapping: dict[str, str], where: str = "record") -> Example:
    if mapping.get("messages"):
        turns = _norm_turns(record.get(mapping["messages"]), where)
        if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise DataError(f"{where}: the conversation must end with a non-empty assistant turn.")
        system = turns[0]["content"] if turns[0]["role"] == "system" else ""
        body = turns[1:] if system else turns
        users = [t for t in body[:-1] if t["role"] == "user"]
        if not users:
            raise DataError(f"{where}: the conversation has no user turn.")
        # Earlier turns become context so flat templates still see the whole dialogue.
        history = "\n".join(f"{t['role']}: {t['content']}" for t in body[:-2])
        return Example(instruction=body[-2]["content"], response=body[-1]["content"], input=history,
                       system=system, messages=turns)
    ex = Example(
        instruction=_s(record.get(mapping.get("instruction", ""), "")),
        response=_s(record.get(mapping.get("response", ""), "")),
        input=_s(record.get(mapping["input"], "")) if mapping.get("input") else "",
        system=_s(record.get(mapping["system"], "")) if mapping.get("system") else "",
    )
    if not ex.instruction.strip():
        raise DataError(f"{where}: field '{mapping.get('instruction')}' is empty or missing.")
    if not ex.response.strip():
        raise DataError(f"{where}: field '{mapping.get('response')}' is empty or missing.")
    return ex
