"""Export (MiniMind .pth, Hugging Face folder, safetensors) and `--init-from` import.

The Hugging Face tests run when `transformers` is importable (it is in the test extra): what
`from_pretrained` loads must compute what mmnb computes.
"""

from __future__ import annotations

import json

import pytest
import torch

import mmnb as api
from conftest import MICRO
from mmnb.cli import main
from mmnb.config import resolve
from mmnb.export import export
from mmnb.model import MiniMind
from mmnb.store import Store

PRESETS = ["tiny", "minimind2-small", "minimind2", "minimind3", "minimind2-moe", "minimind3-moe"]
ARCH = {
    "tiny": "LlamaForCausalLM",
    "minimind2-small": "LlamaForCausalLM",
    "minimind2": "LlamaForCausalLM",
    "minimind3": "Qwen3ForCausalLM",
    "minimind2-moe": "Qwen2MoeForCausalLM",
    "minimind3-moe": "Qwen3MoeForCausalLM",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_corpus) -> Store:
    """One briefly trained micro-sized run per preset family."""
    store = Store(tmp_path_factory.mktemp("export") / "store")
    for preset in PRESETS:
        options = dict(MICRO, preset=preset, layers=2, data=str(small_corpus), max_steps=6)
        api.train(preset, store=store, **options)
    return store


def weights_at(store: Store, name: str, step: int = 0) -> dict[str, torch.Tensor]:
    return store.run(name).load(step, groups=("model",))["model"]


