"""One 8-bit optimizer update for all LoRA tensors, instead of one update per tensor.

bitsandbytes' 8-bit optimizers (``paged_adamw_8bit`` of the fast preset) update each parameter with its own
kernel, launched from a Python loop: 128 LoRA tensors a step for r=8 on q,v of Mistral-7B, about 20 ms of host
time a step that the GPU waits through when rows are short (``bench.profile_step --gaps``).  Their state is
quantized in blocks of 256 elements that never look at each other, and a LoRA tensor (rank x a hidden size) holds
a multiple of 256 elements at the usual ranks and widths, so such tensors laid end to end give the very same
blocks: one update over the whole buffer is the same update, bit for bit (``tests/test_flat_optimizer.py``; on the
GPU ``tests/gpu/test_lean_gpu.py`` and, through the engine with fp16 loss scaling and CUDA graphs,
``tests/gpu/test_isolation_gpu.py``).

Contract: ``flatten(optimizer) -> int`` merges each parameter group of a bitsandbytes Adam or AdamW optimizer with
8-bit state whose parameters all share a device and dtype, are contiguous, hold a multiple of 256 and at least
``min_8bit_size`` elements, and have no per-parameter config override (module overrides included); a group with
one tensor that does not qualify is left whole to bitsandbytes.  It returns how many tensors it merged (0: the
optimizer is left as it was).  Call it before anything records the parameters' addresses (CUDA graphs): the
parameters become views of one buffer per merged group.  What stays as it was: ``state_dict()`` and
``load_state_dict()`` keep bitsandbytes' per-tensor format (each tensor's state is a view of the flat state), so a
checkpoint resumes with or without merging; a step in which a merged parameter has no gradient, or the tensors'
step counts differ, runs bitsandbytes' own per-tensor loop on the same views (from then on, if the counts stay
apart).  Costs a gradient buffer the size of the merged parameters, in their dtype (13 MiB for the fast preset),
and under fp16 a copy of the parameters and state each update (for the undo below).  The flat state is in GPU
memory, never paged (bitsandbytes pages a tensor's state from 1e5 elements on).

fp16 training without a wait per step.  torch's ``GradScaler`` skips an update whose gradients hold inf or NaN,
and to know whether to, it reads a flag from the GPU (``.item()``) before every update: the host waits for the
whole backward, and the GPU then idles while the host works through the step's end and the next step's start
(3-4 ms a step of the fast preset, ``bench.profile_step --gaps``).  A merged optimizer tells ``GradScaler`` it
handles the flag itself (``_step_supports_amp_scaling``, as torch's fused Adam does): it updates, puts the
parameters and state back on the GPU where the flag is set (``torch.where``, nothing read by the host), and copies
the flag to pinned host memory.  What the host needs of it, the update counts bitsandbytes' bias correction reads
and whether the LR schedule advances, ``settle`` works out at the next update (the flag arrived long before), when
the state is saved or loaded, and when training ends: ``defer_scheduler(optimizer, scheduler)`` returns the
scheduler whose ``step()`` waits for that.  Under Trainer's loop a skipped update thus leaves parameters, state,
counts and schedule as ``GradScaler``'s own skip does (the tests skip updates with inf gradients both ways).
"""

from __future__ import annotations

import types

BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer state (Optimizer2State.init_state)
_STATE = ("state1", "state2")  # uint8, one byte an element
_ABSMAX = ("absmax1", "absmax2")  # fp32, one an element block


