"""The planner: the fastest way to run a config on a machine without changing what it learns.

Contract: ``plan_run(cfg, hw, arch=..., host_free=..., liger_installed=...) -> Plan`` is pure (no GPU needed), so
every rule below is tested on the CPU against ``studio.speed.profiles``.  It never changes the examples, epochs,
learning rate and schedule, optimizer, effective batch in examples (``train.batch_size x train.grad_accum``),
LoRA rank, targets or dropout: only how each step is computed.  ``speed.*`` values other than ``auto`` are
kept, unless the machine cannot run them: then the part falls back, with a note (never an error).  The rules,
in the order they are applied (docs/speed.md gives the measurements behind them):

1. Compute dtype: as configured; ``auto`` is bf16 where the GPU has it, else fp16; bf16 asked on a GPU without
   it (T4) runs fp16 with a note.  On the CPU, ``auto`` is fp32.
2. Only one CUDA GPU running supervised fine-tuning gets the speed paths.  On the CPU, on several GPUs (DDP,
   FSDP) and in a preference stage (TRL's trainer) the run takes the plain path: checkpointing on a GPU, off on
   the CPU; peft's fp32 frozen weights; nothing else.
3. On one GPU, always: Liger's kernels where liger-kernel is installed (compute capability 7.0 or newer); fused
   LoRA for 4-bit layers without LoRA bias; frozen weights in the compute dtype (as Unsloth keeps them);
   padding-free rows only with flash-attention's varlen kernel (with SDPA a packed row takes a dense mask,
   measured 0.67x at 4096 tokens); the sample answers decoded as CUDA graph replays (``graph_decode``).  With
   short rows (below), bitsandbytes' 8-bit Adam as one update for all LoRA tensors (``flat_optimizer``).
4. Short rows (``data.max_length`` <= 512): a step is too small to keep the GPU busy and the host's per-kernel
   overhead dominates.  The largest micro-batch that fits, without checkpointing if possible; the decoder layers
   replayed as one CUDA graph (not with checkpointing and LoRA dropout: a graphed recompute cannot redraw the
   forward's mask); the 16-bit weight cache where it fits beside that micro-batch.
5. Long rows: the matmuls keep the GPU busy; memory is what to save.  Checkpointing, with the checkpointed
   layer inputs in pinned CPU RAM (where half the free RAM holds them) and each layer's MLP up-projection kept
   there too (where it also fits), so the recompute skips that matmul; the micro-batch as written (smaller if
   it does not fit); no graphs, no weight cache.
6. Memory: every choice is checked with ``studio.estimate`` at 85% of the GPU; where nothing fits, the leanest
   plan is returned with a note saying what to change.
"""

from __future__ import annotations

from dataclasses import replace

from studio.config import SPEED_SWITCHES
from studio.speed.plan import Plan

SHORT_ROWS = 512  # tokens per row at or below which the host, not the GPU, bounds a step
HEADROOM = 0.85  # the share of GPU memory the estimate may fill
_UNKNOWN = object()


class _Choices:
    """Collects the parts, their reasons and the notes while the rules run."""

    def __init__(self, cfg):
        self.s = cfg.speed
        self.on: dict[str, bool] = {}
        self.why: dict[str, str] = {}
        self.notes: list[str] = []

    def set(self, key: str, want: bool, why: str, *, can: bool = True, cannot: str = "") -> bool:
        """``key`` is ``want`` for ``why``, unless pinned in ``speed.<key>``; ``can`` False turns it off (a note if
        it was pinned on)."""
        pinned = getattr(self.s, key)
        if not can:
            if pinned == "on":
                self.notes.append(f"speed.{key} is on but {cannot}: it runs without it.")
            value, why = False, cannot
        elif pinned == "auto":
            value = want
        else:
            value, why = pinned == "on", f"set to {pinned} in speed.{key}"
        self.on[key], self.why[key] = value, _sentence(why)
        return value


def _sentence(text: str) -> str:
    """A reason as a sentence: its first letter capitalized, unless it opens with a name written in lower case."""
    return text if text.startswith(("peft", "liger-kernel")) else text[:1].upper() + text[1:]


