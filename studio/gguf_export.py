"""GGUF files from a merged model, written with llama.cpp's own Python writer (``gguf``), and checked in llama.cpp.

Contract:
- ``write_gguf(model_dir, out, kind, chat_template, progress)`` writes ``kind`` in ``("f16", "q8_0")`` directly
  from the merged model's safetensors, one tensor at a time (memory stays near one tensor): llama.cpp's tensor
  names (``gguf``'s own name map), Q and K rows permuted into the layout llama.cpp's RoPE expects (the permute of
  llama.cpp's converter), norms in F32, the tokenizer (tokens, merges or scores, token types, BOS/EOS/pad ids,
  add-BOS, pre-tokenizer) and the chat template.  Only the Llama/Mistral architecture (``LlamaForCausalLM``,
  ``MistralForCausalLM``) with plain RoPE is written; anything else raises ``GGUFError`` saying why.
- ``quantize(f16_path, out, "q4_k_m")`` makes Q4_K_M from the F16 file with llama.cpp's ``llama_model_quantize``
  (llama-cpp-python); tensors whose rows do not fit a 256-wide K block get llama.cpp's own fallback type.
- ``check_gguf(model_dir, gguf_path, kind, prompts)`` loads the file in llama.cpp and compares it with the merged
  model (transformers, float32) on the prompts: token ids equal, greedy answers, teacher-forced logits (max
  absolute difference) and top-1 agreement.  ``passed`` applies the stated bar in ``BARS``.
- ``modelfile(...)``/``ollama_template(...)`` give an Ollama Modelfile whose Go template renders exactly the
  prompt the studio renders (derived from the studio's template by rendering it with sentinels).
Never imports gradio.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("f16", "q8_0", "q4_k_m")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# The bar each file must clear against the merged model on the run's prompts, stated before measuring.
# f16: weights rounded to 11 significant bits and llama.cpp's f16 matmuls (activations rounded to f16 too) move a
# logit by far less than 0.05 on models of any size we export; the greedy answers must be the same tokens.
# q8_0 / q4_k_m: quantization changes logits by design, so the bar is agreement of the top-1 token at every
# position of prompt + reference answer (teacher-forced): q8_0 is near-lossless (>= 98%), Q4_K_M lossy (>= 90%).
BARS = {
    "f16": {"max_abs_logit_diff": 0.05, "top1_agreement": 1.0, "greedy_equal": True},
    "q8_0": {"top1_agreement": 0.98},
    "q4_k_m": {"top1_agreement": 0.90},
}

# llama.cpp's file types (enum llama_ftype in llama.h); general.file_type records what the file mostly holds.
_FTYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}


class GGUFError(RuntimeError):
    """The model cannot be written as GGUF (or llama.cpp is missing); the message says why and what to do."""


def _cfg(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def check_supported(model_dir: Path) -> dict:
    """The model's config, or ``GGUFError`` naming what the studio's GGUF writer does not handle."""
    return check_config(_cfg(model_dir))


def check_config(cfg: dict) -> dict:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF export handles the Llama/Mistral architecture ({', '.join(ARCHITECTURES)}); this "
                        f"model is {arch}. Use the merged model (safetensors) or llama.cpp's converter instead.")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if rope_type != "default":
        raise GGUFError(f"GGUF export handles plain RoPE; this model uses {rope_type!r} RoPE scaling.")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise GGUFError("GGUF export handles Llama/Mistral without attention or MLP biases; this model has them.")
    return cfg


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def permute(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's converter permute: HF stores each head's rotary halves apart, llama.cpp interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer ----------------------------------------------------------------------------------------------
# GPT-2's split pattern, as tokenizers' ByteLevel(use_regex=True) applies it; llama.cpp's "gpt-2" pre-tokenizer.
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _bpe_pre(tj: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE, read from the tokenizer's own pre-tokenizer.

    llama.cpp's converter identifies it by hashing the tokens of a test string against known models, which
    refuses any tokenizer trained afresh (the studio's tiny model); the structure says the same thing directly.
    """
    pre = tj.get("pre_tokenizer") or {}
    if tj.get("normalizer"):
        raise GGUFError("the tokenizer normalizes text before splitting; llama.cpp's byte-level BPE would not.")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split"
                and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
            return "llama-bpe"
    raise GGUFError(f"unknown byte-level BPE pre-tokenizer ({json.dumps(pre)[:120]}); llama.cpp would split text "
                    "differently from the model's tokenizer.")


