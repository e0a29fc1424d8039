"""The one typed configuration of a QLoRA Studio run.

Contract:
- ``RunConfig`` holds every knob of a run in seven sections (model, lora, data, train, speed, output, prefer).
  ``speed`` changes how the run computes, never what it learns; ``studio.speed`` resolves its ``auto`` values.
  ``prefer`` is inert unless ``prefer.parent_run`` is set: then the run is a preference stage (DPO, ORPO or
  KTO, see ``studio.prefer``) on top of that finished run's adapter.
  Each field carries ``metadata`` with ``help`` text and, where it applies, ``min``/``max`` bounds or
  ``choices``; the UI builds its widgets from this metadata and the CLI's ``--set`` uses it too.
- ``RunConfig.from_dict`` is the only way presets, saved run configs and UI values become a config:
  unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the dotted key
  (``train.learning_rate``) and what to do.  ``validate`` also checks cross-field contradictions.
- ``to_dict`` round-trips through ``from_dict`` and YAML.  No secret is ever a field: the Hub token
  lives only in the environment or in memory (see ``studio.security``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, out of range or contradictory."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _f(default: Any, help: str, *, min: float | None = None, max: float | None = None,
       choices: tuple | None = None, factory: Any = None) -> Any:
    meta = {"help": help}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if choices is not None:
        meta["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "sgd")
TEMPLATES = ("alpaca", "qa", "chat", "custom")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class ModelSection:
    """Base model and how it is quantized and loaded."""

    base_model: str = _f("mistralai/Mistral-7B-v0.1",
                         "Hub id (owner/name) or local folder of the base model.")
    quantization: str = _f("nf4", "Weight quantization: nf4/fp4 (4-bit QLoRA), int8, or none.",
                           choices=QUANTIZATIONS)
    double_quant: bool = _f(False, "Nested (double) quantization of the 4-bit scales; saves ~0.4 bits/param.")
    compute_dtype: str = _f("auto", "Compute dtype; auto picks bf16 where the GPU supports it, else fp16.",
                            choices=DTYPES)
    attn_implementation: str = _f("auto", "Attention kernel; auto lets transformers choose (SDPA).",
                                  choices=ATTENTION)
    trust_remote_code: bool = _f(False, "Run custom model code shipped with the model. Off unless you trust it.")
    revision: str = _f("main", "Hub branch, tag or commit of the base model.")


@dataclass
class LoraSection:
    """The LoRA adapter."""

    r: int = _f(8, "LoRA rank: size of the low-rank update.", min=1, max=1024)
    alpha: int = _f(32, "LoRA alpha: the update is scaled by alpha / r.", min=1, max=4096)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", min=0.0, max=0.9)
    target_modules: list[str] = _f(None, "Layers to adapt: names like q_proj, v_proj, or ['all-linear'].",
                                   factory=lambda: ["q_proj", "v_proj"])
    bias: str = _f("none", "Which biases to train.", choices=("none", "lora_only", "all"))


@dataclass
class DataSection:
    """Where the examples come from and how they become tokens."""

    path: str = _f("", "Local data file (JSONL, JSON array, CSV or Parquet). Empty when a hub dataset is used.")
    hub_dataset: str = _f("", "Hugging Face dataset id, used when no local path is given.")
    hub_config: str = _f("", "Dataset configuration (subset) name on the Hub, if any.")
    split: str = _f("train", "Split of the hub dataset to read.")
    train_samples: int = _f(0, "Sample this many training examples (seeded); 0 keeps all.", min=0, max=10_000_000)
    val_samples: int = _f(0, "Validation examples to hold out as a count; 0 uses val_fraction.",
                          min=0, max=1_000_000)
    val_fraction: float = _f(0.0, "Fraction of examples held out for validation when val_samples is 0.",
                             min=0.0, max=0.5)
    val_path: str = _f("", "Separate validation file; overrides val_samples and val_fraction.")
    template: str = _f("alpaca", "Prompt template: alpaca, qa (### Question/Answer/End), chat (the model's own) "
                       "or custom.", choices=TEMPLATES)
    custom_prompt: str = _f("", "Custom template's prompt, with {placeholders} named after mapped fields.")
    custom_response: str = _f("{response}", "Custom template's response part.")
    mapping: dict[str, str] = _f(None, "Column mapping: role (instruction, input, response, system, prompt, "
                                 "messages) to column name. Empty: detected.", factory=dict)
    max_length: int = _f(512, "Maximum tokens per example; longer ones are truncated.", min=8, max=131_072)
    train_on_inputs: bool = _f(False, "Compute loss on prompt tokens too (default: response only).")
    seed: int = _f(42, "Seed for sampling and splitting.", min=0, max=2**31 - 1)


@dataclass
class TrainSection:
    """The optimisation loop."""

    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).", min=0.01, max=1000)
    max_steps: int = _f(0, "Stop after this many optimizer steps; 0 runs the full epochs.", min=0, max=10_000_000)
    batch_size: int = _f(4, "Examples per device per micro-batch.", min=1, max=4096)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1, max=4096)
    learning_rate: float = _f(2e-4, "Peak learning rate.", min=1e-8, max=1.0)
    scheduler: str = _f("linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming the learning rate up.", min=0.0, max=0.5)
    optimizer: str = _f("paged_adamw_8bit", "Optimizer; paged/8-bit ones come from bitsandbytes.",
                        choices=OPTIMIZERS)
    weight_decay: float = _f(0.0, "Decoupled weight decay.", min=0.0, max=1.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", min=0.0, max=1000.0)
    seed: int = _f(42, "Seed for weights init, dropout and data order.", min=0, max=2**31 - 1)
    logging_steps: int = _f(1, "Write a metrics event every N optimizer steps.", min=1, max=100_000)
    eval_steps: int = _f(0, "Evaluate on the validation set every N steps; 0 only at the end.",
                         min=0, max=1_000_000)
    save_steps: int = _f(0, "Save a checkpoint every N steps; 0 only at the end.", min=0, max=1_000_000)
    save_total_limit: int = _f(3, "Checkpoints kept (oldest removed); the last complete one is always kept.",
                               min=1, max=1000)
    sample_prompts: int = _f(3, "Validation prompts answered at each evaluation so quality can be watched.",
                             min=0, max=20)
    sample_max_new_tokens: int = _f(64, "Max new tokens for those sample answers.", min=1, max=2048)
    tensorboard: bool = _f(False, "Also log to TensorBoard in the run folder.")
    num_gpus: int = _f(1, "GPUs to train on: data parallel with one 4-bit copy per GPU (accelerate launch); "
                       "batch_size is per GPU.", min=1, max=64)
    fsdp: bool = _f(False, "Shard the 4-bit model across the GPUs with FSDP (QLoRA + FSDP) for models that do not "
                    "fit one GPU; needs num_gpus > 1 and bf16.")


SWITCH = ("auto", "on", "off")


@dataclass
class SpeedSection:
    """How the run computes, never what it learns.  ``auto`` lets the planner (``studio.speed``) choose for the GPU
    the run starts on; ``on``/``off`` override it (a switch the machine cannot run falls back, with a note).
    Longer explanations: docs/speed.md."""

    micro_batch: int = _f(0, "Examples per micro-batch; 0: the planner splits the effective batch "
                          "(train.batch_size x train.grad_accum), which never changes.", min=0, max=4096)
    gradient_checkpointing: str = _f("auto", "Recompute activations in the backward instead of keeping them.",
                                     choices=SWITCH)
    offload_checkpoints: str = _f("auto", "Keep checkpointed layer inputs in CPU RAM instead of GPU memory.",
                                  choices=SWITCH)
    offload_up_proj: str = _f("auto", "Keep each layer's MLP up-projection in CPU RAM so the recompute skips it.",
                              choices=SWITCH)
    fp32_frozen: str = _f("auto", "Frozen embeddings, head and norms in fp32 (peft's k-bit preparation).",
                          choices=SWITCH)
    weight_cache: str = _f("auto", "A 16-bit copy of the 4-bit weights on the GPU, so no step dequantizes them.",
                           choices=SWITCH)
    liger: str = _f("auto", "Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, linear cross-entropy).",
                    choices=SWITCH)
    padding_free: str = _f("auto", "One flattened row per micro-batch instead of padded rows.", choices=SWITCH)
    cuda_graphs: str = _f("auto", "Replay the decoder layers as one CUDA graph (fixed batch x max_length rows).",
                          choices=SWITCH)
    fused_lora: str = _f("auto", "Each 4-bit LoRA layer as one fused autograd function.", choices=SWITCH)
    flat_optimizer: str = _f("auto", "One 8-bit optimizer update for all LoRA tensors instead of one per tensor "
                             "(the same update, bit for bit).", choices=SWITCH)
    graph_decode: str = _f("auto", "Decode the sample answers of each evaluation one CUDA graph replay a token.",
                           choices=SWITCH)


SPEED_SWITCHES = tuple(n for n in SpeedSection.__dataclass_fields__ if n != "micro_batch")
# Keys of earlier versions (presets, run folders): where each went.  A boolean becomes on/off (so an old run
# resumes on the path it started on); train.auto_batch false pins the micro-batch as written.
RENAMED = {"model.gradient_checkpointing": "speed.gradient_checkpointing",
           "model.offload_checkpoints": "speed.offload_checkpoints", "model.offload_up_proj": "speed.offload_up_proj",
           "model.fp32_frozen": "speed.fp32_frozen", "model.dequantized_cache": "speed.weight_cache",
           "train.liger": "speed.liger", "train.padding_free": "speed.padding_free",
           "train.cuda_graphs": "speed.cuda_graphs", "train.fused_lora": "speed.fused_lora",
           "train.auto_batch": "speed.micro_batch"}


class RenamedKey(UserWarning):
    """A config used a key of an earlier version; it was mapped to its new place."""


@dataclass
class OutputSection:
    """What is kept after training."""

    run_name: str = _f("", "Name of the run folder; empty picks one from the preset and time.")
    adapter_dir: str = _f("", "Also copy the final adapter here: a relative name goes under studio_home/outputs/, an "
                          "absolute one must be in a folder the operator allowed (STUDIO_ALLOWED_PATHS).")
    merge: bool = _f(False, "Merge the adapter into a 16-bit copy of the base after training.")
    push_to_hub: bool = _f(False, "Push the adapter (and merged model if made) to the Hub after training.")
    hub_repo: str = _f("", "Hub repository (owner/name) to push to.")
    hub_private: bool = _f(True, "Create the Hub repository as private.")


PREFER_METHODS = ("dpo", "orpo", "kto")


@dataclass
class PreferSection:
    """The preference stage: DPO, ORPO or KTO on votes, trained on top of a finished run's adapter.

    Where from: ``parent_run`` (and ``parent_checkpoint``). What on: ``votes``, or ``hub_dataset``, or (both
    empty) the studio's own Playground votes for the parent run. How: ``method``, ``beta`` and the loop fields
    below, which replace ``train``'s for this stage (the rest of ``train``: optimizer, scheduler, seed, logging,
    samples, comes from the parent run).
    """

    parent_run: str = _f("", "The finished run this stage starts from; empty: this run is not a preference stage.")
    parent_checkpoint: int = _f(0, "Start from this checkpoint step of the parent run; 0 takes its final adapter.",
                                min=0, max=10_000_000)
    method: str = _f("dpo", "dpo (pairs, the start adapter as reference), orpo (pairs, no reference) or kto "
                     "(single answers labelled good or bad, the start adapter as reference).",
                     choices=PREFER_METHODS)
    votes: str = _f("", "Pairs file (prompt/chosen/rejected, or prompt/completion/label for kto); empty uses the "
                    "studio's votes for the parent run.")
    hub_dataset: str = _f("", "Hugging Face preference dataset id, used instead of a votes file.")
    hub_config: str = _f("", "Configuration (subset) of the hub dataset, if any.")
    hub_split: str = _f("train", "Split of the hub dataset to read.")
    beta: float = _f(0.1, "Strength of the preference: DPO/KTO's KL weight against the reference, ORPO's lambda.",
                     min=1e-4, max=10.0)
    learning_rate: float = _f(5e-5, "Peak learning rate of this stage (train.learning_rate was the SFT stage's).",
                              min=1e-8, max=1.0)
    epochs: float = _f(1.0, "Passes over the pairs (ignored when max_steps > 0).", min=0.01, max=1000)
    max_steps: int = _f(0, "Stop after this many optimizer steps; 0 runs the full epochs.", min=0, max=10_000_000)
    batch_size: int = _f(4, "Pairs (kto: answers) per micro-batch; kto needs 2 or more.", min=1, max=4096)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1, max=4096)
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming the learning rate up.", min=0.0, max=0.5)
    max_length: int = _f(512, "Maximum tokens of prompt plus answer; longer answers are truncated.",
                         min=8, max=131_072)
    min_pairs: int = _f(8, "Refuse to start with fewer usable pairs than this.", min=1, max=10_000_000)
    val_pairs: int = _f(0, "Pairs held out to measure reward accuracy on unseen votes; 0 holds none out.",
                        min=0, max=1_000_000)
    eval_steps: int = _f(0, "Evaluate on the held-out pairs every N steps; 0 only at the end.", min=0, max=1_000_000)
    save_steps: int = _f(0, "Save a checkpoint every N steps; 0 only at the end.", min=0, max=1_000_000)
    sft_weight: float = _f(0.0, "dpo: weight of a likelihood loss on the chosen answers added to DPO's (RPO), keeping "
                           "them likely while the margin grows; 0 adds none.", min=0.0, max=10.0)
    desirable_weight: float = _f(1.0, "kto: weight of the good answers' loss (raise it when good ones are fewer).",
                                 min=0.01, max=100.0)
    undesirable_weight: float = _f(1.0, "kto: weight of the bad answers' loss.", min=0.01, max=100.0)


@dataclass
class RunConfig:
    """Everything a run needs.  Sections: model, lora, data, train, speed, output, prefer.

    ``name`` and ``description`` describe the preset the config came from.
    """

    name: str = _f("custom", "Preset name.")
    description: str = _f("", "What this preset is for.")
    model: ModelSection = _f(None, "Base model and quantization.", factory=ModelSection)
    lora: LoraSection = _f(None, "LoRA adapter.", factory=LoraSection)
    data: DataSection = _f(None, "Data and template.", factory=DataSection)
    train: TrainSection = _f(None, "Training loop.", factory=TrainSection)
    speed: SpeedSection = _f(None, "How it computes (never what it learns).", factory=SpeedSection)
    output: OutputSection = _f(None, "Outputs.", factory=OutputSection)
    prefer: PreferSection = _f(None, "Preference stage (DPO, ORPO, KTO) on a finished run.", factory=PreferSection)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, *, validate: bool = True) -> "RunConfig":
        cfg = _build(cls, migrate(data or {}), "")
        if validate:
            cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied (``{"train.learning_rate": 1e-4}``), validated."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return RunConfig.from_dict(d)

    # ---- checks across fields -----------------------------------------------------------------
    def validate(self) -> None:
        m, t, d, o = self.model, self.train, self.data, self.output
        if m.base_model.strip() == "":
            raise ConfigError("model.base_model", "is empty; give a hub id like mistralai/Mistral-7B-v0.1 "
                              "or a local folder.")
        if not self.lora.target_modules:
            raise ConfigError("lora.target_modules", "is empty; name at least one layer (e.g. q_proj) "
                              "or use all-linear.")
        if m.double_quant and m.quantization not in ("nf4", "fp4"):
            raise ConfigError("model.double_quant", "applies only to 4-bit quantization (nf4 or fp4); "
                              "turn it off or choose nf4.")
        if o.push_to_hub and "/" not in o.hub_repo:
            raise ConfigError("output.hub_repo", "must be owner/name when push_to_hub is on.")
        if d.template == "custom":
            # The same check as the Data tab's preview (a bad placeholder refused here, not at step 0).
            from studio.data.templates import custom_problem  # local: config imports nothing of ours at load

            problem = custom_problem(d.custom_prompt, d.custom_response)
            if problem:
                raise ConfigError(*problem)
        if d.val_samples and d.val_fraction:
            raise ConfigError("data.val_samples", "and data.val_fraction are both set; choose one.")
        if t.max_steps == 0 and t.epochs <= 0:
            raise ConfigError("train.epochs", "must be positive when max_steps is 0.")
        sp = self.speed
        if sp.micro_batch and self.effective_batch % sp.micro_batch:
            raise ConfigError("speed.micro_batch", f"{sp.micro_batch} does not divide the effective batch of "
                              f"{self.effective_batch} examples (train.batch_size x train.grad_accum); choose a divisor "
                              "or 0 (auto).")
        pinned = [("offload_checkpoints", "gradient_checkpointing", "offloads what gradient checkpointing saves"),
                  ("offload_up_proj", "offload_checkpoints", "keeps outputs beside the offloaded checkpoints")]
        for key, needs, what in pinned:
            if getattr(sp, key) == "on" and getattr(sp, needs) == "off":
                raise ConfigError(f"speed.{key}", f"{what}; set speed.{needs} to auto or on, or this to auto.")
        if sp.offload_up_proj == "on" and sp.cuda_graphs == "on":
            raise ConfigError("speed.offload_up_proj", "runs eagerly, not inside CUDA graphs; set one of them to auto.")
        if t.fsdp and t.num_gpus < 2:
            raise ConfigError("train.fsdp", "shards across GPUs: set train.num_gpus to 2 or more, or turn it off.")
        if t.fsdp and m.compute_dtype not in ("bf16", "auto"):
            raise ConfigError("train.fsdp", "FSDP with 4-bit weights needs bf16 compute; set model.compute_dtype "
                              "to bf16.")
        p = self.prefer
        if p.votes.strip() and p.hub_dataset.strip():
            raise ConfigError("prefer.votes", "and prefer.hub_dataset are both set; choose one source of pairs.")
        if p.parent_run:
            from studio.security import SecurityError, check_name  # local: imports nothing of ours at load

            try:
                check_name(p.parent_run, "prefer.parent_run")
            except SecurityError as e:
                raise ConfigError("prefer.parent_run", str(e).split(": ", 1)[1]) from None
            if p.method == "kto" and p.batch_size < 2:
                raise ConfigError("prefer.batch_size", "kto estimates its KL term from the other answers of a "
                                  "micro-batch: set 2 or more.")
        if o.run_name:
            from studio.security import check_name  # local: security imports nothing of ours at module level

            check_name(o.run_name, "output.run_name")
        if o.adapter_dir.strip():
            from studio.security import PathRefused, output_dir

            try:
                output_dir(o.adapter_dir, "output.adapter_dir")
            except PathRefused as e:
                raise ConfigError(e.key, str(e).split(": ", 1)[1]) from None

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.grad_accum


# ---- helpers ------------------------------------------------------------------------------------

def migrate(data: dict) -> dict:
    """``data`` with keys of earlier versions moved to their sections (see ``RENAMED``), one ``RenamedKey`` warning
    each; where both are given the new key wins unless it holds its default (``replace`` writes every key)."""
    import copy
    import warnings

    if not isinstance(data, dict) or not any(isinstance(data.get(s), dict) for s in ("model", "train")):
        return data
    data = copy.deepcopy(data)
    speed = data.get("speed") if isinstance(data.get("speed"), dict) else {}
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if not isinstance(data.get(section), dict) or key not in data[section]:
            continue
        value = data[section].pop(key)
        name = new.split(".")[1]
        if key == "auto_batch":
            on = coerce(old, bool, value)
            value = 0 if on else coerce("train.batch_size", int, (data.get("train") or {}).get("batch_size", 4))
        elif isinstance(value, (bool, str, int)) and str(value).lower() not in SWITCH:
            value = "on" if coerce(old, bool, value) else "off"
        if speed.get(name) in (None, "auto", 0):  # a default from to_dict() gives way to the old key's value
            speed[name] = value
        warnings.warn(f"{old} is now {new} (= {speed[name]!r}); edit the file to silence this.", RenamedKey,
                      stacklevel=3)
    if speed:
        data["speed"] = speed
    return data


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            raise ConfigError(key, f"unknown section '{p}'.")
        cur = cur[p]
    cur[parts[-1]] = value


def field_specs(section_cls: type | None = None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Dotted key -> dataclass Field for every leaf field (the UI builds widgets from these)."""
    section_cls = section_cls or RunConfig
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(section_cls)
    for f in dataclasses.fields(section_cls):
        key = f"{prefix}{f.name}"
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(field_specs(typ, key + "."))
        else:
            out[key] = f
    return out