def _dtype(cfg, hw, notes: list[str]) -> tuple[str, str]:
    name = cfg.model.compute_dtype
    if hw.device != "cuda":
        return ("fp32", "the CPU trains in fp32") if name == "auto" else (name, "as configured")
    if name == "auto":
        return ("bf16", "the GPU has bf16") if hw.bf16 else ("fp16", f"{hw.name} has no bf16")
    if name == "bf16" and not hw.bf16:
        notes.append(f"{hw.name} has no bf16: the run computes in fp16 (with loss scaling) instead.")
        return "fp16", f"{hw.name} has no bf16"
    return name, "as configured"


def _micro_batches(cfg) -> list[int]:
    """Micro-batch sizes that keep the effective batch, largest first (only the pinned one where pinned)."""
    eff = cfg.train.batch_size * cfg.train.grad_accum
    if cfg.speed.micro_batch:
        return [cfg.speed.micro_batch]
    return [d for d in range(eff, 0, -1) if eff % d == 0]


def host_need(arch, tokens: int, resid_bytes: int, dtype_bytes: int) -> tuple[int, int]:
    """Pinned CPU bytes for offloaded layer inputs, and for those plus kept up-projections, at ``tokens`` per
    micro-batch (the pinned allocator rounds each block up to a power of two)."""
    def block(n: int) -> int:
        return 1 << (max(n, 1) - 1).bit_length()

    inputs = arch.layers * block(tokens * arch.hidden * resid_bytes)
    return inputs, inputs + arch.layers * block(tokens * arch.intermediate * dtype_bytes)


def _cannot(cfg, hw, gc: bool, graphs: bool, liger_installed: bool) -> dict[str, str]:
    """Why each switch cannot run here (absent: it can)."""
    t = cfg.train
    gpu = hw.device == "cuda"
    four_bit = cfg.model.quantization in ("nf4", "fp4")
    stage = "the preference stage runs TRL's trainer on the plain path"
    out = {}
    if not gpu:
        out["liger"] = out["cuda_graphs"] = out["weight_cache"] = out["graph_decode"] = "needs a CUDA GPU"
    elif not liger_installed:
        out["liger"] = "liger-kernel is not installed (pip install liger-kernel)"
    elif hw.sm < 70:
        out["liger"] = f"{hw.name} is older than Triton's kernels support"
    if gpu and (t.num_gpus > 1 or t.fsdp):
        out["cuda_graphs"] = "graphs run on one GPU"
    elif gpu and hw.sm < 70:
        out["cuda_graphs"] = f"{hw.name} is too old for the graphed layers"
    if gpu and hw.sm < 70:
        out["graph_decode"] = f"{hw.name} is too old for graphed decoding"
    elif gpu and t.fsdp:
        out["graph_decode"] = "FSDP runs write no sample answers"
    if gpu and t.fsdp:
        out["weight_cache"] = "FSDP shards the 4-bit weights"
    if not four_bit:
        out["weight_cache"] = out["offload_up_proj"] = "applies to 4-bit layers only"
        out["fused_lora"] = "fuses 4-bit layers only"
    elif cfg.lora.bias != "none":
        out["fused_lora"] = "fuses layers without LoRA bias only"
    if not ("8bit" in t.optimizer and "adam" in t.optimizer):
        out["flat_optimizer"] = "merges bitsandbytes' 8-bit Adam updates only"
    if not gc:
        out["offload_checkpoints"] = out["offload_up_proj"] = "needs gradient checkpointing"
    if graphs:
        out["offload_up_proj"] = "runs eagerly, not inside CUDA graphs"
        out["padding_free"] = "CUDA graphs run fixed [micro-batch x max_length] rows"
    if cfg.prefer.parent_run:
        for key in SPEED_SWITCHES:
            if key not in ("gradient_checkpointing", "fp32_frozen"):
                out[key] = stage
    return out


