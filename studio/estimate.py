"""Estimate the peak GPU memory of a training config before anything loads.

Contract: ``estimate(cfg, arch, plan)`` returns an ``Estimate`` for ``cfg`` run as the speed plan ``plan``
(``studio.speed.Plan``; default: the plain path) with a breakdown in bytes (quantized weights, embeddings/head,
LoRA weights + grads + optimizer state, activations with or without gradient checkpointing, logits) and
``fits(gpu_gib)``.  ``arch_for(cfg)`` finds the model's shape from a local config, a built-in table of common
models (works offline), or the Hub.  ``advice`` says what to change when a config does not fit.  The planner
(``studio.speed.planner``) chooses plans with it; common cards are in ``studio.speed.profiles``.

The model of memory (peak *allocated*, as ``torch.cuda.max_memory_allocated`` reports it):
- 4-bit weights: 0.5 byte/param + block scales (fp32 per 64 → 1/16 byte; nested: 8-bit scales +
  fp32 per 256 blocks → ~1/64 byte).  int8: 1 byte + scales.  none: the compute dtype.
- Embeddings and LM head stay unquantized and peft's k-bit preparation upcasts them to fp32.
- LoRA params in fp32, their gradients in fp32, optimizer state 2 bytes/param (8-bit Adam) or 8.
- Activations per layer: without checkpointing ~``(58 + 2*i/h) * s*b*h`` bytes at 16-bit (Korthikanti
  et al. 2022's 34 for a transformer layer with fused attention, plus the fp32 norm outputs and LoRA
  inputs that QLoRA keeps, calibrated on the H100 measurement below); with checkpointing only each
  layer's input (``2*s*b*h``) plus one layer's full set.
- Logits: 16-bit logits, their fp32 upcast, log-softmax and gradient, ~14 bytes per (token, vocab)
  element; Liger's fused linear cross-entropy never materialises them (~4 bytes, chunked).
- A transient dequantized copy of the largest linear weight.
Checked against the GPU machine (H100, random-weight Mistral-7B, peak allocated): fast preset
5.45 GiB measured; thorough preset 19.43 GiB measured; fast preset with batch 8 and no
checkpointing 13.43 GiB measured (bench/results and README give the estimate errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30

@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


KNOWN = {
    "mistralai/Mistral-7B-v0.1": Arch(4096, 14336, 32, 32, 8, 32000),
    "mistralai/Mistral-7B-Instruct-v0.1": Arch(4096, 14336, 32, 32, 8, 32000),
    "mistralai/Mistral-7B-Instruct-v0.2": Arch(4096, 14336, 32, 32, 8, 32000),
    "mistralai/Mistral-7B-v0.3": Arch(4096, 14336, 32, 32, 8, 32768),
    "mistralai/Mistral-7B-Instruct-v0.3": Arch(4096, 14336, 32, 32, 8, 32768),
    "meta-llama/Meta-Llama-3-8B": Arch(4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Meta-Llama-3-8B-Instruct": Arch(4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Llama-3.1-8B-Instruct": Arch(4096, 14336, 32, 32, 8, 128256),
    "Qwen/Qwen2.5-7B-Instruct": Arch(3584, 18944, 28, 28, 4, 152064),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": Arch(2048, 5632, 22, 32, 4, 32000),
}


def arch_from_hf(c) -> Arch:
    heads = getattr(c, "num_attention_heads")
    return Arch(c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size), c.num_hidden_layers, heads,
                getattr(c, "num_key_value_heads", None) or heads, c.vocab_size,
                bool(getattr(c, "tie_word_embeddings", False)))


def arch_for(cfg) -> Arch | None:
    name = cfg.model.base_model
    if name in KNOWN:
        return KNOWN[name]
    try:
        from studio.modeling import model_config

        return arch_from_hf(model_config(cfg))
    except Exception:  # noqa: BLE001 - offline or unknown: the UI says it cannot estimate
        return None


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def reserved_gib(self) -> float:
        # The caching allocator and CUDA context sit above the allocated peak.
        return self.total_gib * 1.08 + 0.6

    def fits(self, gpu_gib: float) -> bool:
        return self.reserved_gib() <= gpu_gib * 0.95

    def table(self) -> list[tuple[str, float]]:
        return [(k, v / GiB) for k, v in self.parts.items()]


def _targets(cfg, arch: Arch) -> list[str]:
    names = list(arch.linear_shapes())
    t = cfg.lora.target_modules
    return names if t == ["all-linear"] else [n for n in names if n in t]


def estimate(cfg, arch: Arch, plan=None, micro_batch: int | None = None, seq_len: int | None = None) -> Estimate:
    """Peak allocated memory of ``cfg`` run as ``plan`` (``studio.speed.Plan``; default: the plain path)."""
    if plan is None:
        from studio.speed.plan import reference

        plan = reference(cfg)
    b = micro_batch or plan.micro_batch
    s = seq_len or cfg.data.max_length
    h, L = arch.hidden, arch.layers
    q = cfg.model.quantization
    act_bytes = 4 if plan.compute_dtype == "fp32" else 2
    if q in ("nf4", "fp4"):
        per_param = 0.5 + ((1 / 64 + 4 / (64 * 256)) if cfg.model.double_quant else 4 / 64)
        embed_bytes = 4 if plan.fp32_frozen else act_bytes  # peft's k-bit preparation upcasts to fp32
    elif q == "int8":
        per_param, embed_bytes = 1.0 + 4 / 4096, 4
    else:
        per_param, embed_bytes = act_bytes, act_bytes
    e = Estimate()
    e.parts["base weights"] = int(arch.block_params * per_param)
    e.parts["embeddings + head"] = int(arch.embed_params * embed_bytes)
    shapes = arch.linear_shapes()
    lora = L * sum(cfg.lora.r * (shapes[n][0] + shapes[n][1]) for n in _targets(cfg, arch))
    opt = 2 if "8bit" in cfg.train.optimizer else (0 if cfg.train.optimizer == "sgd" else 8)
    flat = 0  # a merged optimizer's gradient buffer, and under fp16 its copy of parameters and state for an undo
    if plan is not None and plan.flat_optimizer:
        flat = 4 + (6 if plan.compute_dtype == "fp16" else 0)
    e.parts["LoRA + grads + optimizer"] = int(lora * (4 + 4 + opt + flat))
    tokens = b * s
    full_layer = (58 + 2 * arch.intermediate / h) * tokens * h * act_bytes / 2
    if plan.gradient_checkpointing:
        # Each layer's saved input (2 bytes/value); offloaded, only the one in use and the one prefetched.
        kept = 2 if plan.offload_checkpoints else L
        e.parts["activations"] = int(kept * 2 * tokens * h + full_layer)
        if plan.offload_up_proj and plan.offload_checkpoints:
            e.parts["kept up_proj output"] = int(2 * tokens * arch.intermediate)  # the one fetched ahead
    else:
        e.parts["activations"] = int(L * full_layer)
    e.parts["logits (fp32) + grad"] = int(tokens * arch.vocab * (4 if plan.fused_loss else 14))
    if plan.padding_free and not plan.cuda_graphs and cfg.model.attn_implementation != "flash_attention_2":
        # SDPA gets the example boundaries as a dense (tokens x tokens) mask, materialised as a bias.
        e.parts["packed attention mask"] = int(tokens * tokens * 3)
    if q in ("nf4", "fp4") and plan.weight_cache:
        e.parts["16-bit weight cache"] = int(arch.block_params * act_bytes)
    elif q != "none":
        big = max(a * c for a, c in shapes.values())
        e.parts["dequantized weight buffer"] = int(big * act_bytes * 2)
    return e


def advice(cfg, est: Estimate, gpu_gib: float, plan=None) -> list[str]:
    """What to change so ``cfg`` (run as ``plan``) fits ``gpu_gib``; empty when it fits."""
    if est.fits(gpu_gib):
        return []
    tips = []
    micro = plan.micro_batch if plan else cfg.train.batch_size
    if plan is not None and not plan.gradient_checkpointing:
        tips.append("set speed.gradient_checkpointing to on")
    if micro > 1:
        tips.append(f"set speed.micro_batch to {max(1, micro // 2)} (the effective batch stays)")
    if cfg.data.max_length > 512:
        tips.append(f"lower max length to {cfg.data.max_length // 2}")
    if cfg.model.quantization in ("none", "int8"):
        tips.append("use nf4 4-bit quantization")
    if cfg.model.quantization in ("nf4", "fp4") and not cfg.model.double_quant:
        tips.append("turn on nested quantization")
    return tips or ["choose a larger GPU or a smaller model"]
