"""Prompt templates: the one function that turns an example into the text a model sees.

Contract: ``render(example, spec, tokenizer)`` returns ``(prompt, response)`` strings for training;
``render_prompt(text, spec, tokenizer, ...)`` returns the prompt for inference.  Both call the same
``_prompt`` so the playground sees exactly what training saw.  The response never contains EOS; the
tokenizer step appends it (unless the model's chat template already closes the turn with it).

Templates:
- ``alpaca``: ``### Instruction:`` / ``### Input:`` (omitted when the input is empty) / ``### Response:``
- ``qa``: ``### Question: …``, a blank line, ``### Answer: …``, a blank line, ``### End`` (the thorough
  seed recipe's format, character for character)
- ``chat``: the base model's own chat template (``tokenizer.apply_chat_template``)
- ``custom``: ``custom_prompt`` and ``custom_response`` with ``{system}``, ``{instruction}``,
  ``{input}`` and ``{response}`` placeholders, written bare (no format spec, conversion or index);
  ``check_custom`` refuses anything else, and ``RunConfig.validate`` calls it so Start refuses too.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from studio.data.files import DataError
from studio.data.schema import Example

PLACEHOLDERS = ("system", "instruction", "input", "response")


@dataclass(frozen=True)
class TemplateSpec:
    name: str = "alpaca"
    custom_prompt: str = ""
    custom_response: str = "{response}"

    @classmethod
    def from_config(cls, data_cfg) -> "TemplateSpec":
        return cls(data_cfg.template, data_cfg.custom_prompt, data_cfg.custom_response)


def describe(spec: TemplateSpec) -> str:
    """The template's text with placeholders, as shown (and edited) in the UI."""
    if spec.name == "alpaca":
        return ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"
                "\n\n(The ### Input block is omitted when the input is empty.)")
    if spec.name == "qa":
        return "### Question: {instruction}\n\n### Answer: {response}\n\n### End"
    if spec.name == "chat":
        return "The base model's own chat template (system / user / assistant turns)."
    return spec.custom_prompt + spec.custom_response


def custom_problem(custom_prompt: str, custom_response: str) -> tuple[str, str] | None:
    """(dotted key, what is wrong and how to fix it) for a custom template that cannot render, else None.

    The one check of a custom template: the Data tab's preview, ``RunConfig.validate`` (Start, the CLI,
    presets) and rendering all call it, so none of them says ready while another refuses.
    """
    if not (custom_prompt or "").strip():
        return "data.custom_prompt", "is empty; a custom template needs a prompt with {placeholders}."
    allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    found: dict[str, set] = {}
    for part, key in ((custom_prompt, "data.custom_prompt"), (custom_response or "", "data.custom_response")):
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(part) if f is not None]
        except ValueError as e:
            return key, f"{e}; write placeholders as {{instruction}} and literal braces as {{{{ }}}}."
        names = set()
        for name, spec, conv in fields:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            if name not in PLACEHOLDERS:
                return key, f"unknown placeholder {shown}; use {allowed}."
            if conv or spec:
                # str.format would apply them (and fail at the first example for codes like :d).
                return key, (f"placeholder {shown} has a " + ("conversion" if conv else "format spec")
                             + f"; write it bare, as {{{name}}}.")
            names.add(name)
        found[key] = names
    if "response" in found["data.custom_prompt"]:
        return "data.custom_prompt", ("holds {response}: the answer would be in the prompt; put {response} in "
                                      "data.custom_response.")
    if "response" not in found["data.custom_response"]:
        return "data.custom_response", "must contain {response}."
    if "instruction" not in found["data.custom_prompt"] | found["data.custom_response"]:
        # Without it every example would be trained on the same prompt ({{instruction}} is literal text).
        return "data.custom_prompt", "has no {instruction}: every example would get the same prompt; add it."
    return None


def check_custom(spec: TemplateSpec) -> None:
    problem = custom_problem(spec.custom_prompt, spec.custom_response)
    if problem:
        raise DataError(f"{problem[0]}: {problem[1]}")


def _chat_messages(ex: Example) -> list[dict]:
    if ex.messages:
        return ex.messages
    user = ex.instruction if not ex.input else f"{ex.instruction}\n\n{ex.input}"
    msgs = [{"role": "system", "content": ex.system}] if ex.system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": ex.response}]


def _apply_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a model's Jinja template raises its own errors (roles, system turns)
        raise DataError(f"data.template: the model's chat template refused this conversation ({type(e).__name__}: "
                        f"{str(e)[:200]}); choose alpaca, qa or custom, or change the data.") from None


def _prompt(ex: Example, spec: TemplateSpec, tokenizer) -> str:
    if spec.name == "alpaca":
        head = f"{ex.system}\n\n" if ex.system else ""
        inp = f"### Input:\n{ex.input}\n\n" if ex.input.strip() else ""
        return f"{head}### Instruction:\n{ex.instruction}\n\n{inp}### Response:\n"
    if spec.name == "qa":
        question = ex.instruction if not ex.input.strip() else f"{ex.instruction}\n{ex.input}"
        head = f"{ex.system}\n\n" if ex.system else ""
        return f"{head}### Question: {question}\n\n### Answer: "
    if spec.name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template: this model has no chat template; choose alpaca, qa or custom.")
        msgs = _chat_messages(ex)[:-1]
        return _apply_chat(tokenizer, msgs, add_generation_prompt=True)
    check_custom(spec)
    return spec.custom_prompt.format(system=ex.system, instruction=ex.instruction, input=ex.input, response="")


def render(ex: Example, spec: TemplateSpec, tokenizer=None) -> tuple[str, str]:
    prompt = _prompt(ex, spec, tokenizer)
    if spec.name == "alpaca":
        return prompt, ex.response
    if spec.name == "qa":
        return prompt, f"{ex.response}\n\n### End"
    if spec.name == "chat":
        full = _apply_chat(tokenizer, _chat_messages(ex))
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, ex.response
    return prompt, spec.custom_response.format(system=ex.system, instruction=ex.instruction, input=ex.input,
                                               response=ex.response)


def render_prompt(text: str, spec: TemplateSpec, tokenizer=None, *, system: str = "", input: str = "") -> str:
    return _prompt(Example(instruction=text, input=input, system=system), spec, tokenizer)


def stop_strings(spec: TemplateSpec) -> list[str]:
    """Text after which generation should stop even without EOS (the template's own end marker)."""
    return ["### End"] if spec.name == "qa" else []