def flatten(optimizer) -> int:
    """Merge what can be merged (see the module's contract); the number of tensors merged (those merged before, for
    an optimizer this already merged)."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optim
        import torch
    except ImportError:
        return 0
    if getattr(optimizer, "_studio_flat", None) is not None:
        return sum(len(g.params) for g in optimizer._studio_flat.values())
    cls = type(optimizer)
    # Adam and AdamW only: AdEMAMix is an Optimizer2State too, but keeps two values an element in state1.
    if (not isinstance(optimizer, bnb_optim.Optimizer2State) or optimizer.optimizer_name != "adam"
            or cls.init_state is not bnb_optim.Optimizer2State.init_state
            or cls.update_step is not bnb_optim.Optimizer2State.update_step):
        return 0
    if optimizer.args.optim_bits != 8 or optimizer.args.max_unorm > 0:
        return 0
    optimizer.check_overrides()  # module overrides reach the per-parameter configs now, not at the first step
    groups = {}
    for gindex, group in enumerate(optimizer.param_groups):
        if _mergeable(optimizer, gindex, group["params"]):
            groups[gindex] = _FlatGroup(optimizer, group["params"])
    if not groups:
        return 0
    optimizer._studio_flat = groups
    optimizer._studio_pending = None  # the last update's skip flag, on its way to the host
    optimizer._studio_scheduler = None
    optimizer._step_supports_amp_scaling = True  # GradScaler hands over found_inf instead of reading it
    # Through torch's own wrapper, so the optimizer's step hooks and profiler labels still run.
    optimizer.step = types.MethodType(torch.optim.Optimizer.profile_hook_step(_step), optimizer)
    load, save = optimizer.load_state_dict, optimizer.state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        settle(self)
        out = load(state_dict, *args, **kwargs)
        for flat in groups.values():
            flat.state_ready = False  # the loaded tensors are copied into the flat state at the next step
        return out

    def state_dict(self, *args, **kwargs):
        settle(self)  # the update counts as GradScaler's skips left them
        return save(*args, **kwargs)

    optimizer.load_state_dict = types.MethodType(load_state_dict, optimizer)
    optimizer.state_dict = types.MethodType(state_dict, optimizer)
    return sum(len(g.params) for g in groups.values())


class _DeferredScheduler:
    """An LR scheduler whose ``step()`` after an update of unknown fate waits until the optimizer knows whether
    ``GradScaler`` skipped it (Trainer steps the schedule only after updates that happened)."""

    def __init__(self, scheduler, optimizer):
        self._scheduler, self._optimizer = scheduler, optimizer
        self._pending = 0  # steps asked for while the last update's fate was on its way
        self._known = None  # that fate, when it was settled before this scheduler's step for it came

    def step(self, *args, **kwargs):
        if args or kwargs:
            return self._scheduler.step(*args, **kwargs)
        if self._known is not None:
            skipped, self._known = self._known, None
            if not skipped:
                self._scheduler.step()
        elif self._optimizer._studio_pending is not None:
            self._pending += 1
        else:
            self._scheduler.step()

    def settle(self, skipped: bool) -> None:
        """The last update's fate: the step asked for after it is dropped if it was skipped."""
        if not self._pending:
            self._known = skipped  # settled early (a state_dict between the update and this step)
            return
        steps, self._pending = self._pending - int(skipped), 0
        for _ in range(steps):
            self._scheduler.step()

    def state_dict(self):
        settle(self._optimizer)
        return self._scheduler.state_dict()

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_scheduler", "_optimizer", "_pending", "_known"):
            raise AttributeError(name)  # copy and pickle look these up before __init__ has run
        return getattr(self._scheduler, name)


