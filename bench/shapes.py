"""The three training shapes of the speed issue, run by plain HF and by Unsloth on identical full-length rows.

    fast       r8  a32 q,v          batch 4 x 128,  accum 2, grad ckpt, dropout 0.05
    thorough   r32 a64 q,k,v,o      batch 4 x 4096, accum 4, grad ckpt, dropout 0.05, nested 4-bit
    alllinear  r16 a32 all linear   batch 8 x 2048, accum 1, grad ckpt, dropout 0

Rows are exactly ``seq`` random token ids (loss on all of them), or the studio's own token rows of a preset's
data (``rows_file``, from ``bench.train_speed``); bf16 compute, NF4, SDPA.
``hf`` is the hand-written transformers + peft + bitsandbytes path (``prepare_model_for_kbit_training``,
Trainer); ``unsloth`` is ``FastLanguageModel`` with its own gradient checkpointing ("unsloth") and the
same Trainer.  The studio's path for a shape is run by ``bench.train_speed`` through the engine.
"""

from __future__ import annotations

import time

SHAPES = {  # dropout: the preset's (0.05) where a preset has this shape
    "fast": dict(r=8, alpha=32, targets=["q_proj", "v_proj"], batch=4, seq=128, accum=2, nested=False, steps=30,
                 dropout=0.05),
    "thorough": dict(r=32, alpha=64, targets=["q_proj", "k_proj", "v_proj", "o_proj"], batch=4, seq=4096, accum=4,
                     nested=True, steps=4, dropout=0.05),
    "alllinear": dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], batch=8, seq=2048, accum=1, nested=False, steps=8,
                      dropout=0.0),
}
WARMUP = {"fast": 3, "thorough": 2, "alllinear": 2}


def rows(shape: str, n: int, vocab: int = 32000, seed: int = 0) -> list[dict]:
    import torch

    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, s["seq"]), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def pad(features: list[dict]) -> dict:
    """Right-pad a micro-batch of token rows (labels -100 and attention mask 0 on the padding)."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (n - len(f["labels"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run(backend: str, shape: str, model_dir: str, steps: int | None = None, rows_file: str = "") -> dict:
    """``rows_file``: a JSON list of {input_ids, labels} (the studio's own tokenization of the preset's data) to
    train instead of random rows."""
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must patch transformers before it is imported)
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from bench.common import StepTimer

    s = SHAPES[shape]
    steps = steps or s["steps"]
    warm = WARMUP[shape]
    t0 = time.perf_counter()
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=s["seq"],
                                                     dtype=torch.bfloat16, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                                 target_modules=s["targets"], bias="none",
                                                 use_gradient_checkpointing="unsloth", random_state=0)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=s["nested"])
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map={"": 0},
                                                     dtype=torch.bfloat16, attn_implementation="sdpa")
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                                 target_modules=s["targets"], task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - t0
    timer = StepTimer(warm)

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timer.tick()

    need = steps * s["batch"] * s["accum"]
    if rows_file:
        import json

        given = json.loads(open(rows_file).read())
        data = [given[i % len(given)] for i in range(need)]
    else:
        data = rows(shape, need)
    args = TrainingArguments(output_dir=f"/tmp/shape-{backend}-{shape}", per_device_train_batch_size=s["batch"],
                             gradient_accumulation_steps=s["accum"], learning_rate=1e-4, max_steps=steps, bf16=True,
                             optim="paged_adamw_8bit", logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=pad if rows_file else
                      default_data_collator, callbacks=[Tick()])
    trainer.train()
    sps = timer.seconds_per_step()
    tokens = sum(len(r["input_ids"]) for r in data) / steps  # every row's real tokens, as the studio counts them
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"load_s": load_s, "s_per_step": sps, "tokens_per_step": tokens, "tokens_per_s": tokens / sps,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "final_loss": losses[-1] if losses else None}
