"""From a ``DataSection`` to tokenized train/validation sets, plus the previews the UI draws.

Contract:
- ``load_raw(data_cfg, token)`` reads the local file or hub dataset into records (``DataError`` on failure).
- ``to_examples(records, mapping)`` maps records, skipping bad ones and reporting each skip by example
  number and field; it fails when nothing usable remains.
- ``split(examples, data_cfg)`` returns (train, validation), seeded; ``val_path`` wins over
  ``val_samples`` which wins over ``val_fraction``; ``train_samples`` then samples the train part.
- ``prepare(cfg, tokenizer)`` runs the whole path and returns ``Prepared`` with HF ``Dataset``s of
  ``input_ids``/``labels``, length stats and the skipped-record notes.
- ``select`` (map, skip, split, sample), ``check_tokenized`` (some response survives max_length) and
  ``check_batch`` are the refusals ``prepare`` makes before any dataset is built; ``check_ready`` runs the
  first two on at most ``limit`` examples for the Data tab's preview and for Start, so neither says
  ready where training would refuse.
- ``preview(...)`` returns per-example text, token pieces and which of them carry loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from studio.data.files import DataError, read_hub, read_records, where_of
from studio.data.schema import Detection, Example, check_mapping, columns_of, detect, to_example
from studio.data.stats import LengthStats, length_stats
from studio.data.templates import TemplateSpec, render
from studio.data.tokenize import Tokenized, tokenize_pair, tokenize_pairs


@dataclass
class Prepared:
    train: "TokenDataset"
    validation: "TokenDataset | None"
    train_examples: list[Example]
    val_examples: list[Example]
    stats: LengthStats
    detection: Detection
    skipped: list[str] = field(default_factory=list)
    dropped_fully_truncated: int = 0


def load_raw(data_cfg, token: str | None = None) -> list[dict]:
    if data_cfg.path:
        return read_records(data_cfg.path)
    if data_cfg.hub_dataset:
        return read_hub(data_cfg.hub_dataset, data_cfg.hub_config, data_cfg.split, token)
    raise DataError("data.path: no data chosen; upload a file or name a hub dataset.")


def resolve_mapping(records: list[dict], mapping: dict[str, str] | None) -> tuple[Detection, dict[str, str]]:
    det = detect(records)
    chosen = dict(mapping) if mapping else dict(det.mapping)
    check_mapping(chosen, columns_of(records))
    return det, chosen


def to_examples(records: list[dict], mapping: dict[str, str], source: str = "data") -> tuple[list[Example], list[str]]:
    """Map every record; a bad one is skipped with a note naming its place (file and line) and field."""
    out, skipped = [], []
    for i, r in enumerate(records):
        try:
            out.append(to_example(r, mapping, where_of(records, i, source)))
        except DataError as e:
            skipped.append(str(e))
    if not out:
        first = skipped[0] if skipped else "no records"
        raise DataError(f"{source}: no usable examples ({len(skipped)} skipped; first: {first}).")
    return out, skipped


def split(examples: list[Example], data_cfg, val_examples: list[Example] | None = None
          ) -> tuple[list[Example], list[Example]]:
    rng = random.Random(data_cfg.seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    if val_examples is not None:
        val, train = list(val_examples), [examples[i] for i in idx]
    else:
        n_val = data_cfg.val_samples or int(round(len(examples) * data_cfg.val_fraction))
        if n_val >= len(examples):
            raise DataError(f"data.val_samples: {n_val} validation examples leave none of the {len(examples)} "
                            "for training; hold out fewer.")
        val = [examples[i] for i in idx[:n_val]]
        train = [examples[i] for i in idx[n_val:]]
    if data_cfg.train_samples and data_cfg.train_samples < len(train):
        train = train[: data_cfg.train_samples]  # already shuffled with the seed: a seeded sample
    return train, val


def train_val_examples(data_cfg, token: str | None = None) -> tuple[list[Example], list[Example]]:
    """The run's training and held-out examples, exactly as training split them."""
    sel = select(data_cfg, load_raw(data_cfg, token), read_records(data_cfg.val_path) if data_cfg.val_path else None)
    return sel.train, sel.validation


def tokenize_examples(examples: list[Example], spec: TemplateSpec, tokenizer, max_length: int,
                      train_on_inputs: bool) -> list[Tokenized]:
    return tokenize_pairs([render(ex, spec, tokenizer) for ex in examples], tokenizer, max_length, train_on_inputs)


class TokenDataset:
    """A list of {input_ids, labels} rows: all the Trainer needs, with no Arrow dependency."""

    column_names = ["input_ids", "labels"]

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _dataset(toks: list[Tokenized]) -> tuple[TokenDataset, int]:
    keep = [{"input_ids": t.input_ids, "labels": t.labels} for t in toks if t.loss_tokens > 0]
    return TokenDataset(keep), len(toks) - len(keep)


