"""Preference pairs for the preference stage: read, checked, counted, and the stage started on them.

What the UI calls (Gradio-free; every error is a ``DataError`` or ``ConfigError`` whose message names the file,
the line and the field, ready to show as is):

- ``count_pairs(run) -> int``: how many of the studio's Playground votes (``<home>/preferences.jsonl``) were cast
  on ``run``'s answers, i.e. the pairs a "Train on these votes" button would train on.
- ``start_stage(parent, method="", checkpoint=0, votes="", preset="", overrides=None, store=None, name="",
  env=None) -> Run`` (``method`` empty: the preset's, else dpo):
  checks the pairs now (too few, empty fields, chosen equal to rejected, a prompt already holding template
  text, votes cast on another run or base model), then creates the stage's run folder (its config is the
  parent's with the ``prefer`` section filled; the worker keeps the checked pairs in its ``pairs.jsonl``) and
  launches the same worker process as ``train``.  Follow it like any run (``studio.follow`` / the Train tab draws its
  ``metric`` events: loss, ``reward_margin``, ``reward_accuracy``, ``logps_chosen``, ``logps_rejected``).
- ``stage_adapters(run) -> dict[label, path]``: for a stage run, its parent's starting adapter and its own, so
  the Playground and Evaluate can load both on one base and compare SFT and preference answers blind
  (``ModelHolder``/``load_for_inference`` take such a mapping).
- ``stage_presets() -> dict[name, path]``: the stage's presets, shipped in ``presets/prefer/`` (``dpo-tiny``,
  ``dpo-mistral-7b``, ``orpo-mistral-7b``, ``kto-mistral-7b``: a ``prefer`` section only, so they are kept out
  of the SFT presets list) and the user's saved ones; the Train tab's stage picker lists these.
- ``stage_config(parent, ...)`` builds that config without starting anything (for a preview), and
  ``stage_estimate(cfg)`` its peak GPU memory (``studio.estimate.Estimate``; None for an unknown model shape).

Pair sources, in order: ``prefer.votes`` (a JSONL/JSON/CSV/Parquet file of ``prompt/chosen/rejected`` rows, or
``prompt/completion/label`` rows for KTO), ``prefer.hub_dataset``, else the studio's votes for the parent run.
A row may also carry ``input`` and ``system`` (rendered by the run's template like training data) and the
Playground's ``run``, ``adapter``, ``winner``, ``base_model`` and ``messages`` (a vote's conversation: its
``prompt`` must then be the run's template rendering of it, and a later turn trains on that whole prompt).
Votes from the studio's file that belong to other runs (or name none) are left out, and counted in the ``data``
event's ``left_out``; in a file the user names, a row for another run or base model is refused.

The UI should record ``base_model`` with each vote (``record_vote(..., meta={"run", "adapter", "winner",
"base_model"})``) so votes on a run whose base changed are refused too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from studio.config import SPEED_SWITCHES, ConfigError, RunConfig
from studio.data.files import DataError, Records, read_hub, read_records
from studio.runs import Run, RunStore

PAIRS_FILE = "pairs.jsonl"  # the checked pairs a stage trains on, kept in its run folder

# Text that only a template writes: a prompt holding one was formatted already (for this template or
# another), and the run's template would wrap it a second time.
TEMPLATE_MARKERS = ("### Instruction:", "### Input:", "### Response:", "### Question:", "### Answer:", "### End",
                    "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>",
                    "<start_of_turn>", "<|user|>", "<|assistant|>")


@dataclass
class Pair:
    """One preference: for ``prompt`` (with optional ``input``/``system``), ``chosen`` beat ``rejected``."""

    prompt: str
    chosen: str
    rejected: str
    input: str = ""
    system: str = ""
    # A Playground vote on a later turn of a conversation: the whole prompt as the model read it (earlier turns
    # included, in the run's template); ``prompt`` is then the last user message.
    rendered: str = ""


@dataclass
class Single:
    """One KTO example: ``completion`` for ``prompt`` is good (``label`` True) or bad."""

    prompt: str
    completion: str
    label: bool
    input: str = ""
    system: str = ""


@dataclass
class PairSet:
    pairs: list  # of Pair, or of Single for kto rows
    source: str
    left_out: int = 0  # studio votes for other runs

    @property
    def kind(self) -> str:
        return "single" if self.pairs and isinstance(self.pairs[0], Single) else "pairs"


def studio_votes_path() -> Path:
    from studio.playground import preferences_path

    return preferences_path()


def _markers(cfg: RunConfig, tokenizer=None) -> list[str]:
    out = list(TEMPLATE_MARKERS)
    d = cfg.data
    if d.template == "custom":
        import string

        for chunk in (d.custom_prompt, d.custom_response):
            out += [lit.strip() for lit, *_ in string.Formatter().parse(chunk) if lit and len(lit.strip()) >= 4]
    if tokenizer is not None:
        out += [t for t in tokenizer.all_special_tokens if len(t) >= 3]  # <s>, </s>, <unk>, ...
    return [m for m in dict.fromkeys(out) if m]


def _text(rec: dict, key: str, where: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if not required:
            return ""
        raise DataError(f"{where}: field '{key}' is {'missing' if v is None else 'empty'}; every row needs "
                        "prompt, chosen and rejected (kto: prompt, completion and label).")
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be text, found {type(v).__name__}; conversational "
                        "(list of messages) rows are not supported: put the user's text in prompt.")
    return v


def _label(v, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{where}: field 'label' must be true or false, found {v!r}.")


def _check_renders(cfg: RunConfig, tokenizer, prompt: str, extra: dict, where: str,
                   rendered: str = "") -> None:
    """The run's template renders the prompt, and leaves room for an answer within ``prefer.max_length``."""
    from studio.data.templates import TemplateSpec, render_prompt
    from studio.data.tokenize import encode_prompt

    try:
        text = rendered or render_prompt(prompt, TemplateSpec.from_config(cfg.data), tokenizer, **extra)
    except DataError as e:
        raise DataError(f"{where}: field 'prompt': {e}") from None
    n, limit = len(encode_prompt(tokenizer, text)), cfg.prefer.max_length
    if n >= limit:
        raise DataError(f"{where}: field 'prompt' is {n} tokens in the run's template, at or above "
                        f"prefer.max_length ({limit}): no answer token would be trained. Shorten the prompt or raise "
                        "prefer.max_length.")


