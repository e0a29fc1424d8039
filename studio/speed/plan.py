"""A speed plan: how one run computes on one machine, each part with the reason it was chosen.

Contract: ``Plan`` is what the planner (``studio.speed.planner``) returns and everything downstream reads:
the micro-batch and accumulation (their product is the config's effective batch), the compute dtype, and one
boolean per switch of ``config.SpeedSection``.  ``reasons`` holds one sentence per part; ``notes`` says what fell
back because the machine lacks something.  ``rows()`` is the table the Presets tab and the CLI show, and
``to_event()`` the run's ``plan`` event.  ``reference(cfg, device)`` is the plain path (peft's k-bit preparation,
checkpointing on a GPU, nothing else): the estimate's default and the GPU tests' yardstick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from studio.config import SPEED_SWITCHES

LABELS = {
    "micro_batch": "micro-batch", "compute_dtype": "compute dtype", "gradient_checkpointing": "checkpointing",
    "offload_checkpoints": "checkpoints in CPU RAM", "offload_up_proj": "up-projections in CPU RAM",
    "fp32_frozen": "fp32 frozen weights", "weight_cache": "16-bit weight cache", "liger": "Liger kernels",
    "padding_free": "padding-free rows", "cuda_graphs": "CUDA graphs", "fused_lora": "fused LoRA",
    "flat_optimizer": "one optimizer update", "graph_decode": "graphed sample answers",
}


@dataclass(frozen=True)
class Plan:
    device: str  # the GPU's name, or "CPU"
    micro_batch: int
    grad_accum: int
    compute_dtype: str  # bf16, fp16 or fp32: what runs, after any fallback
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False
    offload_up_proj: bool = False
    fp32_frozen: bool = True
    weight_cache: bool = False
    liger: bool = False
    padding_free: bool = False
    cuda_graphs: bool = False
    fused_lora: bool = False
    flat_optimizer: bool = False
    graph_decode: bool = False
    reasons: dict = field(default_factory=dict)
    notes: tuple = ()
    estimate_gib: float | None = None  # reserved GiB the estimate expects; None without a known shape or GPU
    eval_batch: int = 0  # examples per evaluation forward; 0: the micro-batch

    @property
    def dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.compute_dtype]

    @property
    def fused_loss(self) -> bool:
        """Liger's fused linear cross-entropy: with Liger, unless CUDA graphs run (it waits for the GPU each step
        to count the labels, and short rows' logits are small)."""
        return self.liger and not self.cuda_graphs

    def switches(self) -> dict[str, bool]:
        return {k: getattr(self, k) for k in SPEED_SWITCHES}

    def with_(self, **kw) -> "Plan":
        return replace(self, **kw)

    def rows(self) -> list[tuple[str, str, str]]:
        """(part, what runs, why) for every part, in a fixed order."""
        out = [("micro-batch", f"{self.micro_batch} x {self.grad_accum} accumulated", self.reasons.get("micro_batch", "")),
               ("compute dtype", self.compute_dtype, self.reasons.get("compute_dtype", ""))]
        for k in SPEED_SWITCHES:
            out.append((LABELS[k], "on" if getattr(self, k) else "off", self.reasons.get(k, "")))
        out.append(("evaluation batch", str(self.eval_batch or self.micro_batch),
                    self.reasons.get("eval_batch", "As the micro-batch")))
        return out

    def summary(self) -> str:
        """One line: micro-batch and the switches that are on."""
        on = [LABELS[k] for k in SPEED_SWITCHES if getattr(self, k)]
        return f"micro-batch {self.micro_batch} x {self.grad_accum}, {self.compute_dtype}" + (
            ", " + ", ".join(on) if on else "")

    def to_event(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def reference(cfg, device: str = "cuda", dtype: str | None = None) -> Plan:
    """The plain path for ``cfg``: the micro-batch as written, checkpointing on a GPU, peft's fp32 frozen weights,
    nothing else; switches pinned on or off in ``cfg.speed`` are taken as pinned."""
    t, s = cfg.train, cfg.speed
    micro = s.micro_batch or t.batch_size
    base = {"gradient_checkpointing": device == "cuda", "fp32_frozen": True}
    flags = {k: (getattr(s, k) == "on") if getattr(s, k) != "auto" else base.get(k, False) for k in SPEED_SWITCHES}
    if dtype is None:
        dtype = {"auto": "bf16" if device == "cuda" else "fp32"}.get(cfg.model.compute_dtype, cfg.model.compute_dtype)
    return Plan(device="GPU" if device == "cuda" else "CPU", micro_batch=micro,
                grad_accum=t.batch_size * t.grad_accum // micro, compute_dtype=dtype, **flags,
                reasons={"micro_batch": "as written"})


def event_text(ev: dict) -> str:
    """One paragraph from a run's ``plan`` event (the Train tab's status and the CLI print it); events of earlier
    versions (``batch_size``, ``dequantized_cache``) read too."""
    micro = ev.get("micro_batch", ev.get("batch_size"))
    bits = [f"micro-batch {micro} × accumulation {ev.get('grad_accum')}"]
    if ev.get("compute_dtype"):
        bits.append(str(ev["compute_dtype"]))
    bits += [label for key, label in LABELS.items() if ev.get(key) is True and key in SPEED_SWITCHES]
    if ev.get("dequantized_cache") is True:
        bits.append(LABELS["weight_cache"])
    est = ev.get("estimate_gib")
    text = f"Plan on {ev.get('device') or 'this GPU'}: {', '.join(bits)}" + (f"; estimated peak {est} GiB." if est
                                                                             else ".")
    return text + "".join(f" ⚠️ {n}" for n in ev.get("notes") or [] if isinstance(n, str))