def tokenizer_fields(model_dir: Path, n_vocab: int) -> dict:
    """What llama.cpp needs of the tokenizer: ``{"model", "pre", "tokens", "types", "scores"?, "merges"?}``.

    Byte-level BPE (GPT-2 / Llama 3 style): tokens as the tokenizer stores them, merges, ``gpt2`` model.
    SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``gguf``'s ``LlamaHfVocab``, ``llama`` model.
    Token types follow llama.cpp's converter: added special tokens CONTROL (so ``</s>`` in text is one token, as
    in transformers), other added tokens USER_DEFINED, ids without a token UNUSED.
    """
    import gguf
    from transformers import AutoTokenizer

    tj = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(Path(model_dir))
        toks, scores, types = zip(*vocab.all_tokens())
        return {"model": "llama", "pre": "default", "tokens": list(toks), "scores": list(scores),
                "types": [int(t) for t in types], "merges": None}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"GGUF export handles BPE tokenizers (byte-level, or with byte fallback); this one is "
                        f"{model.get('type')!r}.")
    pre = _bpe_pre(tj)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = gguf.SpecialVocab(Path(model_dir), load_merges=True).merges
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "scores": None, "merges": merges}


# ---- writing ------------------------------------------------------------------------------------------------
def _plan_tensor(name: str, shape: tuple[int, ...], kind: str):
    """(ggml type, bytes) for one tensor: 1-D tensors F32 as llama.cpp's converter keeps them; Q8_0 needs rows in
    blocks of 32 (else F16, the converter's fallback)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES

    if len(shape) == 1:
        return Q.F32, int(np.prod(shape)) * 4
    if kind == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        from gguf import quant_shape_to_byte_shape

        return Q.Q8_0, int(np.prod(quant_shape_to_byte_shape(shape, Q.Q8_0)))
    return Q.F16, int(np.prod(shape)) * 2


def write_gguf(model_dir: str | Path, out: str | Path, kind: str, *, chat_template: str | None = None,
               name: str = "", progress: Callable[[float, str], None] | None = None) -> Path:
    import gguf
    import numpy as np
    from safetensors import safe_open

    if kind not in ("f16", "q8_0"):
        raise GGUFError(f"write_gguf writes f16 or q8_0 directly; {kind!r} is made from the f16 file by quantize().")
    model_dir, out = Path(model_dir), Path(out)
    cfg = check_supported(model_dir)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    n_layer, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, n_layer)

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{model_dir} holds no safetensors weights; merge the run first.")
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                where[k] = f
                shapes[k] = tuple(st.get_slice(k).get_shape())
    plan = []
    for hf_name in sorted(where):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise GGUFError(f"no llama.cpp name for tensor {hf_name!r}; the model is not plain Llama/Mistral.")
        plan.append((hf_name, gg, shapes[hf_name]))
    if cfg.get("tie_word_embeddings") and not any(g == "output.weight" for _, g, _ in plan):
        pass  # llama.cpp reuses token_embd for the output when no output tensor is present
    n_vocab = shapes["model.embed_tokens.weight"][0]

    tk = tokenizer_fields(model_dir, n_vocab)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or model_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(_FTYPE[kind])
    w.add_tokenizer_model(tk["model"])
    w.add_tokenizer_pre(tk["pre"])
    w.add_token_list(tk["tokens"])
    w.add_token_types(tk["types"])
    if tk["scores"] is not None:
        w.add_token_scores(tk["scores"])
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    special.chat_template = None  # the run's template is written below (or the model's own, for chat runs)
    if tk["merges"]:
        w.add_token_merges(tk["merges"])
    special.add_to_gguf(w, quiet=True)
    if chat_template:
        w.add_chat_template(chat_template)

    types = {}
    for hf_name, gg, shape in plan:
        qt, nbytes = _plan_tensor(gg, shape, kind)
        types[gg] = qt
        w.add_tensor_info(gg, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(s)) for _, _, s in plan)
    done = 0
    handles: dict[Path, object] = {}
    try:
        for hf_name, gg, shape in plan:
            f = where[hf_name]
            if f not in handles:
                handles[f] = safe_open(str(f), "pt").__enter__()
            t = handles[f].get_tensor(hf_name).float().numpy()
            if hf_name.endswith("q_proj.weight"):
                t = permute(t, n_head, n_head)
            elif hf_name.endswith("k_proj.weight"):
                t = permute(t, n_head, n_kv)
            data = gguf.quants.quantize(np.ascontiguousarray(t), types[gg])
            if types[gg] == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
                raise GGUFError(f"{hf_name} has values beyond float16's range; F16 cannot hold this model.")
            w.write_tensor_data(data)
            done += t.size
            if progress:
                progress(done / total, f"writing {gg}")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
        w.close()
    tmp.replace(out)
    return out


def llama_cpp():
    """llama-cpp-python, or ``GGUFError`` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise GGUFError("llama-cpp-python is not installed: `pip install llama-cpp-python` (builds llama.cpp on "
                        "this machine; see requirements-dev.txt).") from None
    return llama_cpp


