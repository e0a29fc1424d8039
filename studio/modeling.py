"""Load a base model (quantized or not), its tokenizer, and attach or load LoRA adapters.

Contract:
- ``resolve_base(name)`` turns the config's ``model.base_model`` into what ``from_pretrained`` takes:
  the built-in ``studio-tiny-mistral`` (built on first use), a local folder that must hold
  ``*.safetensors`` weights, or a hub id.
- ``preflight(cfg, hw)`` rejects contradictions with the hardware and the model (bf16 without GPU
  support, fp16 on a CPU, 8-bit/paged optimizers without CUDA, max length above the model's, custom
  code without opt-in) before any weight loads; errors are ``ConfigError`` naming the field.
- ``load_tokenizer`` / ``load_base`` / ``add_lora`` / ``load_for_inference`` never load pickled
  weights and never run remote code unless ``model.trust_remote_code`` is on.  Load failures raise
  ``ModelError`` with a message a user can act on (tokens redacted).
"""

from __future__ import annotations

from pathlib import Path

from studio.config import ConfigError, RunConfig
from studio.hardware import Hardware, detect, resolve_dtype
from studio.security import SecurityError, confined, local_model, redact, safe_load_kwargs

TINY = "studio-tiny-mistral"
# Reentrant checkpointing (peft's default for k-bit training): on an H100 it ran the fast preset at
# 0.70 s/step against 0.92 s/step non-reentrant in the same call (bench/results, 2026-11-23).
# It needs inputs that require grad, which prepare_model_for_kbit_training / enable_input_require_grads give.
GC_KWARGS = {"use_reentrant": True}


class ModelError(RuntimeError):
    """The base model or adapter could not be loaded; the message says why and what to do."""


def resolve_base(name: str) -> str:
    if name == TINY:
        from studio.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")):
        if confined():  # the served app: only the studio's folders or ones the operator allowed
            try:
                local_model(name)
            except SecurityError as e:
                raise ModelError(str(e)) from None
        if not p.is_dir():
            raise ModelError(f"model.base_model: {name} is not a folder; give a model folder or a hub id.")
        if not (p / "config.json").exists():
            raise ModelError(f"model.base_model: {name} has no config.json; it is not a model folder.")
        if not any(p.glob("*.safetensors")):
            raise ModelError(f"model.base_model: {name} has no .safetensors weights; pickled .bin weights are "
                             "not loaded for safety. Convert them with safetensors first.")
        return str(p)
    return name


def _hub_error(e: Exception, name: str) -> ModelError:
    text = redact(str(e))
    kind = type(e).__name__
    if "Gated" in kind or "401" in text or "403" in text or "gated" in text.lower():
        hint = "this model needs a Hugging Face token with access; set HF_TOKEN or enter it, and accept the " \
               "model's terms on its hub page."
    elif "RepositoryNotFound" in kind or "404" in text or "not a valid model identifier" in text:
        hint = "no such model on the Hub; check the id (owner/name) or give a local folder."
    elif "trust_remote_code" in text:
        hint = "the model ships custom code; turn on model.trust_remote_code only if you trust its author."
    elif "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        hint = "the Hub could not be reached; check the internet connection or use a local folder."
    else:
        hint = text[:300]
    return ModelError(f"model.base_model: {name!r} could not be loaded: {hint}")


