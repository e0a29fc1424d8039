"""Saving a LoRA adapter that holds what was trained, on every launch, and proving it did.

Contract:
- ``lora_weights(trainer)`` collects the full LoRA tensors of the trained model on every launch the studio
  offers: one process, data parallel (every rank holds them whole) and QLoRA + FSDP (each rank holds a shard;
  the full tensors are gathered onto rank 0 with ``summon_full_params``).  Every rank must call it (under
  FSDP it is collective); rank 0 gets ``{peft parameter name: CPU tensor}``, the others ``None``.
- ``write_adapter(peft_model, weights, folder, tokenizer)`` writes only what loading needs, in peft's format:
  ``adapter_config.json``, ``adapter_model.safetensors`` and the tokenizer files.  No pickles.
- ``save_adapter(trainer, folder, tokenizer=None, checkpoint=False)`` is the three together, as every save
  runs them: gather (every rank), then on rank 0 write and check; it returns False on the other ranks.  A
  final adapter folder is written afresh and removed again if its check fails; a checkpoint folder (which
  also holds Trainer's resume state) is written into.
- ``restore_lora(trainer, checkpoint)`` puts a checkpoint's adapter back into an FSDP-sharded model when a run
  resumes (every rank calls it).
- ``check_adapter(folder, peft_model, trained, checkpoint=False)`` reads the saved tensors back and compares their names and
  shapes with the model's LoRA layers (and, when ``trained``, that the B matrices left their zero start);
  any difference, or a pickle in the folder, raises ``AdapterError`` naming what is wrong.  A run never
  reports ``completed`` with an adapter that does not hold what was trained.
"""

from __future__ import annotations

from pathlib import Path

# Module names FSDP and activation checkpointing insert into parameter names; peft's names have none.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(RuntimeError):
    """The saved adapter does not hold the trained LoRA weights; the message says what differs."""


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _collect(peft_model) -> dict:
    return {_clean(n): p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters() if "lora_" in n}


def lora_weights(trainer) -> dict | None:
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Inside the context rank 0 sees every original parameter whole (as nn.Parameter views), the other
        # ranks their flat shards; nothing is written back.
        with FSDP.summon_full_params(trainer.model_wrapped, writeback=False, rank0_only=True, offload_to_cpu=True):
            return _collect(peft_model) if trainer.is_world_process_zero() else None
    return _collect(peft_model) if trainer.is_world_process_zero() else None


def save_adapter(trainer, folder: Path, tokenizer=None, checkpoint: bool = False) -> bool:
    import shutil

    weights = lora_weights(trainer)  # collective under FSDP: every rank gets here
    if weights is None:
        return False
    folder = Path(folder)
    if not checkpoint:
        shutil.rmtree(folder, ignore_errors=True)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    write_adapter(peft_model, weights, folder, tokenizer)
    try:
        check_adapter(folder, peft_model, trained=trainer.state.global_step > 0, checkpoint=checkpoint)
    except AdapterError:
        if not checkpoint:
            shutil.rmtree(folder, ignore_errors=True)  # nothing half-made is left
        raise
    return True


def _disk_name(name: str, adapter: str = "default") -> str:
    import re

    return re.sub(r"(\.lora_[A-Za-z_]+)\." + re.escape(adapter) + r"(?=\.)", r"\1", _clean(name))


def restore_lora(trainer, folder: Path) -> int:
    """Put a checkpoint's saved adapter back into the FSDP-sharded model (every rank calls this); returns how
    many tensors were restored.  Trainer's resume restores the sharded optimizer and schedule, but the LoRA
    weights it loads under QLoRA + FSDP were not the trained ones (a resumed run restarted near the initial
    loss); the gathered adapter the studio wrote into the checkpoint is the truth."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    n = 0
    with FSDP.summon_full_params(trainer.model_wrapped, writeback=True, rank0_only=False):
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data.copy_(saved[_disk_name(name)].to(device=p.device, dtype=p.dtype))
                n += 1
    if n != len(saved):
        raise AdapterError(f"{Path(folder).name}: restored {n} of its {len(saved)} LoRA tensors; the checkpoint does "
                           "not match this model.")
    return n


def write_adapter(peft_model, weights: dict, folder: Path, tokenizer=None, adapter: str = "default") -> None:
    """peft's on-disk format, written from ``weights`` directly: tensor names without the adapter's name.

    peft's own ``save_pretrained(state_dict=...)`` picks an adapter's entries by matching them against the
    model's module names, which under FSDP carry wrapper names: it kept none of them and wrote an empty file.
    """
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_disk_name(k, adapter): v.contiguous() for k, v in weights.items() if f".{adapter}." in k}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True  # as peft saves it: loading gives a frozen adapter unless asked otherwise
    config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def expected_shapes(peft_model, adapter: str = "default") -> dict[str, tuple[int, ...]]:
    """``{saved tensor name: shape}`` for every LoRA layer of ``peft_model``, as peft names them on disk."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {}):
            prefix = _clean(name + ".")
            r = m.r[adapter]
            out[prefix + "lora_A.weight"] = (r, m.in_features)
            out[prefix + "lora_B.weight"] = (m.out_features, r)
    return out


def check_adapter(folder: Path, peft_model, trained: bool, checkpoint: bool = False) -> int:
    """Raise ``AdapterError`` unless ``folder`` holds every LoRA tensor of ``peft_model``; returns their count.

    A training checkpoint (``checkpoint=True``) also holds Trainer's state for resuming (optimizer, scheduler,
    RNG), which only Trainer reads; a final adapter folder holds nothing but what loading needs.
    """
    from safetensors import safe_open

    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
    if pickles and not checkpoint:
        raise AdapterError(f"{folder.name}/ holds pickled files ({', '.join(pickles)}); an adapter folder holds "
                           "only safetensors and JSON.")
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise AdapterError(f"{folder.name}/adapter_model.safetensors was not written.")
    want = expected_shapes(peft_model)
    with safe_open(str(path), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing = sorted(set(want) - set(got))
        wrong = sorted(k for k in set(want) & set(got) if got[k] != want[k])
        if missing or wrong or not want:
            detail = (f"{len(missing)} of {len(want)} LoRA tensors missing (first: {missing[0]})" if missing else
                      f"{len(wrong)} with the wrong shape (first: {wrong[0]}: {got[wrong[0]]}, expected "
                      f"{want[wrong[0]]})" if wrong else "the model has no LoRA layers")
            saved = f"; the file holds {len(got)} tensors" + (f" (first: {sorted(got)[0]})" if got else "")
            raise AdapterError(f"the saved adapter does not hold the trained LoRA weights: {detail}{saved}. The "
                               "run's checkpoints are kept; report this with logs/worker.log.")
        if trained:
            zero_b = [k for k in want if k.endswith("lora_B.weight") and not f.get_tensor(k).any()]
            if len(zero_b) == sum(k.endswith("lora_B.weight") for k in want):
                raise AdapterError("the saved adapter holds LoRA weights at their initial values (every B is zero): "
                                   "the training was not saved. The run's checkpoints are kept; report this with "
                                   "logs/worker.log.")
    return len(want)
