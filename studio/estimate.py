"""Estimate the peak GPU memory of a training config before anything loads.

Contract: ``estimate(cfg, arch)`` returns an ``Estimate`` with a breakdown in bytes (quantized
weights, fp32-upcast embeddings/head, LoRA weights + grads + optimizer state, activations with or
without gradient checkpointing, logits) and ``fits(gpu_gib)``.  ``arch_for(cfg)`` finds the model's
shape from a local config, a built-in table of common models (works offline), or the Hub.
``GPUS`` lists common cards; ``advice`` says what to change when a config does not fit.

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

GPUS = {"T4 16 GB": 16, "L4 24 GB": 24, "A100 40 GB": 40, "A100 80 GB": 80, "H100 80 GB": 80}


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


def estimate(cfg, arch: Arch, micro_batch: int | None = None, seq_len: int | None = None) -> Estimate:
    b = micro_batch or cfg.train.batch_size
    s = seq_len or cfg.data.max_length
    h, L = arch.hidden, arch.layers
    q = cfg.model.quantization
    act_bytes = 4 if cfg.model.compute_dtype == "fp32" else 2
    if q in ("nf4", "fp4"):
        per_param = 0.5 + ((1 / 64 + 4 / (64 * 256)) if cfg.model.double_quant else 4 / 64)
        embed_bytes = 4 if cfg.model.fp32_frozen else act_bytes  # peft's k-bit preparation upcasts to fp32
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
    e.parts["LoRA + grads + optimizer"] = int(lora * (4 + 4 + opt))
    tokens = b * s
    full_layer = (58 + 2 * arch.intermediate / h) * tokens * h * act_bytes / 2
    if cfg.model.gradient_checkpointing:
        # Each layer's saved input (2 bytes/value); offloaded, only the one in use and the one prefetched.
        kept = 2 if cfg.model.offload_checkpoints else L
        e.parts["activations"] = int(kept * 2 * tokens * h + full_layer)
        if cfg.model.offload_up_proj and cfg.model.offload_checkpoints:
            e.parts["kept up_proj output"] = int(2 * tokens * arch.intermediate)  # the one fetched ahead
    else:
        e.parts["activations"] = int(L * full_layer)
    e.parts["logits (fp32) + grad"] = int(tokens * arch.vocab * (4 if cfg.train.liger else 14))
    if cfg.train.padding_free and not cfg.train.cuda_graphs and cfg.model.attn_implementation != "flash_attention_2":
        # SDPA gets the example boundaries as a dense (tokens x tokens) mask, materialised as a bias.
        e.parts["packed attention mask"] = int(tokens * tokens * 3)
    if q in ("nf4", "fp4") and cfg.model.dequantized_cache:
        e.parts["16-bit weight cache"] = int(arch.block_params * act_bytes)
    elif q != "none":
        big = max(a * c for a, c in shapes.values())
        e.parts["dequantized weight buffer"] = int(big * act_bytes * 2)
    return e


def advice(cfg, est: Estimate, gpu_gib: float) -> list[str]:
    if est.fits(gpu_gib):
        return []
    tips = []
    if not cfg.model.gradient_checkpointing:
        tips.append("turn on gradient checkpointing")
    if cfg.train.batch_size > 1:
        tips.append(f"lower batch size to {max(1, cfg.train.batch_size // 2)} and double grad accumulation")
    if cfg.data.max_length > 512:
        tips.append(f"lower max length to {cfg.data.max_length // 2}")
    if cfg.model.quantization in ("none", "int8"):
        tips.append("use nf4 4-bit quantization")
    if cfg.model.quantization in ("nf4", "fp4") and not cfg.model.double_quant:
        tips.append("turn on nested quantization")
    return tips or ["choose a larger GPU or a smaller model"]


def plan(cfg, arch: Arch | None, gpu_bytes: int):
    """What ``train.auto_batch`` runs on a GPU of ``gpu_bytes``: ``(planned config, its estimate)``.

    Micro-batch, accumulation and checkpointing from ``plan_batch``; the 16-bit weight cache is kept only
    when the same micro-batch still fits without checkpointing beside it (a smaller micro-batch costs more
    than dequantisation saves); CUDA graphs unless checkpointing is chosen with LoRA dropout.  Without auto_batch the config is returned as it is.
    """
    import dataclasses as dc

    if not cfg.train.auto_batch or arch is None:
        return cfg, (estimate(cfg, arch) if arch else None)
    no_cache = dc.replace(cfg, model=dc.replace(cfg.model, dequantized_cache=False))
    micro, accum, gc, est = plan_batch(no_cache, arch, gpu_bytes)
    cache = False
    if cfg.model.dequantized_cache and not gc:
        c_micro, c_accum, c_gc, c_est = plan_batch(cfg, arch, gpu_bytes)
        if (c_micro, c_gc) == (micro, gc):  # the cache saves dequantisation only if it costs no micro-batch
            cache, est = True, c_est
    # Checkpointed layers are graphed as one stack, which cannot replay a dropout mask in the recompute.
    graphs = cfg.train.cuda_graphs and (not gc or cfg.lora.dropout == 0)
    planned = dc.replace(
        cfg, train=dc.replace(cfg.train, batch_size=micro, grad_accum=accum, cuda_graphs=graphs),
        model=dc.replace(cfg.model, gradient_checkpointing=gc, dequantized_cache=cache))
    return planned, est


def describe_plan(cfg) -> str:
    """One line: what a planned config runs (for the fit table and the CLI)."""
    bits = [f"micro-batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}",
            "checkpointing" if cfg.model.gradient_checkpointing else "no checkpointing"]
    if cfg.train.cuda_graphs:
        bits.append("CUDA graphs")
    if cfg.model.dequantized_cache:
        bits.append("16-bit weight cache")
    return ", ".join(bits)


def plan_batch(cfg, arch: Arch | None, gpu_bytes: int, headroom: float = 0.85):
    """Choose micro-batch, grad accumulation and checkpointing that fill ``gpu_bytes``.

    Keeps ``batch_size * grad_accum`` (the effective batch in examples) unchanged.  Prefers no
    checkpointing (less recompute) at the largest micro-batch that fits, then checkpointing.
    Returns ``(micro_batch, grad_accum, gradient_checkpointing, estimate)``.
    """
    import dataclasses

    eff = cfg.train.batch_size * cfg.train.grad_accum
    current = (cfg.train.batch_size, cfg.train.grad_accum, cfg.model.gradient_checkpointing)
    if arch is None:
        return (*current, None)
    divisors = [d for d in range(eff, 0, -1) if eff % d == 0]
    for gc in (False, True):
        for micro in divisors:
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=micro),
                                    model=dataclasses.replace(cfg.model, gradient_checkpointing=gc))
            est = estimate(c, arch)
            if est.reserved_gib() * GiB <= gpu_bytes * headroom:
                return micro, eff // micro, gc, est
    return (*current, estimate(cfg, arch))