def model_config(cfg: RunConfig, token: str | None = None):
    from transformers import AutoConfig

    path = resolve_base(cfg.model.base_model)
    try:
        return AutoConfig.from_pretrained(path, token=token, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message for the user
        raise _hub_error(e, cfg.model.base_model) from None


def preflight(cfg: RunConfig, hw: Hardware | None = None, token: str | None = None, check_model: bool = True):
    hw = hw or detect()
    m, t = cfg.model, cfg.train
    if hw.device == "cpu" and m.compute_dtype == "fp16":
        raise ConfigError("model.compute_dtype", "fp16 mixed precision needs a CUDA GPU; on the CPU choose auto.")
    if hw.device == "cpu" and m.quantization == "int8":
        raise ConfigError("model.quantization", "int8 training needs a CUDA GPU; on the CPU choose nf4 or none.")
    if hw.device == "cpu" and ("8bit" in t.optimizer or "paged" in t.optimizer):
        raise ConfigError("train.optimizer", f"{t.optimizer} needs a CUDA GPU; on the CPU choose adamw_torch.")
    if m.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # noqa: BLE001
            raise ConfigError("model.quantization", "bitsandbytes is not installed; install it or choose none.") \
                from None
    if t.num_gpus > 1 and t.num_gpus > hw.gpu_count:
        raise ConfigError("train.num_gpus", f"{t.num_gpus} GPUs asked for but {hw.gpu_count} visible; lower it.")
    if check_model:
        mc = model_config(cfg, token)
        limit = getattr(mc, "max_position_embeddings", None)
        if limit and cfg.data.max_length > limit:
            raise ConfigError("data.max_length", f"{cfg.data.max_length} is above the model's limit of {limit} "
                              "tokens; lower it.")
    return hw


def load_tokenizer(cfg: RunConfig, path: str | None = None, token: str | None = None):
    from transformers import AutoTokenizer

    from studio.data.tokenize import ensure_pad_token

    path = path or resolve_base(cfg.model.base_model)
    try:
        tok = AutoTokenizer.from_pretrained(path, token=token, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, cfg.model.base_model) from None
    ensure_pad_token(tok)
    tok.padding_side = "right"
    return tok


def quantization_config(cfg: RunConfig, dtype):
    from transformers import BitsAndBytesConfig

    q = cfg.model.quantization
    if q in ("nf4", "fp4"):
        # FSDP flattens parameters of one dtype: the packed 4-bit weights must be stored as the compute dtype.
        storage = {"bnb_4bit_quant_storage": dtype} if cfg.train.fsdp else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=cfg.model.double_quant, **storage)
    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(cfg: RunConfig, tokenizer, hw: Hardware | None = None, token: str | None = None,
              device_map=None, dtype=None):
    """The base model, quantized as configured, in ``dtype`` (default: the config's on this hardware; a run passes
    its plan's, which may have fallen back to fp16)."""
    from transformers import AutoModelForCausalLM

    hw = hw or detect()
    dtype = dtype or resolve_dtype(cfg.model.compute_dtype, hw)
    path = resolve_base(cfg.model.base_model)
    kwargs = dict(dtype=dtype, quantization_config=quantization_config(cfg, dtype), token=token,
                  revision=cfg.model.revision, device_map=device_map or ({"": local_rank()} if hw.device == "cuda" else "cpu"),
                  **safe_load_kwargs(cfg.model.trust_remote_code))
    if kwargs["quantization_config"] is None:
        kwargs.pop("quantization_config")
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, cfg.model.base_model) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    one_cpu_4bit_path(model)
    return model


def one_cpu_4bit_path(model) -> int:
    """Keep every 4-bit layer on bitsandbytes' dequantize-and-matmul path on the CPU; returns the layers pinned.

    On a CPU with AVX-512 BF16, bitsandbytes (0.50) switches a ``Linear4bit`` called in eval mode without
    gradients to an inference kernel: it repacks the weight in place, rounds its absmax to bf16 (undoing
    double quantization, and redoing it lossily when saved) and multiplies in bf16.  Evaluation during
    training, the Playground and Evaluate would then run a model numerically different from the one trained,
    and which one a comparison saw would depend on the CPU and on which call touched the layer first.  With
    the switch off, every CPU computes what training computed.  GPUs never take that path.
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - no bitsandbytes, no 4-bit layers
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def local_rank() -> int:
    """This process's GPU under ``accelerate launch`` (0 when training on one GPU)."""
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def target_modules(cfg: RunConfig):
    t = cfg.lora.target_modules
    return "all-linear" if t == ["all-linear"] else list(t)


def add_lora(cfg: RunConfig, model, plan=None):
    """A new LoRA adapter on ``model``, prepared as ``plan`` says (default: the plain path)."""
    from peft import LoraConfig, get_peft_model

    model = prepare_for_lora(cfg, model, plan)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=target_modules(cfg), bias=cfg.lora.bias, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def prepare_for_lora(cfg: RunConfig, model, plan=None):
    """The base model made ready for LoRA training (k-bit preparation, checkpointing) as ``plan`` says (default: the
    plain path on this model's device), before any adapter is added or loaded: the SFT stage adds a new adapter
    after it, the preference stage loads the SFT one."""
    from peft import prepare_model_for_kbit_training

    if plan is None:
        from studio.speed.plan import reference

        plan = reference(cfg, model.device.type)
    # With a KV cache present transformers skips packed-sequence detection, so padding-free rows
    # would attend across examples; training never needs the cache.
    model.config.use_cache = False
    gc = plan.gradient_checkpointing
    gc_kwargs = dict(GC_KWARGS)
    if cfg.model.quantization != "none" and plan.fp32_frozen and not cfg.train.fsdp:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        # Frozen weights keep their dtype: FSDP's flat parameters cannot mix in peft's fp32 upcasts, and
        # speed.fp32_frozen off keeps them in the compute dtype as Unsloth does.  Reentrant checkpointing needs an
        # input that requires grad; 4-bit and FSDP runs always get one.
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if gc or cfg.train.fsdp or cfg.model.quantization != "none":
            model.enable_input_require_grads()
    return model


def load_for_inference(cfg: RunConfig, adapters: dict[str, str | Path] | None = None, token: str | None = None,
                       hw: Hardware | None = None):
    """Base model once, with any number of named adapters loaded beside it (peft toggles between them)."""
    from peft import PeftModel

    tok = load_tokenizer(cfg, token=token)
    tok.padding_side = "left"
    model = load_base(cfg, tok, hw, token)
    model.eval()
    if adapters:
        items = list(adapters.items())
        name, path = items[0]
        try:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            for name, path in items[1:]:
                model.load_adapter(str(path), adapter_name=name)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"adapter {path}: could not be loaded ({redact(str(e))[:200]}).") from None
        model.eval()
    return model, tok
