"""GGUF export proven in llama.cpp: a tiny-demo run is exported as F16, Q8_0 and Q4_K_M, each file is loaded in
llama.cpp (llama-cpp-python) and compared with the merged model on the run's own prompts; the Modelfile's template
is rendered by Go's text/template (Ollama's engine) and must equal the studio's prompt.

The bars (``studio.gguf_export.BARS``) were stated before measuring: F16 max |Δlogit| <= 0.05, every greedy answer
the same tokens, top-1 agreement 100%; Q8_0 top-1 agreement >= 98%; Q4_K_M >= 90%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from studio import export
from studio import gguf_export as gx
from studio.data.templates import TemplateSpec, render_prompt
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe

GO_RENDERER = Path(__file__).parent / "go" / "render_template.go"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One short tiny-demo run, evaluated, then exported as every GGUF type (each checked in llama.cpp)."""
    home = tmp_path_factory.mktemp("gguf_home")
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(home)
    try:
        cfg = load_preset("tiny-demo").replace({"train.max_steps": 12, "train.sample_prompts": 0,
                                                 "train.logging_steps": 2})
        run = RunStore().create(cfg)
        assert Recipe(run).execute() == "completed", run.last_status()
        from studio.evaluate import evaluate_run

        evaluate_run(run, limit=4, max_new_tokens=16)
        seen: list[tuple[float, str]] = []
        results = {k: export.export_gguf(run, k, progress=lambda f, d: seen.append((f, d))) for k in gx.KINDS}
        yield dict(run=run, results=results, progress=seen, home=home)
    finally:
        if old is None:
            os.environ.pop("STUDIO_HOME", None)
        else:
            os.environ["STUDIO_HOME"] = old


def test_each_gguf_type_loads_in_llama_cpp_and_behaves_like_the_merged_model(exported):
    res = exported["results"]
    for kind, r in res.items():
        c = r.check
        assert r.path.exists() and r.path.name == f"{exported['run'].id}-{kind}.gguf"
        assert c["passed"], (kind, c)
        assert c["tokens_equal"] and c["prompts"] == 4 and c["positions"] > 4 * 20, c
        assert c["bar"] == gx.BARS[kind]
    f16, q8, q4 = (res[k].check for k in gx.KINDS)
    assert f16["max_abs_logit_diff"] <= 0.05 and f16["greedy_equal"] == f16["prompts"] and f16["top1_agreement"] == 1
    assert q8["top1_agreement"] >= 0.98
    assert q4["top1_agreement"] >= 0.90
    # What each file holds, read back with gguf's reader: norms stay F32 everywhere.
    assert f16["tensor_types"] == {"F16": 16, "F32": 5}
    assert q8["tensor_types"] == {"F32": 5, "Q8_0": 16}
    # Q4_K_M comes from llama.cpp's quantizer: K-quants where rows fit its 256-wide blocks (ffn_down), llama.cpp's
    # own fallback for the 128-wide rows of this tiny model.
    assert "F16" not in q4["tensor_types"] and ({"Q4_K", "Q6_K"} & set(q4["tensor_types"])), q4["tensor_types"]
    assert res["q4_k_m"].path.stat().st_size < res["q8_0"].path.stat().st_size < res["f16"].path.stat().st_size
    # Progress went forward and ended at 1.
    fr = [f for f, _ in exported["progress"]]
    assert fr[-1] == 1.0 and any("llama.cpp" in d for _, d in exported["progress"])