def plan_run(cfg, hw, *, arch=_UNKNOWN, host_free: int | None = None, liger_installed: bool | None = None) -> Plan:
    """The plan for ``cfg`` on ``hw`` (``studio.hardware.Hardware``).  ``arch``: the model's shape (looked up from
    the config when not given; None: unknown, no memory checks); ``host_free``: free CPU RAM in bytes (default:
    what this machine has free, 80% of the profile's RAM for another machine); ``liger_installed``: default,
    whether liger-kernel imports here (another machine is taken to have requirements-gpu.txt installed)."""
    from studio.estimate import arch_for

    if arch is _UNKNOWN:
        arch = arch_for(cfg)
    if liger_installed is None or host_free is None:
        here = _here(hw)  # once: the fit table plans for every profile on each keystroke
        if liger_installed is None:
            liger_installed = _liger_installed(here)
        if host_free is None:
            host_free = _host_free(hw, here)
    c = _Choices(cfg)
    t, lora, pins = cfg.train, cfg.lora, cfg.speed
    dtype, dtype_why = _dtype(cfg, hw, c.notes)
    gpu = hw.device == "cuda"
    planned = gpu and t.num_gpus == 1 and not t.fsdp and not cfg.prefer.parent_run
    micro0 = pins.micro_batch or t.batch_size
    eff = t.batch_size * t.grad_accum
    flash = cfg.model.attn_implementation == "flash_attention_2"
    short = cfg.data.max_length <= SHORT_ROWS

    def finish(micro: int, micro_why: str) -> Plan:
        return _finish(cfg, hw, arch, c, micro, eff, dtype, dtype_why, micro_why)

    def fits(p: Plan) -> bool:
        return p.estimate_gib is None or p.estimate_gib * 2**30 <= hw.total_bytes * HEADROOM

    if not planned:
        plain = ("the speed paths need a CUDA GPU" if not gpu else
                 "the preference stage runs TRL's trainer on the plain path" if cfg.prefer.parent_run else
                 f"planned for one GPU; {t.num_gpus} GPUs run the tested data-parallel path")
        gc = c.set("gradient_checkpointing", gpu, "saves activation memory on the GPU" if gpu else
                   "on the CPU memory is system RAM: recomputing would only cost time")
        c.set("fp32_frozen", True, "peft's k-bit preparation (the plain path)")
        cannot = _cannot(cfg, hw, gc, pins.cuda_graphs == "on", liger_installed)
        graphs = c.set("cuda_graphs", False, plain, can="cuda_graphs" not in cannot, cannot=cannot.get("cuda_graphs", ""))
        cannot = _cannot(cfg, hw, gc, graphs, liger_installed)
        for key in ("liger", "fused_lora", "weight_cache", "offload_checkpoints", "offload_up_proj", "padding_free",
                    "flat_optimizer", "graph_decode"):
            c.set(key, False, plain, can=key not in cannot, cannot=cannot.get(key, ""))
        return finish(micro0, "as written" if not pins.micro_batch else "set in speed.micro_batch")

    cannot = _cannot(cfg, hw, True, False, liger_installed)
    c.set("liger", True, "fused RMSNorm, SwiGLU, RoPE and linear cross-entropy: fewer kernels, no logits tensor",
          can="liger" not in cannot, cannot=cannot.get("liger", ""))
    c.set("fused_lora", True, "each LoRA layer is one autograd function: no separate clone, scale and add passes",
          can="fused_lora" not in cannot, cannot=cannot.get("fused_lora", ""))
    c.set("flat_optimizer", short, "one 8-bit update for all LoRA tensors (the same, bit for bit): one kernel a step "
          "instead of one per tensor, launched while the GPU waits on short rows" if short else "long rows: the "
          "per-tensor updates hide behind the step's matmuls, and no gradient-sized buffer is added",
          can="flat_optimizer" not in cannot, cannot=cannot.get("flat_optimizer", ""))
    c.set("graph_decode", True, "the sample answers at each evaluation decode one CUDA graph replay a token: eagerly "
          "a token costs ~40 ms of Python for ~7 ms of GPU work on a 7B model",
          can="graph_decode" not in cannot, cannot=cannot.get("graph_decode", ""))
    c.set("fp32_frozen", False, f"frozen embeddings, head and norms stay in {dtype}: half their memory, no casts; "
          "LoRA weights and optimizer state stay fp32")
    resid = 4 if (c.on["fp32_frozen"] or dtype == "fp32") else 2

    if short:
        graphs_can = "cuda_graphs" not in cannot
        gcs = [False, True] if pins.gradient_checkpointing == "auto" else [pins.gradient_checkpointing == "on"]
        micros = _micro_batches(cfg)
        chosen = None
        for gc in gcs:
            graphs = graphs_can and pins.cuda_graphs != "off" and (
                pins.cuda_graphs == "on" or not gc or lora.dropout == 0)
            for micro in micros:
                c.on.update(gradient_checkpointing=gc, cuda_graphs=graphs, weight_cache=False,
                            offload_checkpoints=False, offload_up_proj=False, padding_free=False)
                p = finish(micro, "")
                if fits(p):
                    chosen = p
                    break
            if chosen:
                break
        micro = chosen.micro_batch if chosen else micros[-1]
        if chosen is None:
            gc = c.set("gradient_checkpointing", True, "needed to fit even the smallest micro-batch")
        else:
            gc = c.set("gradient_checkpointing", chosen.gradient_checkpointing,
                       "needed to fit this micro-batch" if chosen.gradient_checkpointing else
                       "the micro-batch's activations fit: nothing is recomputed")
        graphs_why = ("the decoder layers' forward and backward replay as one CUDA graph: no per-kernel host "
                      "overhead, which bounds short rows")
        if gc and lora.dropout > 0:
            graphs_why = "with checkpointing and LoRA dropout a graphed recompute cannot redraw the forward's mask"
        graphs = c.set("cuda_graphs", not gc or lora.dropout == 0, graphs_why, can=graphs_can,
                       cannot=cannot.get("cuda_graphs", ""))
        if graphs and c.on.get("liger"):
            c.why["liger"] = ("fused RMSNorm, SwiGLU and RoPE; the loss stays transformers' own beside CUDA graphs: "
                              "Liger's fused loss waits for the GPU in every step, and short rows' logits are small")
        cannot = _cannot(cfg, hw, gc, graphs, liger_installed)
        c.set("padding_free", flash, "flash-attention's varlen kernel packs rows without a mask" if flash else
              "rows are padded to the longest of each micro-batch (SDPA would need a dense mask for packed rows)",
              can="padding_free" not in cannot, cannot=cannot.get("padding_free", ""))
        c.set("offload_checkpoints", False, "short rows: their activations are small",
              can="offload_checkpoints" not in cannot, cannot=cannot.get("offload_checkpoints", ""))
        c.set("offload_up_proj", False, "short rows: their activations are small",
              can="offload_up_proj" not in cannot, cannot=cannot.get("offload_up_proj", ""))
        c.on["weight_cache"] = "weight_cache" not in cannot and pins.weight_cache != "off"
        room = c.on["weight_cache"] and fits(finish(micro, ""))
        c.set("weight_cache", room, "a 16-bit copy of the weights fits beside the micro-batch: no step dequantizes "
              "them" if room else "no room for a 16-bit copy of the weights beside this micro-batch",
              can="weight_cache" not in cannot, cannot=cannot.get("weight_cache", ""))
        why = "set in speed.micro_batch" if pins.micro_batch else "the largest micro-batch that fits"
        # Evaluation keeps no activations and runs eagerly: fewer, larger forwards spend less time in the host.
        c.why["eval_batch"] = "Evaluation keeps no activations: 8 micro-batches per forward, fewer host round trips"
        return replace(finish(micro, why), eval_batch=min(64, 8 * micro))

    # Long rows: memory, not the host, bounds them.
    gc = c.set("gradient_checkpointing", True, "long rows: recomputing costs less than keeping every activation")
    graphs = c.set("cuda_graphs", False, "long rows keep the GPU busy: graphs would save little and hold static "
                   "buffers", can="cuda_graphs" not in cannot, cannot=cannot.get("cuda_graphs", ""))
    cannot = _cannot(cfg, hw, gc, graphs, liger_installed)
    c.set("padding_free", flash, "flash-attention's varlen kernel packs rows without a mask" if flash else
          "rows are padded to the longest of each micro-batch (SDPA would need a dense mask for packed rows, "
          "measured 0.67x at 4096 tokens)", can="padding_free" not in cannot, cannot=cannot.get("padding_free", ""))
    c.set("weight_cache", False, "long rows: dequantizing is small beside the matmuls; the memory stays free",
          can="weight_cache" not in cannot, cannot=cannot.get("weight_cache", ""))
    micros = [m for m in _micro_batches(cfg) if m <= micro0] or _micro_batches(cfg)[-1:]
    chosen = None
    for micro in micros:
        tokens = micro * cfg.data.max_length
        inputs, with_up = host_need(arch, tokens, resid, 4 if dtype == "fp32" else 2) if arch else (0, 0)
        room = inputs <= host_free / 2
        off = c.set("offload_checkpoints", room, "checkpointed layer inputs wait in pinned CPU RAM, fetched a layer "
                    "ahead" if room else f"their {inputs / 2**30:.1f} GiB of pinned RAM is over half the free "
                    f"{host_free / 2**30:.1f} GiB", can="offload_checkpoints" not in cannot,
                    cannot=cannot.get("offload_checkpoints", ""))
        up_cannot = _cannot(cfg, hw, gc, graphs, liger_installed).get("offload_up_proj") or (
            None if off else "needs offloaded checkpoints")
        room = with_up <= host_free / 2
        c.set("offload_up_proj", room, "each layer's MLP up-projection waits in CPU RAM: the recompute skips that "
              "matmul" if room else f"needs {with_up / 2**30:.1f} GiB of pinned RAM, over half the free "
              f"{host_free / 2**30:.1f} GiB", can=up_cannot is None, cannot=up_cannot or "")
        chosen = finish(micro, "")
        if fits(chosen):
            break
    why = ("set in speed.micro_batch" if pins.micro_batch else "as written" if chosen.micro_batch == t.batch_size
           else "the largest that fits at or below the written one")
    return finish(chosen.micro_batch, why)


