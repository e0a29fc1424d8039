"""One 8-bit optimizer update for all LoRA tensors, instead of one update per tensor.

bitsandbytes' 8-bit optimizers (``paged_adamw_8bit`` of the fast preset) update each parameter with its own
kernel, launched from a Python loop: 128 LoRA tensors a step for r=8 on q,v of Mistral-7B, about 20 ms of host
time a step that the GPU waits through when rows are short (``bench.profile_step --gaps``).  Their state is
quantized in blocks of 256 elements that never look at each other, and every LoRA tensor's size is a multiple of
256 (rank x a hidden size), so the tensors laid end to end give the very same blocks: one update over the whole
buffer is the same update, bit for bit (``tests/test_flat_optimizer.py``, ``tests/gpu/test_graphs_gpu.py``).

Contract: ``flatten(optimizer) -> int`` merges each parameter group of a bitsandbytes Adam-family optimizer
(``Optimizer2State``) with 8-bit state whose parameters all share a device and dtype, are contiguous, hold a
multiple of 256 and at least ``min_8bit_size`` elements, and have no per-parameter config override; it returns
how many tensors it merged (0: the optimizer is left as it was).  Call it before anything records the parameters'
addresses (CUDA graphs): the parameters become views of one buffer per merged group.  What stays as it was:
``state_dict()`` and ``load_state_dict()`` keep bitsandbytes' per-tensor format (each tensor's state is a view of
the flat state), so a checkpoint resumes with or without flattening; a step in which a merged parameter has no
gradient, or the tensors' step counts differ, runs bitsandbytes' own per-tensor loop on the same views.  Costs one
fp32 gradient buffer the size of the merged parameters (13 MiB for the fast preset).
"""

from __future__ import annotations

import types

BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer state (Optimizer2State.init_state)
_STATE = ("state1", "state2")  # uint8, one byte an element
_ABSMAX = ("absmax1", "absmax2")  # fp32, one an element block


def flatten(optimizer) -> int:
    """Merge what can be merged (see the module's contract); the number of tensors merged."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optim
    except ImportError:
        return 0
    if not isinstance(optimizer, bnb_optim.Optimizer2State) or getattr(optimizer, "_studio_flat", None) is not None:
        return 0
    if optimizer.args.optim_bits != 8 or optimizer.args.max_unorm > 0:
        return 0
    groups = {}
    for gindex, group in enumerate(optimizer.param_groups):
        if _mergeable(optimizer, gindex, group["params"]):
            groups[gindex] = _FlatGroup(optimizer, group["params"])
    if not groups:
        return 0
    optimizer._studio_flat = groups
    optimizer.step = types.MethodType(_step, optimizer)
    load = optimizer.load_state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        out = load(state_dict, *args, **kwargs)
        for flat in groups.values():
            flat.state_ready = False  # the loaded tensors are copied into the flat state at the next step
        return out

    optimizer.load_state_dict = types.MethodType(load_state_dict, optimizer)
    return sum(len(g.params) for g in groups.values())


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
            self.flat_state = {k: optimizer.get_state_buffer(self.param, dtype=torch.uint8) for k in _STATE}
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

    def step(self, optimizer, group, gindex: int) -> bool:
        """One update for the whole group; False (nothing done) where the per-tensor loop must run instead."""
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
        for s in states:
            s["step"] = step
        config = optimizer.get_config(gindex, 0, group)
        if optimizer.is_paged and getattr(self.flat_state["state1"], "is_paged", False):
            F.prefetch_tensor(self.flat_state["state1"])
            F.prefetch_tensor(self.flat_state["state2"])
        betas = config["betas"]
        F.optimizer_update_8bit_blockwise(
            optimizer.optimizer_name, self.grad, self.param, self.flat_state["state1"], self.flat_state["state2"],
            betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"],
            step, config["lr"], optimizer.name2qmap["dynamic"], optimizer.name2qmap["udynamic"],
            self.flat_state["absmax1"], self.flat_state["absmax2"], config["weight_decay"], gnorm_scale=1.0,
            skip_zeros=config["skip_zeros"])
        return True


def _step(self, closure=None):
    """bitsandbytes' ``Optimizer8bit.step`` with one update for each merged group."""
    import bitsandbytes.optim.optimizer as bnb_optim
    import torch

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            flat = self._studio_flat.get(gindex)
            if flat is not None and flat.step(self, group, gindex):
                last = flat.param
                continue
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
    return loss
