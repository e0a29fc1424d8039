"""One 8-bit optimizer update for all LoRA tensors (studio.speed.flat_optimizer) is bitsandbytes' per-tensor
update bit for bit, keeps its checkpoint format both ways, and leaves what it cannot merge alone."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

# LoRA shapes of r=8 on q and v of a small Mistral: rank x hidden and out x rank, each a multiple of 256 elements.
SHAPES = [(8, 512), (512, 8), (8, 512), (1024, 8), (8, 1024), (512, 8)]


def _pair(cls=None, shapes=SHAPES, **kw):
    torch.manual_seed(0)
    cls = cls or bnb.optim.PagedAdamW8bit
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": the same fallback for both
        return ours, theirs, cls(ours, lr=1e-2, weight_decay=0.01, **kw), cls(theirs, lr=1e-2, weight_decay=0.01, **kw)


def _steps(pairs, opts, n, none=()):
    for _ in range(n):
        for i, (a, b) in enumerate(pairs):
            if i in none:
                a.grad = b.grad = None
            else:
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for o in opts:
                o.step()


def _same(xs, ys) -> bool:
    return all(torch.equal(a, b) for a, b in zip(xs, ys))


def test_one_update_is_the_per_tensor_update_bit_for_bit():
    from studio.speed.flat_optimizer import flatten

    ours, theirs, o, t = _pair()
    initial = [p.detach().clone() for p in ours]
    assert flatten(o) == len(SHAPES)
    storage = ours[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in ours)  # one buffer
    assert flatten(o) == len(SHAPES) and ours[0].untyped_storage().data_ptr() == storage  # merged once
    _steps(list(zip(ours, theirs)), (o, t), 4)
    assert _same(ours, theirs) and not _same(ours, initial)
    for p, q in zip(ours, theirs):
        for k in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(o.state[p][k], t.state[q][k]), k
        assert o.state[p]["step"] == t.state[q]["step"] == 4


def test_a_checkpoint_resumes_with_or_without_merging():
    """The state_dict is bitsandbytes' per-tensor format: a merged optimizer's checkpoint loads into a plain one
    and the reverse, and both go on updating alike."""
    from studio.speed.flat_optimizer import flatten

    ours, theirs, o, t = _pair()
    flatten(o)
    pairs = list(zip(ours, theirs))
    _steps(pairs, (o, t), 2)
    saved = {}
    for name, opt in (("ours", o), ("theirs", t)):
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        saved[name] = torch.load(buf, weights_only=True)
    assert {k: v.shape for k, v in saved["ours"]["state"][0].items() if hasattr(v, "shape")} == {
        k: v.shape for k, v in saved["theirs"]["state"][0].items() if hasattr(v, "shape")}
    o.load_state_dict(saved["theirs"])  # a plain run's checkpoint into a merged optimizer
    t.load_state_dict(saved["ours"])  # and the other way
    _steps(pairs, (o, t), 2)
    assert _same(ours, theirs)
    assert all(o.state[p]["state1"].untyped_storage().data_ptr() == o.state[ours[0]]["state1"].untyped_storage()
               .data_ptr() for p in ours)  # the loaded state went back into the flat buffer


def test_a_tensor_without_a_gradient_takes_bitsandbytes_own_loop():
    from studio.speed.flat_optimizer import flatten

    ours, theirs, o, t = _pair()
    flatten(o)
    pairs = list(zip(ours, theirs))
    _steps(pairs, (o, t), 1)
    _steps(pairs, (o, t), 1, none=(2,))  # skipped by both: its step count now lags
    _steps(pairs, (o, t), 2)  # the counts differ: per-tensor again, on the flat views
    assert _same(ours, theirs)
    assert o.state[ours[2]]["step"] == 3 and o.state[ours[0]]["step"] == 4


@pytest.mark.parametrize("case", ["odd size", "small", "32-bit", "one tensor"])
def test_what_cannot_merge_is_left_alone(case):
    from studio.speed.flat_optimizer import flatten

    # "small": under bitsandbytes' min_8bit_size, so its state is 32-bit.
    shapes = {"odd size": [(8, 500), (8, 512)], "small": [(8, 256), (8, 512)]}.get(case, SHAPES)
    if case == "one tensor":
        shapes = SHAPES[:1]
    cls = bnb.optim.PagedAdamW32bit if case == "32-bit" else None
    ours, theirs, o, t = _pair(cls, shapes)
    assert flatten(o) == 0
    assert "step" not in vars(o)  # bitsandbytes' own step
    assert flatten(torch.optim.AdamW(theirs)) == 0


@pytest.mark.parametrize("clipped", [True, False], ids=["unscaled-before-step", "scaled-at-step"])
def test_fp16_loss_scaling_skips_exactly_as_gradscaler_does_without_waiting(clipped):
    """Under fp16 loss scaling GradScaler hands the merged optimizer its inf flag instead of reading it: an update
    with an inf gradient is undone, its counts taken back and the LR step after it dropped, as GradScaler's own skip
    does for the plain optimizer (Trainer steps the schedule only after updates that happened)."""
    from transformers import get_cosine_schedule_with_warmup

    from studio.speed.flat_optimizer import defer_scheduler, flatten

    ours, theirs, o, t = _pair()
    flatten(o)
    assert o._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    scheds = [get_cosine_schedule_with_warmup(x, 2, 8) for x in (o, t)]
    deferred = defer_scheduler(o, scheds[0])
    lrs = ([], [])
    for i in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a) * 2.0**10
            if i in (1, 4):
                a.grad[0, 0] = float("inf")
            b.grad = a.grad.clone()
        for k, (opt, scaler) in enumerate(zip((o, t), scalers)):
            scaler.scale(torch.ones(()))  # as the backward of a scaled loss: the scale is made at first use
            if clipped:
                scaler.unscale_(opt)  # as Trainer's gradient clipping does before the step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scaler.step(opt)
            state = scaler._per_optimizer_states[id(opt)]
            skipped = sum(v.item() for v in state["found_inf_per_device"].values()) > 0
            scaler.update()
            lrs[k].append(opt.param_groups[0]["lr"])
            if k == 0:
                deferred.step()  # Trainer cannot tell: GradScaler called our step
            elif not skipped:
                scheds[1].step()
    saved = o.state_dict()  # settles the last update
    assert _same(ours, theirs)
    assert lrs[0] == lrs[1] and deferred.get_last_lr() == scheds[1].get_last_lr()
    assert deferred.state_dict() == scheds[1].state_dict()
    assert [s["step"] for s in saved["state"].values()] == [s["step"] for s in t.state_dict()["state"].values()] == \
        [4] * len(SHAPES)
    for p, q in zip(ours, theirs):
        assert all(torch.equal(o.state[p][k], t.state[q][k]) for k in ("state1", "state2", "absmax1", "absmax2"))


@pytest.fixture
def accelerator():
    """accelerate's process state, as Trainer sets it up, reset afterwards for the tests that follow."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def _trainer_loop(flat, steps=8, none_at=(), inf_at=(), save_between=False, groups=False):
    """Trainer 5's order of calls around an update, through accelerate's optimizer wrapper and a GradScaler:
    unscale (gradient clipping), step, state_dict from a callback if asked, read the LR, step the schedule unless
    accelerate saw the update skipped.  Returns the logged LRs, the parameters and the final LR."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import get_linear_schedule_with_warmup

    from studio.speed.flat_optimizer import defer_scheduler, flatten, settle

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES[:4]]
    params = [{"params": ps, "weight_decay": 0.01}, {"params": [torch.nn.Parameter(torch.randn(8, 100))],
                                                    "weight_decay": 0.0}] if groups else ps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-2)
    if flat:
        assert flatten(opt) == 4
    everything = [p for g in opt.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    sched = defer_scheduler(wrapped, get_linear_schedule_with_warmup(wrapped, 0, 10))
    assert (sched is not sched._scheduler) if flat else not hasattr(sched, "_scheduler")
    lrs = []
    for i in range(steps):
        scaler.scale(torch.ones(()))
        g = torch.Generator().manual_seed(i)
        for j, p in enumerate(everything):
            p.grad = None if (i in none_at and j == 2) else torch.randn(p.shape, generator=g)
            if p.grad is not None and i in inf_at:
                p.grad.view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.step()
        if save_between:
            wrapped.state_dict()  # a callback's on_optimizer_step looking at the optimizer
        lrs.append(sched.get_last_lr()[0])
        if not wrapped.step_was_skipped:
            sched.step()
    settle(opt)  # as StudioTrainer.train does when training ends
    return lrs, [p.detach().clone() for p in everything], sched.get_last_lr()[0], opt.state_dict()


@pytest.mark.parametrize("case", [
    dict(inf_at=(0, 3)),  # the first update skipped, and one later
    dict(none_at=(1,), inf_at=(4,)),  # a missing gradient sends the group to bitsandbytes' loop for good
    dict(inf_at=(2,), save_between=True),  # settled before the schedule's step for that update came
    dict(inf_at=(2, 5), groups=True),  # Trainer's two groups: one merged, one bitsandbytes' own
], ids=["skips", "fallback", "settled-early", "two-groups"])
def test_trainer_order_of_calls_gives_the_stock_run(case, accelerator):
    ours, stock = _trainer_loop(True, **case), _trainer_loop(False, **case)
    assert ours[0] == stock[0]  # every logged LR
    assert _same(ours[1], stock[1])
    assert ours[2] == stock[2]  # the schedule as training left it
    assert [s["step"] for s in ours[3]["state"].values()] == [s["step"] for s in stock[3]["state"].values()]


def test_adamw_alike_optimizers_with_another_state_and_module_overrides_are_left_alone():
    from studio.speed.flat_optimizer import flatten

    ours, _, _, _ = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert flatten(bnb.optim.AdEMAMix8bit(ours, lr=1e-3)) == 0  # two values an element in state1
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(512, 8, bias=False), torch.nn.Linear(8, 512, bias=False)])
    manager = bnb.optim.GlobalOptimManager.get_instance()
    try:
        manager.register_module_override(layers[0], "weight", {"lr": 0.5})
        assert flatten(bnb.optim.AdamW8bit(layers.parameters(), lr=1e-3)) == 0
    finally:
        manager.initialize()  # the process-wide manager keys overrides by id(): none may outlive this test


def test_merged_optimizer_keeps_torch_step_hooks_and_its_scheduler_copies():
    import copy

    from transformers import get_linear_schedule_with_warmup

    from studio.speed.flat_optimizer import defer_scheduler, flatten

    ours, theirs, o, _ = _pair()
    flatten(o)
    called = []
    o.register_step_post_hook(lambda *a: called.append(1))
    sched = defer_scheduler(o, get_linear_schedule_with_warmup(o, 0, 10))
    _steps(list(zip(ours, theirs)), (o,), 2)
    assert called == [1, 1]
    assert copy.copy(sched).get_last_lr() == sched.get_last_lr()
    assert flatten(o) == len(SHAPES)  # merged already: the same count, nothing done again