@pytest.mark.parametrize("preset", PRESETS)
def test_hf_export_computes_what_mmnb_computes(store, tmp_path, preset, record_property):
    transformers = pytest.importorskip("transformers")
    run = store.run(preset)
    done = export(run, format="hf", out=tmp_path / "hf")
    assert done.architecture == ARCH[preset] and done.step == 6
    files = {p.name for p in done.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    theirs = transformers.AutoModelForCausalLM.from_pretrained(done.path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(done.path)
    assert type(theirs).__name__ == ARCH[preset]
    assert theirs.dtype == torch.float32

    ours, our_tok = api.load_model(run)
    text = "Mira has a cat called Pip."
    assert tok(text).input_ids == our_tok.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == our_tok.apply_chat_template(messages, add_generation_prompt=True)
    x = torch.tensor([our_tok.encode(text)] * 2)
    with torch.no_grad():
        diff = (ours(x).logits - theirs(x).logits).abs().max().item()
    record_property("max_abs_diff_fp32", diff)
    assert diff <= 1e-5, f"{preset}: max abs diff {diff}"
    mine = ours.generate(x[:1], 20)
    hf_ids = theirs.generate(x[:1], max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert torch.equal(mine, hf_ids)


def test_minimind_export_is_laid_out_as_minimind_saves(store, tmp_path):
    run = store.run("minimind3")
    half = export(run, format="minimind", out=tmp_path / "m.pth")
    sd = torch.load(half.path, weights_only=True)
    cfg, _ = resolve(**{"preset": "minimind3", **_sizes(run)})
    assert list(sd) == list(MiniMind(cfg).state_dict())  # every key, lm_head included, in order
    assert {t.dtype for t in sd.values()} == {torch.float16}  # MiniMind saves v.half()
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    want = weights_at(store, "minimind3", 6)
    assert all(torch.equal(sd[k], want[k].half()) for k in sd)
    bf = export(run, format="minimind", out=tmp_path / "b.pth", dtype="bf16")
    assert {t.dtype for t in torch.load(bf.path, weights_only=True).values()} == {torch.bfloat16}


def _sizes(run) -> dict:
    m = run.config_dict()["model"]
    return {
        "hidden_size": m["hidden_size"],
        "layers": m["num_hidden_layers"],
        "heads": m["num_attention_heads"],
        "kv_heads": m["num_key_value_heads"],
        "intermediate_size": m["intermediate_size"],
        "vocab_size": m["vocab_size"],
    }


@pytest.mark.parametrize("fmt", ["minimind", "safetensors", "hf", "run"])
def test_export_then_init_from_gives_identical_weights(store, tmp_path, micro, fmt):
    src = "minimind3-moe"
    if fmt == "run":
        target = f"{src}@6"
    else:
        target = str(export(store.run(src), format=fmt, out=tmp_path / "x", dtype="fp32").path)
    name = f"from-{fmt}"
    tok = None
    if fmt == "minimind":  # a .pth carries no tokenizer (nor config: it is inferred)
        tok = tmp_path / "tokenizer.json"
        tok.write_text(store.run(src).tokenizer_json(), encoding="utf-8")
    api.train(
        name,
        store=store,
        init_from=target,
        tokenizer=tok and str(tok),
        data=micro["data"],
        max_seq_len=32,
        batch_size=4,
        start=False,
    )
    new = store.run(name)
    want, got = weights_at(store, src, 6), weights_at(store, name, 0)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert new.config_dict()["model"] == store.run(src).config_dict()["model"]
    lineage = new.info()["lineage"]["init_from"]
    assert lineage["format"] == fmt
    if fmt == "run":
        assert (lineage["run"], lineage["step"]) == (src, 6) and len(lineage["digest"]) == 32
    else:
        assert len(json.dumps(lineage.get("sha256"))) > 64  # the file's SHA-256 is recorded


def test_init_from_a_half_precision_minimind_pth(store, tmp_path, micro):
    path = export(store.run("minimind2"), format="minimind", out=tmp_path / "m.pth").path
    tok = tmp_path / "tokenizer.json"
    tok.write_text(store.run("minimind2").tokenizer_json(), encoding="utf-8")
    events = []
    run = api.train(
        store=store,
        init_from=str(path),
        tokenizer=str(tok),
        data=micro["data"],
        max_seq_len=32,
        batch_size=4,
        max_steps=2,
        listeners=[events.append],
    )
    want = weights_at(store, "minimind2", 6)
    got = weights_at(store, run.name, 0)
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)
    assert got["model.embed_tokens.weight"].dtype == torch.float32  # fp32 master weights
    assert run.config_dict()["train"]["preset"] == "minimind2"  # the generation, from the shapes
    # A .pth without qk-norm does not say its head count (this one has 2): MiniMind2's 8 is
    # assumed, and the notice says so and how to correct it.
    notes = [e.info["text"] for e in events if e.kind == "notice"]
    assert any("head count" in n and "assumed 8" in n and "--heads" in n for n in notes)
    assert run.config_dict()["model"]["num_attention_heads"] == 8
    assert run.latest().step == 2


def test_bad_weights_are_one_line_and_leave_the_store_unchanged(store, tmp_path, capsys):
    good = torch.load(
        export(store.run("tiny"), format="minimind", out=tmp_path / "g.pth").path,
        weights_only=True,
    )
    tok = tmp_path / "tokenizer.json"
    tok.write_text(store.run("tiny").tokenizer_json(), encoding="utf-8")
    k = "model.layers.0.self_attn.k_proj.weight"

    class Payload:
        def __reduce__(self):
            return (print, ("never runs",))

    cases = {
        "shape": ({**good, k: torch.zeros(5, 32)}, f"{k} has shape (5, 32); the config expects"),
        "missing": (
            {n: t for n, t in good.items() if "up_proj" not in n},
            "missing key model.layers.0.mlp.up_proj.weight",
        ),
        "object": ({**good, "extra": Payload()}, "refused by torch.load(weights_only=True)"),
        "not-a-dict": ([1, 2], "not a state dict"),
    }
    before = sorted(p.name for p in store.path.iterdir())
    for label, (obj, message) in cases.items():
        path = tmp_path / f"{label}.pth"
        torch.save(obj, path)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            api.train(f"bad-{label}", store=store, init_from=str(path), tokenizer=str(tok))
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(300, 32\); the config"):
        api.train(
            store=store, init_from=str(tmp_path / "g.pth"), tokenizer=str(tok), hidden_size=64
        )
    assert sorted(p.name for p in store.path.iterdir()) == before
    # On the command line: one line, exit status 2, nothing created, the payload never run.
    code = main(["train", "--init-from", str(tmp_path / "object.pth"), "--store",
                 str(store.path), "--tokenizer", str(tok)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "weights_only=True" in err
    assert "never runs" not in out + err
    assert sorted(p.name for p in store.path.iterdir()) == before


def test_export_cli_and_refusals(store, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    args = ["--format", "safetensors", "--out", str(out), "--store", str(store.path)]
    assert main(["export", "tiny@6", *args]) == 0
    assert "exported tiny@6 as safetensors" in capsys.readouterr().out and out.is_file()
    assert main(["export", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and err.count("\n") == 1
    from mmnb import cli_export
    from mmnb import export as engine

    assert cli_export.FORMATS == engine.FORMATS and cli_export.DTYPES == tuple(engine.DTYPES)
    with pytest.raises(ValueError, match="format must be one of"):
        export(store.run("tiny"), format="onnx", out=tmp_path / "x")
    with pytest.raises(api.StoreError, match="no checkpoint at step 99"):
        export(store.run("tiny"), 99, format="hf", out=tmp_path / "y")


def test_transformers5_fused_moe_folder_imports(store, tmp_path, micro):
    # transformers 5 saves MoE experts fused ([E, 2I, C] gate_up_proj); import unfuses them.
    transformers = pytest.importorskip("transformers")
    done = export(store.run("minimind3-moe"), format="hf", out=tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(done.path)
    model.save_pretrained(tmp_path / "resaved")
    (tmp_path / "resaved" / "tokenizer.json").write_text(
        store.run("minimind3-moe").tokenizer_json()
    )
    api.train("resaved", store=store, init_from=str(tmp_path / "resaved"), data=micro["data"],
              max_seq_len=32, batch_size=4, start=False)  # fmt: skip
    want, got = weights_at(store, "minimind3-moe", 6), weights_at(store, "resaved", 0)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_browser_export_button_writes_the_selected_checkpoint(store, tmp_path, monkeypatch):
    from mmnb.widgets import Browser

    monkeypatch.chdir(tmp_path)
    b = Browser(store)
    b.select("minimind3", 0)
    tab = b.exporter
    assert tab.button.description == "Export step 0"
    tab.button.click()
    folder = tmp_path / "minimind3-0-hf"
    assert (folder / "config.json").is_file() and "Qwen3ForCausalLM" in b.log.text()
    tab.format.value, tab.out.value = "minimind", "m.pth"
    tab.button.click()
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert torch.equal(
        sd["model.norm.weight"], weights_at(store, "minimind3", 0)["model.norm.weight"].half()
    )
    tab.button.click()  # the target exists now: refused, in one line in the log
    assert "m.pth exists" in b.log.text()
    b.close()


@pytest.fixture
def own_run(tmp_path, micro):
    """A run of its own (these tests damage its checkpoint), and its step-2 checkpoint file."""
    store = Store(tmp_path / "store")
    api.train("own", store=store, **dict(micro, max_steps=2))
    run = store.run("own")
    return store, run, run.checkpoint_path(run.step_info(2))


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "store")


def _writeback_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "mmnb-writeback"]


def _flip_byte(path, dataset: str, at: int) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        offset = f["model"][dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("fmt", ["hf", "safetensors", "minimind"])
def test_a_flipped_byte_fails_the_export_in_one_line_and_leaves_nothing(
    own_run, tmp_path, capsys, monkeypatch, fmt
):
    from mmnb.store import streamed

    # Chunks of 64 bytes: the flipped byte is in a later chunk of a tensor in the middle, so
    # the tensors before it and its first chunks have been written when the mismatch shows.
    monkeypatch.setattr(streamed, "CHUNK", 64)
    store, run, ckpt = own_run
    name = "model.layers.0.mlp.up_proj.weight"
    _flip_byte(ckpt, name, 200)
    out = tmp_path / "out"
    code = main(["export", "own", "--format", fmt, "--out", str(out), "--store", str(store.path)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1
    assert str(ckpt) in captured.err and f"checksum mismatch in {name}" in captured.err
    assert _leftovers(tmp_path) == []  # neither --out nor a temporary folder or file


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_an_export_that_fails_midway_leaves_no_partial_output(own_run, tmp_path, monkeypatch, fmt):
    from mmnb import safetensors_format as sf
    from mmnb.store import streamed

    monkeypatch.setattr(streamed, "CHUNK", 64)
    monkeypatch.setattr(sf, "WRITEBACK", 256)  # the writeback thread runs, and is stopped
    store, run, _ = own_run
    real, calls = sf._Output.write, []

    def write_then_fail(self, data):
        calls.append(len(data))
        if len(calls) == 20:  # well inside the weights
            raise failure
        real(self, data)

    monkeypatch.setattr(sf._Output, "write", write_then_fail)
    out = tmp_path / "out"
    failure = KeyboardInterrupt()  # Kernel → Interrupt, or Ctrl-C on the command line
    with pytest.raises(KeyboardInterrupt):
        export(run, format=fmt, out=out)
    assert _leftovers(tmp_path) == [] and not _writeback_threads()
    failure, calls[:] = OSError(28, "No space left on device"), []  # a full disk: one line
    with pytest.raises(ValueError, match=r"^could not write .*out: disk full$"):
        export(run, format=fmt, out=out)
    assert _leftovers(tmp_path) == [] and not _writeback_threads()
    monkeypatch.setattr(sf._Output, "write", real)  # and then it works, chunk by chunk
    assert export(run, format=fmt, out=out).path == out


def test_a_killed_export_never_leaves_a_partial_folder_under_its_name(own_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    store, run, _ = own_run
    out = tmp_path / "out"
    # SIGKILL in the middle of the weights: no handler runs, so only the rename can protect.
    script = (
        "import os, signal, sys\n"
        "from mmnb import safetensors_format as sf\n"
        "from mmnb.store import streamed\n"
        "streamed.CHUNK = 64\n"
        "real, n = sf._Output.write, [0]\n"
        "def write(self, data):\n"
        "    n[0] += 1\n"
        "    if n[0] == 20:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(self, data)\n"
        "sf._Output.write = write\n"
        "from mmnb.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "export", "own", "--out", str(out), "--store",
         str(store.path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, capture_output=True,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL
    assert not out.exists()
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".tmp")
    assert export(run, format="hf", out=out).path == out  # the leftover is in no one's way


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_streamed_export_converts_chunk_by_chunk_exactly(own_run, tmp_path, monkeypatch, dtype):
    from mmnb import safetensors_format as sf
    from mmnb.export import DTYPES
    from mmnb.store import streamed

    monkeypatch.setattr(streamed, "CHUNK", 68)  # 17 fp32 values: pieces end mid-row
    store, run, _ = own_run
    done = export(run, format="safetensors", out=tmp_path / "x", dtype=dtype)
    got, _ = sf.read(done.path)
    want = weights_at(store, "own", 2)
    assert set(got) == set(want) - {"lm_head.weight"}
    assert all(torch.equal(got[k], want[k].to(DTYPES[dtype])) for k in got)