def _conversation(rec: dict, cfg: RunConfig, tokenizer, where: str) -> tuple[str, str]:
    """A Playground vote (it carries ``messages``, and its ``prompt`` is that conversation rendered as the model read
    it) -> (the last user message, the rendered prompt when earlier turns precede it, else "").

    Its prompt must be the run's template rendering of its messages: a vote cast under another template (or
    edited by hand) is refused rather than trained on text the run's model never reads."""
    msgs = rec["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs) \
            or msgs[-1].get("role") != "user":
        raise DataError(f"{where}: field 'messages' must be role/content messages ending with the user's message.")
    prompt, text = _text(rec, "prompt", where), msgs[-1]["content"]
    if tokenizer is not None:
        from studio.data.templates import TemplateSpec
        from studio.generate import render_conversation

        try:
            expected = render_conversation(msgs[:-1], text, TemplateSpec.from_config(cfg.data), tokenizer)
        except DataError as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        if expected != prompt:
            raise DataError(f"{where}: field 'prompt' is not the run's template ({cfg.data.template}) rendering of "
                            "field 'messages': the vote was cast under another template or edited. Remove the line.")
    return text, (prompt if len(msgs) > 1 else "")


def check_records(records: Records, cfg: RunConfig, parent: Run | None, method: str, *, own_votes: bool = False,
                  tokenizer=None) -> PairSet:
    """Turn raw rows into checked pairs, or raise ``DataError`` naming the file, line and field.

    ``own_votes``: the rows are the studio's vote file, where rows for other runs are skipped rather than refused.
    """
    markers = _markers(cfg, tokenizer)
    out, left_out = [], 0
    for i, rec in enumerate(records):
        where = records.where(i)
        voted_on = rec.get("run")
        if parent is not None and voted_on not in (None, "") and voted_on != parent.id:
            if own_votes:
                left_out += 1
                continue
            raise DataError(f"{where}: field 'run' is {voted_on!r}, but this stage trains on run {parent.id!r}: the "
                            "votes were cast on another run's answers. Start the stage on that run, or remove the "
                            "line.")
        if own_votes and voted_on in (None, ""):
            left_out += 1  # a vote the Playground saved without its run cannot be placed
            continue
        base = rec.get("base_model")
        if base not in (None, "") and base != cfg.model.base_model:
            raise DataError(f"{where}: field 'base_model' is {base!r}, but run {parent.id if parent else ''!r} "
                            f"tunes {cfg.model.base_model!r}: votes on another base model's answers. Remove the "
                            "line or start the stage on a run of that model.")
        rendered = ""
        if isinstance(rec.get("messages"), list) and rec["messages"]:  # a Playground vote
            prompt, rendered = _conversation(rec, cfg, tokenizer, where)
        else:
            prompt = _text(rec, "prompt", where)
        extra = {"input": _text(rec, "input", where, False), "system": _text(rec, "system", where, False)}
        for key, value in (("prompt", prompt), ("input", extra["input"])):
            hit = next((m for m in markers if m in value), None)
            if hit:
                raise DataError(f"{where}: field '{key}' already holds template text {hit!r}; a vote holds the "
                                f"user's own text, which the run's template ({cfg.data.template}) formats. Remove "
                                "the template parts from the prompt, or the line.")
        if tokenizer is not None:
            _check_renders(cfg, tokenizer, prompt, extra, where, rendered)
        if "completion" in rec and "chosen" not in rec:
            if method != "kto":
                raise DataError(f"{where}: a prompt/completion/label row (KTO's format); {method} needs pairs "
                                "(prompt, chosen, rejected): choose method kto, or give pairs.")
            out.append(Single(prompt, _text(rec, "completion", where), _label(rec.get("label"), where), **extra))
            continue
        chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
        if chosen.strip() == rejected.strip():
            raise DataError(f"{where}: field 'rejected' is the same text as field 'chosen'; a preference needs two "
                            "different answers. Remove the line.")
        out.append(Pair(prompt, chosen, rejected, **extra, rendered=rendered))
    kinds = {type(p) for p in out}
    if len(kinds) > 1:
        raise DataError(f"{records.source}: mixes pairs (prompt/chosen/rejected) and single answers "
                        "(prompt/completion/label); use one kind per file.")
    return PairSet(out, records.source, left_out)


def load_pairs(cfg: RunConfig, parent: Run | None, token: str | None = None, tokenizer=None) -> PairSet:
    """The checked pairs ``cfg.prefer`` names (see the module docstring for the sources), or ``DataError``."""
    p = cfg.prefer
    own = False
    if p.votes.strip():
        from studio.paths import shipped_file

        records = read_records(shipped_file(p.votes))
    elif p.hub_dataset.strip():
        records = read_hub(p.hub_dataset, p.hub_config, p.hub_split, token)
    else:
        path = studio_votes_path()
        if not path.is_file():
            raise DataError(f"{path}: no votes yet; vote on run {p.parent_run!r}'s answers in the Playground, "
                            "or give a pairs file (prefer.votes).")
        records, own = read_records(path), True
    got = check_records(records, cfg, parent, p.method, own_votes=own, tokenizer=tokenizer)
    n = len(got.pairs)
    if n < p.min_pairs + p.val_pairs:
        unit = "answers" if got.kind == "single" else "pairs"
        mine = f" for run {p.parent_run!r}" if own else ""
        held = f" plus {p.val_pairs} held out (prefer.val_pairs)" if p.val_pairs else ""
        raise DataError(f"{got.source}: {n} usable {unit}{mine}; the preference stage needs at least "
                        f"{p.min_pairs} (prefer.min_pairs){held}. Vote on more answers in the Playground, or lower "
                        "prefer.min_pairs.")
    return got


def write_pairs(pairs: PairSet, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs.pairs:
            f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_pairs(path: Path) -> PairSet:
    """A stage's own ``pairs.jsonl`` (written by ``write_pairs`` after the checks)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return PairSet([Single(**r) if "completion" in r else Pair(**r) for r in rows], path.name)


# ---- what the UI calls -------------------------------------------------------------------------------------

def count_pairs(run: Run) -> int:
    """The studio's votes cast on ``run``'s answers (rows with another run or without one are not counted)."""
    path = studio_votes_path()
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        n += isinstance(rec, dict) and rec.get("run") == run.id
    return n


def stage_adapters(run: Run, store: RunStore | None = None) -> dict[str, Path]:
    """``{"<parent id>": its starting adapter, "<run id>": this stage's adapter}`` for a finished stage run."""
    p = run.config().prefer
    if not p.parent_run:
        raise ConfigError("prefer.parent_run", f"run {run.id!r} is not a preference stage.")
    store = store or RunStore(run.dir.parent)
    try:
        parent = store.get(p.parent_run)
    except KeyError:
        raise ConfigError("prefer.parent_run", f"the parent run {p.parent_run!r} is gone.") from None
    out = {parent.id: parent_adapter(parent, p.parent_checkpoint)}
    if (run.adapter_dir / "adapter_model.safetensors").is_file():
        out[run.id] = run.adapter_dir
    return out


def stage_estimate(cfg: RunConfig):
    """Peak GPU memory of the stage ``cfg`` describes: each micro-batch runs ``2 x prefer.batch_size`` rows (chosen
    and rejected; KTO's answers and their KL rows) of up to ``prefer.max_length`` tokens, and DPO and KTO keep
    a frozen copy of the adapter as the reference.  None when the model's shape is unknown offline."""
    from studio.estimate import arch_for, estimate

    arch = arch_for(cfg)
    if arch is None:
        return None
    p = cfg.prefer
    from studio.speed.plan import reference

    est = estimate(cfg, arch, reference(cfg), micro_batch=2 * p.batch_size, seq_len=p.max_length)
    if p.method in ("dpo", "kto"):
        opt = 2 if "8bit" in cfg.train.optimizer else (0 if cfg.train.optimizer == "sgd" else 8)
        est.parts["reference adapter"] = est.parts["LoRA + grads + optimizer"] * 4 // (8 + opt)  # fp32, no grads
    return est


def stage_presets() -> dict[str, Path]:
    """Presets of the preference stage: the shipped ones in ``presets/prefer/`` (kept out of the SFT presets
    beside them), then the user's saved presets that hold a ``prefer`` section and nothing else but a name and
    description."""
    import yaml

    from studio.paths import presets_dir, user_presets_dir

    out: dict[str, Path] = {}
    shipped = presets_dir() / "prefer"
    for path in sorted(shipped.glob("*.yaml")) if shipped.is_dir() else []:
        out[path.stem] = path
    mine = user_presets_dir()
    for path in sorted(mine.glob("*.yaml")) if mine.is_dir() else []:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "prefer" in data and set(data) <= {"name", "description", "prefer"}:
            out.setdefault(path.stem, path)
    return out


def load_stage_preset(name_or_path: str) -> RunConfig:
    """A stage preset by name (``dpo-tiny``) or path; ``ConfigError`` listing the known ones otherwise."""
    from studio.presets import load_preset

    if Path(name_or_path).suffix:
        return load_preset(name_or_path)
    known = stage_presets()
    if name_or_path not in known:
        raise ConfigError("--preset", f"no preference-stage preset {name_or_path!r}; known: {', '.join(known)}.")
    return load_preset(known[name_or_path])


def parent_adapter(parent: Run, checkpoint: int = 0) -> Path:
    """The adapter folder a stage starts from: the run's final adapter, or checkpoint ``checkpoint``."""
    if checkpoint:
        path = parent.checkpoints_dir / f"checkpoint-{checkpoint}"
        if path not in parent.checkpoints():
            have = ", ".join(p.name.split("-")[-1] for p in parent.checkpoints()) or "none"
            raise ConfigError("prefer.parent_checkpoint", f"run {parent.id!r} has no complete checkpoint {checkpoint} "
                              f"(complete ones: {have}).")
        return path
    if not (parent.adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError("prefer.parent_run", f"run {parent.id!r} has no final adapter ({parent.status}); let it "
                          "finish, or start from one of its checkpoints (prefer.parent_checkpoint).")
    return parent.adapter_dir


# The stage runs on one device; its speed parts are the planner's (the plain path: TRL's trainer runs none of the
# SFT recipe's speed machinery), whatever the parent pinned.
_STAGE_OFF = {"train.fsdp": False, "train.num_gpus": 1,
              **{f"speed.{k}": "auto" for k in SPEED_SWITCHES}, "speed.micro_batch": 0}


def stage_config(parent: Run, method: str = "", checkpoint: int = 0, votes: str = "", preset: str = "",
                 overrides: dict | None = None) -> RunConfig:
    """The stage's config: the parent's, its ``prefer`` section from ``preset`` (a preset's prefer section, e.g.
    ``dpo-tiny``), then ``method``/``checkpoint``/``votes``, then dotted ``overrides``; outputs of the parent
    (adapter copy, merge, Hub push, run name) are not repeated."""
    chosen = load_stage_preset(preset) if preset else None
    cfg = parent.config()
    d = cfg.to_dict()
    d["prefer"] = (chosen or RunConfig()).to_dict()["prefer"]
    base = RunConfig.from_dict(d, validate=False)
    ov = {**_STAGE_OFF, "output.adapter_dir": "", "output.merge": False, "output.push_to_hub": False,
          "output.run_name": "", "prefer.parent_run": parent.id, "prefer.parent_checkpoint": checkpoint}
    if chosen:
        ov["name"] = chosen.name
        ov["description"] = f"{chosen.description} On run {parent.id}."
    if method:
        ov["prefer.method"] = method
    if votes:
        ov["prefer.votes"] = str(Path(votes).resolve())
    ov.update(overrides or {})
    if ov.get("prefer.parent_run") != parent.id:
        raise ConfigError("prefer.parent_run", f"is {ov['prefer.parent_run']!r}; the stage starts on {parent.id!r}.")
    cfg = base.replace(ov)
    if not preset and "name" not in (overrides or {}):
        cfg.name = f"{cfg.prefer.method}-{parent.id}"[:100]
    parent_adapter(parent, cfg.prefer.parent_checkpoint)
    return cfg


def start_stage(parent: Run, method: str = "", checkpoint: int = 0, votes: str = "", preset: str = "",
                overrides: dict | None = None, store: RunStore | None = None, name: str = "",
                env: dict | None = None) -> Run:
    """Check everything, then create the stage's run folder and launch its worker; returns the new run."""
    from studio import worker
    from studio.modeling import load_tokenizer, preflight

    store = store or RunStore()
    cfg = stage_config(parent, method, checkpoint, votes, preset, overrides)
    preflight(cfg)
    load_pairs(cfg, parent, tokenizer=load_tokenizer(cfg))  # refused here, not a second later in the worker
    # The worker checks the pairs again and keeps them in the run folder (pairs.jsonl), which a resume reuses.
    return worker.start(store, cfg, name or f"{cfg.prefer.method}-{parent.id}"[:80], env=env)
