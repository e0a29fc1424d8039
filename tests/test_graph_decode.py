"""The graphed sample answers (studio.speed.graph_decode) decode what ``generate`` decodes.

On the CPU the decoding steps run eagerly; the GPU tier (tests/gpu/test_graph_decode_gpu.py) replays them as a CUDA
graph and compares with these same eager steps.  Here: the steps over a static cache, with left-padded prompts of
different lengths, give ``generate``'s greedy tokens exactly (its static and its default cache); rows that end at
different steps are padded and decoding stops where generate stops; a cache that would roll is refused before
anything runs; on the CPU the run's sample answers come from ``generate`` as before."""

import pytest


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from studio import modeling
    from studio.presets import load_preset

    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir)})
    model, tok = modeling.load_for_inference(cfg)
    return model.eval(), tok


def _prompts(tok, texts):
    import torch

    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    n = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


TEXTS = ["### Instruction:\nWhat is a bond?\n\n### Response:\n",
         "### Instruction:\nName three ways to save money when prices rise every month.\n\n### Response:\n",
         "Hello"]


def _generate(model, tok, input_ids, mask, new, eos, **kw):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id, **kw)
    return out[:, input_ids.shape[1]:]


@pytest.mark.parametrize("window", [None, 4096])  # Mistral-7B-v0.1's sliding window holds every position here
def test_the_static_cache_steps_decode_generates_greedy_tokens(tiny, window, monkeypatch):
    import torch

    from studio.speed.graph_decode import greedy_tokens

    model, tok = tiny
    monkeypatch.setattr(model.config, "sliding_window", window)
    input_ids, mask = _prompts(tok, TEXTS)
    assert len(set(mask.sum(1).tolist())) == 3  # three prompt lengths: left padding matters
    ours = greedy_tokens(model, input_ids, mask, 40, [tok.eos_token_id], tok.pad_token_id)
    static = _generate(model, tok, input_ids, mask, 40, tok.eos_token_id, cache_implementation="static")
    default = _generate(model, tok, input_ids, mask, 40, tok.eos_token_id)
    assert ours.shape == (3, 40)
    assert torch.equal(ours, static) and torch.equal(ours, default)


@pytest.mark.parametrize("window", [None, 4096])
def test_every_layer_keeps_its_fill_level_on_the_device(tiny, window, monkeypatch):
    """A replayed graph sees only device memory: the queries' offset the model reads from the cache must be a
    tensor that the step itself advances, never a Python int frozen at capture (transformers' sliding-window layer
    keeps one; a window holding every position gets the full-attention layer)."""
    import torch

    from studio.speed.graph_decode import static_cache

    model, tok = tiny
    monkeypatch.setattr(model.config, "sliding_window", window)
    input_ids, mask = _prompts(tok, TEXTS)
    cache = static_cache(model.config, input_ids.shape[1] + 8)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=torch.ones(3, input_ids.shape[1] + 8, dtype=torch.bool),
              past_key_values=cache, use_cache=True)
    offsets = [cache.get_query_offset(i) for i in range(len(cache.layers))]
    assert all(torch.is_tensor(o) and int(o) == input_ids.shape[1] for o in offsets)


def test_rows_that_end_are_padded_and_decoding_stops_where_generate_stops(tiny):
    """With an end token each row reaches at a different step, rows are padded after it, and the answer is cut
    after the step the last row ended in, as generate cuts it (16-token host checks drop their extra columns)."""
    import torch

    from studio.speed.graph_decode import greedy_tokens

    model, tok = tiny
    input_ids, mask = _prompts(tok, TEXTS)
    free = greedy_tokens(model, input_ids, mask, 48, [tok.eos_token_id], tok.pad_token_id)
    # End tokens: for each row a token it emits for the first time at a different step, all before step 30.
    ends, firsts = [], []
    for r, row in enumerate(free.tolist()):
        for i, t in enumerate(row[:30]):
            if t not in row[:i] and t != tok.pad_token_id and all(t not in other[: i + 1] for other in
                                                                    free.tolist()[:r] + free.tolist()[r + 1:]):
                if i not in firsts:
                    ends.append(t)
                    firsts.append(i)
                    break
    assert len(ends) == 3 and len(set(firsts)) == 3
    ours = greedy_tokens(model, input_ids, mask, 48, ends, tok.pad_token_id)
    theirs = _generate(model, tok, input_ids, mask, 48, ends, cache_implementation="static")
    assert torch.equal(ours, theirs)
    assert ours.shape[1] == max(firsts) + 1 < 48
    for r, first in enumerate(firsts):  # the row's own end token, then padding
        assert ours[r, first] in ends and (ours[r, first + 1:] == tok.pad_token_id).all()


def test_a_cache_that_would_roll_is_refused_before_anything_runs(tiny, monkeypatch):
    """A sliding window shorter than prompt plus answer rolls the cache in Python: a replayed graph would not follow
    it.  ``greedy_tokens`` refuses before the model runs (generate_texts then uses generate)."""
    from studio.speed.graph_decode import Unsupported, greedy_tokens

    model, tok = tiny
    input_ids, mask = _prompts(tok, TEXTS)
    calls = []
    monkeypatch.setattr(model.config, "sliding_window", 16)
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(Unsupported):
            greedy_tokens(model, input_ids, mask, 24, [tok.eos_token_id], tok.pad_token_id, graphed=True)
    finally:
        handle.remove()
    assert calls == []


def test_on_the_cpu_graphed_samples_are_the_plain_samples(tiny):
    from studio.data.schema import Example
    from studio.data.templates import TemplateSpec
    from studio.generate import generate_texts

    model, tok = tiny
    spec = TemplateSpec(name="alpaca")
    examples = [Example(instruction="What is a bond?"), Example(instruction="Name three ways to save money.")]
    answers = generate_texts(model, tok, examples, spec, 24, graphed=True)
    assert answers == generate_texts(model, tok, examples, spec, 24) and all(answers)


@pytest.mark.parametrize("change,why", [
    ({"_attn_implementation": "flash_attention_2"}, "flash_attention_2 attention"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic RoPE"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "longrope RoPE")])
def test_attention_or_rope_a_replayed_step_would_get_wrong_is_refused(tiny, change, why):
    """flash-attention's mask drops the causal offset that keeps the open future slots unseen; dynamic and long
    RoPE choose their frequencies in Python from the length (a host sync inside a capture)."""
    import copy

    from studio.speed.graph_decode import Unsupported, static_cache

    model, _ = tiny
    config = copy.deepcopy(model.config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(Unsupported, match=why):
        static_cache(config, 64)
    assert len(static_cache(model.config, 64).layers) == model.config.num_hidden_layers
