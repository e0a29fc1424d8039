"""What the GPU tier's tests share: a bf16 training step, a finished run's events, its adapter loading with plain peft."""

import math


def assert_trained(evs: list[dict], steps: int) -> None:
    """Every step logged a finite loss, and evaluation and sample answers ran."""
    metrics = [e for e in evs if e["type"] == "metric"]
    assert len(metrics) == steps and all(math.isfinite(e["loss"]) for e in metrics)
    assert any(e["type"] == "eval" for e in evs) and any(e["type"] == "sample" for e in evs)


def assert_adapter_loads(model_dir, adapter_dir) -> None:
    """The saved adapter loads onto the 4-bit base with AutoModelForCausalLM + PeftModel and gives finite logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, device_map={"": 0})
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]]).cuda()).logits.float()).all()


def bf16_step(model, batch):
    """One forward and backward under bf16 autocast: (loss, {LoRA parameter name: fp32 gradient})."""
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}


# The plain path (peft's k-bit preparation, checkpointing, nothing else): pinned where a test compares a part
# with the reference or runs on several GPUs, where one GPU must take the same path as the others.
PLAIN = {"speed.gradient_checkpointing": "on", "speed.fp32_frozen": "on", "speed.liger": "off",
         "speed.weight_cache": "off", "speed.cuda_graphs": "off", "speed.fused_lora": "off",
         "speed.offload_checkpoints": "off", "speed.offload_up_proj": "off", "speed.padding_free": "off"}


def onoff(flag: bool) -> str:
    """A speed pin from a boolean."""
    return "on" if flag else "off"