def defer_scheduler(optimizer, scheduler):
    """``scheduler`` as the trainer should step it: deferred where ``optimizer`` (or the optimizer it wraps) was
    merged by ``flatten``, else ``scheduler`` itself (also a metric-driven scheduler, which Trainer finds by its
    type and steps with the evaluation's metric)."""
    import torch

    inner = _inner(optimizer)
    if (getattr(inner, "_studio_flat", None) is None or isinstance(scheduler, _DeferredScheduler)
            or not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
            or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return scheduler
    deferred = _DeferredScheduler(scheduler, inner)
    inner._studio_scheduler = deferred
    return deferred


def settle(optimizer) -> None:
    """Learn whether ``optimizer``'s (or the optimizer it wraps) last update was skipped: if so, take back its
    update counts and drop the LR step that followed it; if not, take that LR step.  Saving and loading state
    settle first; StudioTrainer also settles when training ends, so the schedule reads as Trainer left it."""
    optimizer = _inner(optimizer)
    pending = getattr(optimizer, "_studio_pending", None)
    if pending is None:
        return
    optimizer._studio_pending = None
    event, flag, params = pending
    if event is not None:
        event.synchronize()  # recorded a step ago: long done
    skipped = bool(flag.item())
    if skipped:
        for p in params:
            optimizer.state[p]["step"] -= 1
    if optimizer._studio_scheduler is not None:
        optimizer._studio_scheduler.settle(skipped)


def _mergeable(optimizer, gindex: int, params) -> bool:
    if len(params) < 2:
        return False
    first = params[0]
    mng = optimizer.mng
    for pindex, p in enumerate(params):
        if (p.device != first.device or p.dtype != first.dtype or not p.is_contiguous() or p.numel() % BLOCK
                or p.numel() < optimizer.args.min_8bit_size or (gindex, pindex) in mng.index2config
                or id(p) in mng.pid2config):
            return False
    return True


class _FlatGroup:
    """One group's parameters as views of one buffer, with a gradient buffer and (from the first step) a flat
    8-bit state whose per-tensor views are what ``optimizer.state`` holds."""

    def __init__(self, optimizer, params):
        import torch

        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        first = self.params[0]
        with torch.no_grad():
            self.param = torch.empty(self.offsets[-1], dtype=first.dtype, device=first.device)
            for p, view in zip(self.params, self._views(self.param)):
                view.copy_(p.data)
                p.data = view
        self.grad = torch.empty_like(self.param)
        self.flat_state: dict = {}
        self.state_ready = False

    def _views(self, flat, per: int = 1):
        """``flat`` cut at the parameters' boundaries (``per`` elements of ``flat`` per ``per`` of a parameter's),
        each view shaped as its parameter where ``per`` is 1."""
        out = []
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            v = flat[a // per:b // per]
            out.append(v.view_as(p) if per == 1 else v)
        return out

    def ready_state(self, optimizer) -> None:
        """Point every tensor's state at the flat state, copying what it held (a loaded checkpoint, steps taken
        one tensor at a time) or starting from zeros as bitsandbytes' ``init_state`` does."""
        import torch

        if not self.flat_state:
            if "dynamic" not in optimizer.name2qmap:
                optimizer.fill_qmap()
            for name in ("dynamic", "udynamic"):
                optimizer.name2qmap[name] = optimizer.name2qmap[name].to(self.param.device)
            # In GPU memory, never paged: bitsandbytes pages a tensor's state only from 1e5 elements (LoRA states
            # are a few MiB together), and a paged buffer is a CPU tensor to torch, which the skip's undo cannot use.
            self.flat_state = {k: torch.zeros(self.offsets[-1], dtype=torch.uint8, device=self.param.device)
                               for k in _STATE}
            self.flat_state.update({k: torch.zeros(self.offsets[-1] // BLOCK, dtype=torch.float32,
                                                   device=self.param.device) for k in _ABSMAX})
        views = {k: self._views(self.flat_state[k]) for k in _STATE}
        views.update({k: self._views(self.flat_state[k], BLOCK) for k in _ABSMAX})
        with torch.no_grad():
            for i, p in enumerate(self.params):
                state = optimizer.state[p]
                for k, vs in views.items():
                    old = state.get(k)
                    if old is not None and old.data_ptr() != vs[i].data_ptr():
                        vs[i].copy_(old.reshape(vs[i].shape))
                    elif old is None:
                        vs[i].zero_()
                    state[k] = vs[i]
                state.setdefault("step", 0)
                state["qmap1"] = optimizer.name2qmap["dynamic"]
                state["qmap2"] = optimizer.name2qmap["udynamic"]
        self.state_ready = True

    def step(self, optimizer, group, gindex: int, found_inf=None, grad_scale=None) -> bool:
        """One update for the whole group; False (nothing done) where the per-tensor loop must run instead.  With
        ``found_inf`` (GradScaler's flag, on the GPU) the update is undone on the GPU where the flag is set;
        ``grad_scale``: the scale the gradients still carry."""
        import bitsandbytes.functional as F
        import torch

        grads = [p.grad for p in self.params]
        if any(g is None or g.dtype != self.param.dtype for g in grads):
            return False
        if not self.state_ready:
            self.ready_state(optimizer)
        states = [optimizer.state[p] for p in self.params]
        step = states[0]["step"] + 1
        if any(s["step"] != step - 1 for s in states):
            return False
        torch.cat([g.reshape(-1) for g in grads], out=self.grad)
        if grad_scale is not None:  # on the flat copy: the same multiply as on each gradient
            _unscale([self.grad], grad_scale)
        undoable = (self.param, *self.flat_state.values())
        kept = [t.clone() for t in undoable] if found_inf is not None else None
        for s in states:
            s["step"] = step
        config = optimizer.get_config(gindex, 0, group)
        betas = config["betas"]
        F.optimizer_update_8bit_blockwise(
            optimizer.optimizer_name, self.grad, self.param, self.flat_state["state1"], self.flat_state["state2"],
            betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"],
            step, config["lr"], optimizer.name2qmap["dynamic"], optimizer.name2qmap["udynamic"],
            self.flat_state["absmax1"], self.flat_state["absmax2"], config["weight_decay"], gnorm_scale=1.0,
            skip_zeros=config["skip_zeros"])
        if kept is not None:
            skip = found_inf.reshape(1) > 0
            for t, old in zip(undoable, kept):
                t.copy_(torch.where(skip, old, t))
        return True


def _unscale(grads, grad_scale) -> None:
    """GradScaler's own unscale (``unscale_``): each gradient times the scale's reciprocal, in place."""
    import torch

    inv = grad_scale.double().reciprocal().float()
    torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros_like(inv), inv)


def _inner(optimizer):
    """The optimizer under accelerate's wrapper, or ``optimizer`` itself."""
    return getattr(optimizer, "optimizer", optimizer)


def _step(self, closure=None):
    """bitsandbytes' ``Optimizer8bit.step`` with one update for each merged group."""
    import bitsandbytes.optim.optimizer as bnb_optim
    import torch

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    # Set by GradScaler (``_step_supports_amp_scaling``); absent without fp16 loss scaling.
    found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
    with torch.no_grad():
        settle(self)
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last, merged = None, []
        for gindex, group in enumerate(self.param_groups):
            flat = self._studio_flat.get(gindex)
            if flat is not None and flat.step(self, group, gindex, found_inf, grad_scale):
                last = flat.param
                merged += flat.params
                continue
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads or (found_inf is not None and found_inf.item()):
                continue  # GradScaler's skip, read as it reads it (a wait: this loop is the rare path)
            if grad_scale is not None:
                _unscale(grads, grad_scale)
            for pindex, p in enumerate(group["params"]):  # bitsandbytes' own loop
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                bnb_optim.sync_gpu(p)  # looked up now: studio.trainer skips it on the default stream
                last = p
        if self.is_paged and last is not None:
            bnb_optim.sync_gpu(last)
        if found_inf is not None:  # the flag travels to the host while the GPU works on (settle reads it)
            if found_inf.device.type == "cuda":
                flag = torch.empty(1, dtype=found_inf.dtype, pin_memory=True)
                flag.copy_(found_inf.reshape(1), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                flag, event = found_inf.reshape(1).clone(), None
            self._studio_pending = (event, flag, merged)
    return loss