def test_llama_cpp_tokenizes_exactly_as_the_model_tokenizer(exported):
    """The run's prompts, special tokens inside text, digits, emoji, CJK and odd whitespace: same ids."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    run = exported["run"]
    tok = AutoTokenizer.from_pretrained(str(run.dir / "merged"))
    texts = export.run_prompts(run, tok, 24) + [
        "Hello world", " leading space", "tabs\tand\n\nnewlines  \n ", "ROI of $7,500 -> 160%? 3.14159 123456789",
        "emoji 🚀🦙 and 日本語 text", "I've been 'told' he's there", "ends with </s> and <|user|>\nrole</s>",
        "<s>### Instruction:\nx\n\n### Response:\n", "",
    ]
    llm = Llama(model_path=str(exported["results"]["f16"].path), n_ctx=256, verbose=False)
    for t in texts:
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == tok(t)["input_ids"], t
    # Decoding back: llama.cpp's detokenizer gives the same text.
    ids = tok("Calculate the ROI 🚀 for $7,500.")["input_ids"]
    assert llm.detokenize(ids[1:]).decode() == tok.decode(ids[1:])


def test_gguf_metadata_holds_tokenizer_and_the_runs_template(exported):
    from gguf import GGUFReader

    run = exported["run"]
    r = GGUFReader(str(exported["results"]["q8_0"].path))
    f = {k: v.contents() for k, v in r.fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                     "tokenizer.ggml.token_type")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 3)
    assert f["tokenizer.ggml.add_bos_token"] is True
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[:7] == [3] * 7 and set(types[7:]) == {1}  # <unk> <s> </s> <pad> and the role markers: CONTROL
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 1000
    # The chat template in the file renders the run's prompt exactly (rendered as transformers renders Jinja).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.dir / "merged"))
    spec = TemplateSpec.from_config(run.config().data)
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(exported["results"]["q8_0"].path), n_ctx=128, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == f["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for system, text in (("", "What is ROI?"), ("You are terse.", "Define APR.\nBriefly.")):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        got = tok.apply_chat_template(msgs, chat_template=f["tokenizer.chat_template"], tokenize=False,
                                      add_generation_prompt=True)
        assert got == render_prompt(text, spec, tok, system=system)
        # And as llama-cpp-python's chat completion formats it, from the template llama.cpp read out of the file.
        assert formatter(messages=msgs).prompt == got


def _go_render(template: str, system: str, prompt: str) -> str:
    go = shutil.which("go")
    assert go, "Go is needed to render Ollama templates (make test installs golang-go)"
    out = subprocess.run([go, "run", str(GO_RENDERER)], input=json.dumps({"template": template, "system": system,
                                                                          "prompt": prompt}),
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout


def _modelfile_template(text: str) -> str:
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""', start)]


def test_modelfile_names_the_file_its_template_and_stop_tokens(exported):
    run, r = exported["run"], exported["results"]["q4_k_m"]
    text = r.modelfile.read_text()
    assert r.modelfile == r.path.with_suffix(".Modelfile") and f"FROM ./{r.path.name}\n" in text
    assert 'PARAMETER stop "</s>"' in text and "PARAMETER num_ctx 512" in text
    assert r.ollama_create.startswith(f"ollama create {run.id}") and r.ollama_create.endswith(f"-f {r.modelfile}")
    spec = TemplateSpec.from_config(run.config().data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.dir / "merged"))
    template = _modelfile_template(text)
    for system, prompt in (("", "What is ROI?"), ("Answer in one sentence.", "Define {{APR}} \"now\".")):
        assert _go_render(template, system, prompt) == render_prompt(prompt, spec, tok, system=system)


@pytest.mark.parametrize("spec", [
    TemplateSpec("alpaca"), TemplateSpec("qa"), TemplateSpec("chat"),
    TemplateSpec("custom", "<<{system}>> Q: {instruction} {{literal}}\nA:", " {response}"),
    TemplateSpec("custom", "Q: {instruction}\nA:", " {response}"),
], ids=["alpaca", "qa", "chat", "custom-system", "custom-no-system"])
def test_every_studio_template_becomes_an_ollama_and_a_jinja_template(spec, tiny_tokenizer):
    chat, go_template, stops = export.templates(spec, tiny_tokenizer)
    assert stops[0] == "</s>" and (("### End" in stops) == (spec.name == "qa"))
    for system, prompt in (("", "What is ROI?"), ("Be brief.", "Two\nlines {x}")):
        want = render_prompt(prompt, spec, tiny_tokenizer, system=system)
        assert _go_render(go_template, system, prompt) == want, go_template
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        assert tiny_tokenizer.apply_chat_template(msgs, chat_template=chat, tokenize=False,
                                                  add_generation_prompt=True) == want


def test_other_architectures_are_refused_with_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(gx.GGUFError, match="Llama/Mistral architecture.*Qwen2ForCausalLM"):
        gx.write_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(gx.GGUFError, match="plain RoPE.*llama3"):
        gx.check_supported(tmp_path)


def test_the_gguf_card_reports_the_checks_and_how_to_run_it(exported):
    run, r = exported["run"], exported["results"]
    card = r["q8_0"].card.read_text()
    assert r["q8_0"].card == r["q8_0"].path.parent / "README.md" and (r["q8_0"].path.parent / "loss_curve.png").exists()
    assert card.startswith("---\n") and "library_name: gguf" in card
    for kind in gx.KINDS:
        c = json.loads((r[kind].path.parent / f"{run.id}-{kind}.check.json").read_text())
        assert c["passed"] and c["file"] == r[kind].path.name
        row = next(line for line in card.splitlines() if line.startswith(f"| {kind.upper()} |"))
        assert f"{c['top1_agreement']:.2%}" in row and f"{c['max_abs_logit_diff']:.4f}" in row and "passed" in row
    assert f"ollama create {run.id} -f {run.id}-" in card and ".Modelfile" in card and "llama-cli -m" in card
    events = [e for e in run.all_events() if e["type"] == "gguf_check"]
    assert [e["kind"] for e in events][:3] == list(gx.KINDS) and all(e["passed"] for e in events)


def test_cli_exports_gguf_with_progress(exported, capsys, monkeypatch):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(exported["home"]))
    run = exported["run"]
    assert main(["export", "--run", run.id, "--gguf", "q8_0"]) == 0
    out = capsys.readouterr()
    assert f"{run.id}-q8_0.gguf" in out.out and "Q8_0: passed" in out.out and "ollama create" in out.out
    assert "GGUF q8_0" in out.err and "100%" in out.err  # tqdm's bar
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", "--run", run.id, "--gguf", "q5_1"])
    assert "invalid choice: 'q5_1'" in capsys.readouterr().err


def test_export_tab_offers_the_gguf_and_merged_model_as_downloads(exported, monkeypatch, tmp_path):
    """As a browser's API client asks: the served Export tab's /gguf and /merge endpoints hand back the files."""
    import hashlib
    import socket
    import zipfile

    import gradio as gr
    from gradio_client import Client

    from studio.paths import runs_root
    from studio.ui import export as tab
    from studio.ui.context import UIContext

    monkeypatch.setenv("STUDIO_HOME", str(exported["home"]))
    run = exported["run"]
    files, status = tab.gguf(RunStore(), None, "f16")
    assert files is None and "Could not export GGUF" in status
    with gr.Blocks() as demo:
        tab.build(UIContext())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # As app.py serves it: only the runs root is allowed for files.
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(runs_root())])
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path))
        files, status = client.predict(run.id, "f16", api_name="/gguf")
        names = [Path(f).name for f in files]
        assert names == [f"{run.id}-f16.gguf", f"{run.id}-f16.Modelfile", "README.md"], names
        assert "F16 written" in status and "**passed**" in status and "ollama create" in status
        assert "tokenization identical to transformers | yes" in status and "top-1 agreement" in status
        served = hashlib.sha256(Path(files[0]).read_bytes()).hexdigest()
        assert served == hashlib.sha256(exported["results"]["f16"].path.read_bytes()).hexdigest()
        status, code, merged = client.predict(run.id, api_name="/merge")
        assert "Merged 16-bit model saved" in status and "AutoModelForCausalLM" in code
        inside = zipfile.ZipFile(merged).namelist()
        assert f"{run.id}-merged/model.safetensors" in inside and f"{run.id}-merged/README.md" in inside
    finally:
        demo.close()