@dataclass
class Selection:
    """The examples a run trains and validates on, as ``prepare`` chooses them."""

    detection: Detection
    mapping: dict[str, str]
    examples: list[Example]
    train: list[Example]
    validation: list[Example]
    skipped: list[str]


def select(d, records: list[dict], val_records: list[dict] | None = None) -> Selection:
    """Map, skip with notes, split and sample: every refusal up to tokens (``DataError``)."""
    det, mapping = resolve_mapping(records, d.mapping)
    examples, skipped = to_examples(records, mapping, d.path.split("/")[-1] if d.path else d.hub_dataset)
    val_given = None
    if val_records is not None:
        _, vmap = resolve_mapping(val_records, d.mapping)
        val_given, vskipped = to_examples(val_records, vmap, d.val_path.split("/")[-1])
        skipped += vskipped
    train_ex, val_ex = split(examples, d, val_given)
    return Selection(det, mapping, examples, train_ex, val_ex, skipped)


def check_tokenized(train_tok: list[Tokenized], d, measured_all: bool = True) -> int:
    """Refuse when no training example keeps a response token; return how many will be left out."""
    dropped = sum(1 for t in train_tok if t.loss_tokens == 0)
    if train_tok and dropped == len(train_tok):
        some = "" if measured_all else f" (all {len(train_tok)} measured)"
        raise DataError(f"data.max_length: every example's response is cut off at {d.max_length} tokens{some}; "
                        "raise the max length.")
    return dropped


@dataclass
class Readiness:
    """What the Data tab's preview and Start know before a run: the selection and the measured tokens."""

    selection: Selection
    measured: list[Example]  # the first ``limit`` examples of the file, in file order
    tokens: list[Tokenized]  # one per measured example
    dropped: int  # measured training examples whose whole response is cut away


def check_ready(d, records: list[dict], val_records: list[dict] | None, tokenizer, limit: int = 5000) -> Readiness:
    """The refusals of ``prepare`` that come before the model, on at most ``limit`` examples (DataError)."""
    sel = select(d, records, val_records)
    measured = sel.examples[:limit]
    toks = tokenize_examples(measured, TemplateSpec.from_config(d), tokenizer, d.max_length, d.train_on_inputs)
    by_id = {id(ex): t for ex, t in zip(measured, toks)}
    train_toks = [by_id[id(ex)] for ex in sel.train if id(ex) in by_id]
    dropped = check_tokenized(train_toks, d, measured_all=len(train_toks) == len(sel.train))
    return Readiness(sel, measured, toks, dropped)


def check_batch(n_train: int, batch_size: int) -> None:
    if n_train < batch_size:
        raise DataError(f"train.batch_size: only {n_train} training examples but the batch size is "
                        f"{batch_size}; lower the batch size or add examples.")


def prepare(cfg, tokenizer, token: str | None = None, records: list[dict] | None = None) -> Prepared:
    d = cfg.data
    records = records if records is not None else load_raw(d, token)
    sel = select(d, records, read_records(d.val_path) if d.val_path else None)
    train_ex, val_ex = sel.train, sel.validation
    spec = TemplateSpec.from_config(d)
    train_tok = tokenize_examples(train_ex, spec, tokenizer, d.max_length, d.train_on_inputs)
    val_tok = tokenize_examples(val_ex, spec, tokenizer, d.max_length, d.train_on_inputs)
    check_tokenized(train_tok, d)
    train_ds, dropped = _dataset(train_tok)
    check_batch(len(train_ds), cfg.train.batch_size)
    val_ds = _dataset(val_tok)[0] if val_tok else None
    stats = length_stats([t.full_length for t in train_tok], d.max_length)
    return Prepared(train_ds, val_ds, train_ex, val_ex, stats, sel.detection, sel.skipped, dropped)


def preview(examples: list[Example], spec: TemplateSpec, tokenizer, max_length: int, train_on_inputs: bool,
            n: int = 5) -> list[dict]:
    """For each of the first ``n`` examples: the rendered text and (piece, carries_loss) token spans."""
    out = []
    for ex in examples[:n]:
        prompt, response = render(ex, spec, tokenizer)
        tok = tokenize_pair(prompt, response, tokenizer, max_length, train_on_inputs)
        pieces = [(tokenizer.decode([i]), lab != -100) for i, lab in zip(tok.input_ids, tok.labels)]
        out.append({"prompt": prompt, "response": response, "tokens": pieces, "n_tokens": tok.full_length,
                    "loss_tokens": tok.loss_tokens, "truncated": tok.truncated})
    return out