def _finish(cfg, hw, arch, c: _Choices, micro: int, eff: int, dtype: str, dtype_why: str, micro_why: str) -> Plan:
    """A Plan from the choices so far, with its memory estimate; the final one (``micro_why`` given) also notes a
    plan that does not fit."""
    from studio.estimate import advice, estimate

    why = dict(c.why)
    why["micro_batch"] = micro_why
    why["compute_dtype"] = _sentence(dtype_why)
    flags = {k: c.on.get(k, False) for k in SPEED_SWITCHES}
    p = Plan(device=hw.name if hw.device == "cuda" else "CPU", micro_batch=micro, grad_accum=eff // micro,
             compute_dtype=dtype, reasons=why, notes=tuple(c.notes), **flags)
    if arch is None or hw.device != "cuda":
        return p
    est = estimate(cfg, arch, p)
    notes = list(c.notes)
    if micro_why and not est.fits(hw.total_bytes / 2**30):  # the final plan, not a candidate
        tips = advice(cfg, est, hw.total_bytes / 2**30, p)
        notes.append(f"The estimate ({est.reserved_gib():.1f} GiB) is over {hw.name}'s memory: " + "; ".join(tips) + ".")
    return replace(p, estimate_gib=round(est.reserved_gib(), 2), notes=tuple(notes))


def _here(hw) -> bool:
    """Whether ``hw`` is this machine's own device (not a profile of another)."""
    from studio.hardware import detect

    here = detect()
    return here.device == hw.device and here.name == hw.name


def _liger_installed(here: bool) -> bool:
    """Whether liger-kernel imports here; another machine is taken to have the GPU requirements installed."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None if here else True


def _host_free(hw, here: bool) -> int:
    """Free CPU RAM: measured for this machine, 80% of the profile's RAM for another."""
    import psutil

    return psutil.virtual_memory().available if here else int(hw.host_bytes * 0.8)