def quantize(f16_path: str | Path, out: str | Path, kind: str = "q4_k_m", threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) from the F16 file."""
    lc = llama_cpp()
    if kind != "q4_k_m":
        raise GGUFError(f"quantize() makes q4_k_m; {kind!r} is written directly.")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads or _threads()
    import ctypes

    rc = lc.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"llama.cpp could not quantize {Path(f16_path).name} to Q4_K_M (code {rc}).")
    tmp.replace(out)
    return out


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tensor_types(path: str | Path) -> dict[str, int]:
    """``{ggml type name: tensor count}`` of a GGUF file, read back with ``gguf``'s reader."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


# ---- checking -----------------------------------------------------------------------------------------------
@dataclass
class GGUFCheck:
    kind: str
    prompts: int
    tokens_equal: bool
    greedy_equal: int                     # prompts whose greedy answers are the same tokens
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float                 # teacher-forced, over every position of prompt + reference answer
    positions: int
    bar: dict
    passed: bool
    tensor_types: dict = field(default_factory=dict)
    first_difference: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{self.kind.upper()}: {verdict} on {self.prompts} prompts: tokenization "
                f"{'identical' if self.tokens_equal else 'DIFFERENT'}, greedy answers equal on "
                f"{self.greedy_equal}/{self.prompts}, top-1 agreement {self.top1_agreement:.2%} over "
                f"{self.positions} positions, max |Δlogit| {self.max_abs_logit_diff:.4f}")


