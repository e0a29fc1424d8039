"""A tiny Mistral-architecture causal LM, built (and briefly pretrained) locally and offline.

Why: the studio's whole pipeline (load in 4-bit, attach LoRA, train, evaluate,
merge, generate) must be exercisable in tests and in an offline demo, where no
Hugging Face Hub checkpoint can be downloaded. This module builds a stand-in
checkpoint that looks to ``transformers`` like any Mistral model on disk.

Why pretrained: with random base weights a LoRA learns far too slowly for the
``tiny-demo`` preset to show any effect in minutes on a CPU. So the build ends
with a short deterministic pretraining stage (``_pretrain``: full-parameter,
float32, CPU, one process, fixed seed, a fixed number of steps, see ``PRETRAIN``;
about 15-20 s of a ~25 s build on two idle cores) on PLAIN text made from the
sample records (``_pretrain_docs``: the fields of each record joined by newlines,
held-out ``*_val*`` files left out). That text holds no template marker
(``###``), no role marker and never ``</s>``; documents are separated by ``<s>``.
The base model therefore knows the vocabulary and the finance phrasing but
neither a prompt format nor when to stop: it never emits EOS and rambles on
into the next "question", while a LoRA tuned on the Alpaca template learns within
a few dozen steps to answer in one sentence and stop.

Contract
--------
``build_tiny_model(out_dir, *, seed=0, force=False) -> Path``
    Writes a complete checkpoint directory and returns it:
    ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32,
    safetensors only, no pickles), the tokenizer files, ``README.md`` and the
    marker file ``tiny_model.json``. Both
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` load it with no network access,
    and it also loads 4-bit NF4 through bitsandbytes on CPU.
    Same seed + same ``samples/`` texts + same library versions => the same bytes
    for the weights and tokenizer files, on any core count: pretraining pins
    ``torch.set_num_threads(PRETRAIN["threads"])`` (and restores it). Float kernels
    can still round differently on another CPU instruction set (e.g. AVX2 vs
    AVX-512), so two machines may differ in the last bits of the weights; the
    marker's fingerprint does not depend on that. An existing build is kept (no work, ~10 ms)
    unless ``force`` or its marker shows a different seed, recipe or sample corpus.
    The directory is written in a temporary sibling and then renamed, so nobody
    sees a half-written model and a crashed build leaves nothing that looks complete.
``default_tiny_model_dir() -> Path``
    ``$STUDIO_TINY_MODEL_DIR`` if set, else ``<repo>/models/tiny-mistral`` in a clone and
    ``<studio home>/models/tiny-mistral`` when installed (``studio.paths.tiny_model_dir``).
``ensure_tiny_model() -> Path``
    ``build_tiny_model(default_tiny_model_dir())``: builds on first use (or after
    ``samples/`` or the recipe changed), otherwise returns the existing path.
``python -m studio.tiny_model [OUT_DIR] [--seed N] [--force]`` builds from the shell.

Model: ``MistralForCausalLM``, hidden 128, MLP 256, 2 layers, 4 query heads,
2 KV heads (head_dim 32), 512 positions, untied embeddings, vocab = tokenizer
length (2048). Every Linear dimension is a multiple of 64 so bitsandbytes can
quantize all of them to NF4.

Tokenizer: byte-level BPE (any UTF-8 text round-trips, ``<unk>`` is never
produced) trained on the texts of ``samples/*.jsonl|json|csv`` plus the prompt
template marker lines, wrapped as a ``PreTrainedTokenizerFast``.

    id 0 ``<unk>``, id 1 ``<s>`` (bos), id 2 ``</s>`` (eos), id 3 ``<pad>`` (pad != eos),
    ids 4-6 ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (chat role markers; registered
    as special tokens, so they are never split and ``skip_special_tokens`` drops them).

BOS policy, same as Llama/Mistral/Zephyr: the post-processor prepends ``<s>``
whenever a text is encoded with ``add_special_tokens=True`` (the default); EOS is
never added automatically. The chat template therefore does NOT contain
``bos_token`` (Zephyr style), so ``tokenizer(apply_chat_template(..., tokenize=False))``
yields exactly one ``<s>``, while ``apply_chat_template(..., tokenize=True)`` encodes
without special tokens and so has none (both exactly as with Zephyr).
Every message ends with ``</s>``, and nothing separates messages:

    <|system|>\\n{content}</s><|user|>\\n{content}</s><|assistant|>\\n{content}</s>

and ``add_generation_prompt=True`` appends ``<|assistant|>\\n``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from studio import paths

# The marker's fingerprint covers the constants below and the sample texts; bump this when
# the build *code* changes in a way that alters the output, so old checkpoints get rebuilt.
RECIPE_VERSION = 2
MARKER_FILE = "tiny_model.json"

SAMPLES_DIR = paths.samples_dir()

VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 512

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Order fixes the ids: unk=0, bos=1, eos=2 like Llama/Mistral, then pad and the role markers.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]

TEMPLATE_MARKERS = [
    "### Instruction:",
    "### Input:",
    "### Response:",
    "### Question:",
    "### Answer:",
    "### End",
]

# Nothing follows a message's </s> (unlike Zephyr's trailing newline), so the rendered
# answer of a conversation ends exactly in EOS and code that appends EOS when missing
# does not produce "</s>\n</s>".
# {% generation %} marks the assistant's tokens so return_assistant_tokens_mask (and TRL's
# assistant_only_loss) work with this template, as they do with recent official templates.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODEL_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MODEL_MAX_LENGTH,
)


# The short pretraining stage (see _pretrain). Full-parameter, float32, on the CPU, one process,
# a fixed number of steps (never a time budget) so the result does not depend on machine speed.
PRETRAIN = dict(
    steps=70,
    batch_size=16,
    seq_len=128,
    learning_rate=8e-3,
    warmup_steps=10,
    min_lr_ratio=0.1,
    weight_decay=0.0,
    max_grad_norm=1.0,
    # Fixed so the float reduction order (and thus the bytes) does not follow the host's core count
    # (measured with torch 2.13 CPU: 1 and 2 threads give identical weights, 3 threads do not).
    threads=2,
)
# Held-out files stay out of the pretraining text so they remain unseen by the base model.
PRETRAIN_EXCLUDE = ("_val",)
ROLE_VALUES = {"system", "user", "assistant", "human", "gpt"}


def default_tiny_model_dir() -> Path:
    return paths.tiny_model_dir()


# ---------------------------------------------------------------- corpus

def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _corpus(samples_dir: Path) -> list[str]:
    """All string values in the sample files, in a fixed order, plus the template markers.

    Field names and role values ("instruction", "gpt", ...) come along too; they are a
    negligible share of the text and keeping the reader format-agnostic is worth more.
    """
    texts: list[str] = []
    if samples_dir.is_dir():
        # sorted(): the BPE merges depend on corpus order only through ties, but a fixed
        # order removes any doubt about filesystem listing order.
        for path in sorted(samples_dir.iterdir()):
            if path.suffix == ".jsonl":
                with path.open(encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            texts.extend(_strings(json.loads(line)))
            elif path.suffix == ".json":
                texts.extend(_strings(json.loads(path.read_text(encoding="utf-8"))))
            elif path.suffix == ".csv":
                with path.open(encoding="utf-8", newline="") as f:
                    for row in csv.reader(f):
                        texts.extend(row)
    # Repeated so the markers win merges of their own even if no sample uses them.
    marker_block = "\n".join(TEMPLATE_MARKERS + [f"{r}\n" for r in ("system", "user", "assistant")])
    texts.extend([marker_block] * 50)
    return texts


def _records(samples_dir: Path) -> Iterator[list[str]]:
    """The string fields of every record in the sample files (parquet skipped: it repeats the jsonl)."""
    if not samples_dir.is_dir():
        return
    for path in sorted(samples_dir.iterdir()):
        if any(x in path.stem for x in PRETRAIN_EXCLUDE):
            continue
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield list(_strings(json.loads(line)))
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            for rec in data if isinstance(data, list) else [data]:
                yield list(_strings(rec))
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            yield from rows[1:]  # skip the header row


def _pretrain_docs(samples_dir: Path) -> list[str]:
    """Plain-text documents for pretraining: one per sample record, its fields joined by newlines.

    Deliberately format-free: no template markers (``###``), no role markers, no ``</s>``. The
    base model learns the vocabulary and the finance phrasing, but neither a prompt format nor
    where an answer ends, so a LoRA trained on a template has a visible effect.
    """
    docs = []
    for fields in _records(samples_dir):
        parts = [f.strip() for f in fields if f.strip() and f.strip() not in ROLE_VALUES]
        if parts:
            docs.append("\n".join(parts))
    return docs


# ---------------------------------------------------------------- tokenizer

def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # min_frequency=1: the sample corpus is small, and with 2 it runs out of merges before 2048.
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # Full byte alphabet: every byte is encodable even if absent from the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        # trim_offsets=False keeps offsets exact, which offset-based label masking relies on.
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])
    return tok


def _wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------- model

def _make_model(tokenizer, seed: int):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sliding_window=None,
        **MODEL_DIMS,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _pretrain(model, tokenizer, docs: list[str], seed: int) -> dict:
    """Short causal-LM pretraining on ``docs``; returns {"loss_first", "loss_last", "tokens"}.

    Each pass shuffles the documents (seeded), joins them into one token stream with ``<s>`` before
    every document (never ``</s>``: the base must not learn to stop) and cuts it into
    ``seq_len`` windows. AdamW, linear warmup then cosine decay, gradient clipping, float32.
    Same seed, corpus, library versions, thread count and CPU instruction set => the same weights;
    CPU float kernels may round differently on another instruction set (AVX2 vs AVX-512), so builds
    on different machines can differ in the last bits, never in behaviour.
    """
    import math
    import random

    import torch

    cfg = PRETRAIN
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    bos = tokenizer.bos_token_id
    rng = random.Random(seed)
    seq, bs, steps = cfg["seq_len"], cfg["batch_size"], cfg["steps"]

    def windows():
        while True:
            order = list(range(len(ids)))
            rng.shuffle(order)
            stream = [t for i in order for t in [bos, *ids[i]]]
            chunks = [stream[k:k + seq] for k in range(0, len(stream) - seq + 1, seq)]
            rng.shuffle(chunks)
            for k in range(0, len(chunks) - bs + 1, bs):
                yield torch.tensor(chunks[k:k + bs], dtype=torch.long)

    def lr_at(step: int) -> float:
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        frac = (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"])
        return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(seed + 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.95), foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    try:
        batches = windows()
        for _ in range(steps):
            x = next(batches)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"], foreach=False)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    return {"loss_first": round(losses[0], 4), "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4),
            "tokens": steps * bs * seq}


# ---------------------------------------------------------------- build

def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fingerprint(texts: list[str], docs: list[str]) -> str:
    """Hash of everything the checkpoint is derived from, except library versions.

    Stored in the marker so ensure_tiny_model() rebuilds by itself after samples/ is
    regenerated or the recipe is edited, instead of silently serving a stale model.
    """
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "vocab_size": VOCAB_SIZE,
        "model_max_length": MODEL_MAX_LENGTH,
        "special_tokens": SPECIAL_TOKENS,
        "template_markers": TEMPLATE_MARKERS,
        "chat_template": CHAT_TEMPLATE,
        "model_dims": MODEL_DIMS,
        "corpus_sha256": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest(),
        "pretrain": PRETRAIN,
        "pretrain_docs_sha256": hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()


def _is_current(out_dir: Path, seed: int, fingerprint: str) -> bool:
    marker = _read_marker(out_dir)
    return bool(marker) and marker.get("seed") == seed and marker.get("fingerprint") == fingerprint


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    out_dir = Path(out_dir).resolve()
    texts = _corpus(SAMPLES_DIR)
    docs = _pretrain_docs(SAMPLES_DIR)
    fingerprint = _fingerprint(texts, docs)
    if not force and _is_current(out_dir, seed, fingerprint):
        return out_dir

    t0 = time.perf_counter()
    tokenizer = _wrap_tokenizer(_train_tokenizer(texts))
    model = _make_model(tokenizer, seed)
    t1 = time.perf_counter()
    pretrain = _pretrain(model, tokenizer, docs, seed)
    pretrain["seconds"] = round(time.perf_counter() - t1, 1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save_quietly(model, tmp)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(_readme(seed, n_params, len(tokenizer), pretrain), encoding="utf-8")
        # The marker is written last: its presence means the directory is complete.
        marker = {
            "recipe_version": RECIPE_VERSION,
            "seed": seed,
            "fingerprint": fingerprint,
            "vocab_size": len(tokenizer),
            "num_parameters": n_params,
            # Informational; "seconds" is the only value here that varies between identical builds.
            "pretrain": pretrain,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _make_readable(tmp)
        if out_dir.exists():
            if not force and _is_current(out_dir, seed, fingerprint):
                # Another process finished the same build while we were working.
                return out_dir
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Lost a race with a concurrent builder that renamed first; its result is equivalent.
            if not _is_current(out_dir, seed, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"built tiny model in {out_dir} ({time.perf_counter() - t0:.1f}s; pretraining loss "
         f"{pretrain['loss_first']:.2f} -> {pretrain['loss_last']:.2f} in {pretrain['seconds']:.1f}s)")
    return out_dir


def _save_quietly(model, path: Path) -> None:
    # A "Writing model shards" bar for one 3 MB file is just noise in test logs.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _make_readable(path: Path) -> None:
    # mkdtemp() creates 0700 and some writers use 0600; the finished checkpoint should get
    # the same permissions as any other file the user creates.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)


def ensure_tiny_model() -> Path:
    # build_tiny_model() already returns early when the marker matches the current recipe.
    return build_tiny_model(default_tiny_model_dir())


def _readme(seed: int, n_params: int, vocab: int, pretrain: dict) -> str:
    d = MODEL_DIMS
    return f"""# tiny-mistral (briefly pretrained)

Generated by `studio/tiny_model.py` (recipe {RECIPE_VERSION}, seed {seed}) for offline
tests and demos of QLoRA Studio. Random weights, then {PRETRAIN['steps']} steps
({pretrain['tokens']:,} tokens) of plain-text pretraining on the finance texts in
`samples/` (loss {pretrain['loss_first']:.2f} -> {pretrain['loss_last']:.2f}): it knows the words
and phrasing, but it has never seen a prompt template (`### Response:`) or `</s>`, so it
neither follows a format nor stops until fine-tuned. Not for any real use.

- architecture: MistralForCausalLM, {n_params:,} parameters, float32
- hidden {d['hidden_size']}, MLP {d['intermediate_size']}, {d['num_hidden_layers']} layers, \
{d['num_attention_heads']} heads, {d['num_key_value_heads']} KV heads, {d['max_position_embeddings']} positions, \
untied embeddings
- tokenizer: byte-level BPE, {vocab} tokens, trained on `samples/`
- `<s>` is prepended automatically on encode; `</s>` ends every chat message

Rebuild: `python -m studio.tiny_model [OUT_DIR] --force`
"""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studio.tiny_model", description="Build the tiny offline test model.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=None, help="default: $STUDIO_TINY_MODEL_DIR, else models/tiny-mistral "
                        "in a clone or under the studio home when installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir or default_tiny_model_dir(), seed=args.seed, force=args.force)
    print(out)


if __name__ == "__main__":
    main()