def field_type(key: str) -> Any:
    parts = key.split(".")
    cls: Any = RunConfig
    for p in parts:
        cls = typing.get_type_hints(cls)[p]
    return cls


def coerce(key: str, typ: Any, value: Any) -> Any:
    """Convert a YAML/CLI/UI value to the field's type or raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise TypeError
        if typ is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [str(v) for v in value]
        if origin is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items() if v not in (None, "")}
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(key, f"expected {name}, got {value!r}.")


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in known:
            close = [n for n in known if n.startswith(str(k)[:3])]
            hint = f" Did you mean {close[0]}?" if close else f" Known keys: {', '.join(known)}."
            raise ConfigError(f"{prefix}{k}", f"unknown key.{hint}")
    kwargs = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            sub = data.get(name)
            kwargs[name] = _build(typ, {} if sub is None else sub, key + ".")
            continue
        if name not in data:
            continue
        value = coerce(key, typ, data[name])
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                raise ConfigError(key, "is not a number.")
            if "min" in meta and value < meta["min"]:
                raise ConfigError(key, f"{value} is below the minimum {meta['min']}.")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(key, f"{value} is above the maximum {meta['max']}.")
        kwargs[name] = value
    return cls(**kwargs)


__all__ = ["RunConfig", "ConfigError", "ModelSection", "LoraSection", "DataSection", "TrainSection",
           "OutputSection", "PreferSection", "SpeedSection", "SPEED_SWITCHES", "RenamedKey", "migrate", "field_specs", "field_type", "coerce", "set_dotted"]
