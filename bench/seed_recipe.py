"""The *fast* seed recipe as it was written by hand before the studio existed, for side-by-side timing.

Plain transformers + peft + bitsandbytes: NF4 with fp16 compute, ``prepare_model_for_kbit_training``
(gradient checkpointing on, its default), LoRA r8/a32/dropout 0.05 on q_proj,v_proj, every example
padded to max_length=128, batch 4 x grad-accum 2, lr 2e-4, paged_adamw_8bit, fp16.  Returns the
load time, seconds per optimizer step after warm-up, real (non-pad) tokens/s and peak memory.
"""

from __future__ import annotations

import json
import time


def run(model_dir: str, data_path: str, steps: int, warmup: int = 3) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments)

    from bench.common import StepTimer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    rows = []
    for line in open(data_path):
        ex = json.loads(line)
        inp = f"### Input:\n{ex['input']}\n\n" if ex["input"] else ""
        text = f"### Instruction:\n{ex['instruction']}\n\n{inp}### Response:\n{ex['output']}"
        rows.append(tok(text, padding="max_length", truncation=True, max_length=128))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map={"": 0},
                                                 dtype=torch.float16)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    timer = StepTimer(warmup)

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timer.tick()

    args = TrainingArguments(output_dir="/tmp/seed-out", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=2e-4, num_train_epochs=1, max_steps=steps, fp16=True,
                             optim="paged_adamw_8bit", logging_steps=10, save_strategy="no", report_to="none",
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Tick()])
    load_s = time.perf_counter() - t0
    trainer.train()
    sps = timer.seconds_per_step()
    tokens = trainer.state.num_input_tokens_seen
    return {"load_s": load_s, "s_per_step": sps, "tokens_per_step": tokens / steps,
            "tokens_per_s": tokens / steps / sps, "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