def check_gguf(model_dir: str | Path, gguf_path: str | Path, kind: str, prompts: list[str],
               max_new_tokens: int = 24, progress: Callable[[float, str], None] | None = None) -> GGUFCheck:
    """The GGUF in llama.cpp against the merged model in transformers (float32, CPU), prompt by prompt."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc = llama_cpp()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the reference in float32 wherever it fits fastest
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map=device).eval()
    n_ctx = max(64, min(4096, max(len(tok(p)["input_ids"]) for p in prompts) + max_new_tokens + 8))
    llm = lc.Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=_threads(), verbose=False,
                   seed=0)
    eos = tok.eos_token_id
    tokens_equal, greedy_equal, agree, positions = True, 0, 0, 0
    max_diff, sum_diff, n_diff, first = 0.0, 0.0, 0, ""
    try:
        for i, prompt in enumerate(prompts):
            ids = tok(prompt)["input_ids"]
            ll_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if ll_ids != ids:
                tokens_equal = False
                first = first or f"prompt {i}: llama.cpp tokens {ll_ids[:12]}… vs transformers {ids[:12]}…"
            with torch.no_grad():
                hf_out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            ll_out = _greedy(llm, ids, max_new_tokens, eos)
            if ll_out == hf_out:
                greedy_equal += 1
            elif not first:
                first = (f"prompt {i}: llama.cpp {tok.decode(ll_out)!r} vs transformers {tok.decode(hf_out)!r}")
            seq = ids + hf_out
            with torch.no_grad():
                ref = model(torch.tensor([seq], device=device)).logits[0].float().cpu().numpy()
            llm.reset()
            llm.eval(seq)
            got = np.asarray(llm.scores[: len(seq)], dtype=np.float32)[:, : ref.shape[1]]
            d = np.abs(got - ref)
            max_diff = max(max_diff, float(d.max()))
            sum_diff += float(d.sum())
            n_diff += d.size
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            positions += len(seq)
            if progress:
                progress((i + 1) / len(prompts), f"checking prompt {i + 1}/{len(prompts)}")
    finally:
        llm.close() if hasattr(llm, "close") else None
    bar = BARS[kind]
    top1 = agree / max(positions, 1)
    passed = tokens_equal and top1 >= bar["top1_agreement"]
    if "max_abs_logit_diff" in bar:
        passed = passed and max_diff <= bar["max_abs_logit_diff"]
    if bar.get("greedy_equal"):
        passed = passed and greedy_equal == len(prompts)
    return GGUFCheck(kind=kind, prompts=len(prompts), tokens_equal=tokens_equal, greedy_equal=greedy_equal,
                     max_abs_logit_diff=round(max_diff, 6), mean_abs_logit_diff=round(sum_diff / max(n_diff, 1), 6),
                     top1_agreement=round(top1, 6), positions=positions, bar=bar, passed=bool(passed),
                     tensor_types=tensor_types(gguf_path), first_difference=first)


def _greedy(llm, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding in llama.cpp: argmax of the last position's logits, fed back one token at a time."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


# ---- templates: the studio's prompt as llama.cpp (Jinja) and Ollama (Go) templates -----------------------------
_SYS, _USR = "\x00SYSTEM\x00", "\x00PROMPT\x00"


@dataclass
class PromptShape:
    """The studio's prompt as fixed text around the system message and the user's text."""
    with_system: tuple[str, str, str] | None   # (before system, between system and prompt, after prompt)
    without_system: tuple[str, str]            # (before prompt, after prompt)


def prompt_shape(render: Callable[[str, str], str]) -> PromptShape:
    """Split ``render(text, system)`` (the studio's own prompt renderer) at sentinel values."""
    plain = render(_USR, "")
    if plain.count(_USR) != 1:
        raise GGUFError("the template does not hold the user's text exactly once; it cannot become an Ollama "
                        "template.")
    without = tuple(plain.split(_USR))
    with_sys = None
    try:
        full = render(_USR, _SYS)
    except Exception:  # noqa: BLE001 - a chat template that refuses system messages
        full = plain
    if _SYS in full:
        a, rest = full.split(_SYS, 1)
        if rest.count(_USR) == 1 and _SYS not in rest:
            b, c = rest.split(_USR)
            with_sys = (a, b, c)
        else:
            raise GGUFError("the template places the system message after the user's text; it cannot become an "
                            "Ollama template.")
    return PromptShape(with_sys, without)  # type: ignore[arg-type]


def _go(s: str) -> str:
    """Text for a Go template: only ``{{`` needs escaping (as a string action)."""
    return s.replace("{{", '{{ "{{" }}')


def ollama_template(shape: PromptShape) -> str:
    a0, c0 = shape.without_system
    if shape.with_system is None:
        return f"{_go(a0)}{{{{ .Prompt }}}}{_go(c0)}"
    a, b, c = shape.with_system
    if c != c0:
        raise GGUFError("the text after the prompt depends on the system message; no Ollama template renders both.")
    return (f"{{{{ if .System }}}}{_go(a)}{{{{ .System }}}}{_go(b)}{{{{ else }}}}{_go(a0)}{{{{ end }}}}"
            f"{{{{ .Prompt }}}}{_go(c)}")


def _jinja_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Jinja string literal


def jinja_template(shape: PromptShape) -> str:
    """A chat template (Jinja, as llama.cpp and transformers read it) for a single-turn studio template: the
    system message (if any) and the last user message, rendered as the studio renders them.  Only constructs the
    common chat templates use (a namespace, a loop, if/else), so llama.cpp's own Jinja engine reads it too."""
    a0, c0 = shape.without_system
    head = ("{%- set ns = namespace(system='', user='') -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
            "{%- elif m['role'] == 'user' -%}{%- set ns.user = m['content'] -%}{%- endif -%}"
            "{%- endfor -%}")
    if shape.with_system is None:
        return head + "{{ " + _jinja_str(a0) + " }}{{ ns.user }}{{ " + _jinja_str(c0) + " }}"
    a, b, c = shape.with_system
    return (head + "{%- if ns.system -%}{{ " + _jinja_str(a) + " }}{{ ns.system }}{{ " + _jinja_str(b) + " }}"
            "{%- else -%}{{ " + _jinja_str(a0) + " }}{%- endif -%}{{ ns.user }}{{ " + _jinja_str(c) + " }}")


def modelfile(gguf_name: str, template: str, stops: list[str], num_ctx: int, name: str = "Modelfile",
              system: str = "") -> str:
    if '"""' in template or '"""' in system:
        raise GGUFError('the template holds """, which ends a Modelfile string; Ollama could not read it.')
    lines = ["# Ollama Modelfile written by QLoRA Studio.  Create the model with:",
             f"#   ollama create <name> -f {name}",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"

