"""Byte-level BPE: special ids, exact round trips, deterministic training, loading, chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from mmnb.corpus import generate_pretrain
from mmnb.tokenizer import Tokenizer, render_chat

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(generate_pretrain(num_docs=300), vocab_size=512)


def test_special_token_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]


def test_trained_vocab_size_is_the_request(tok):
    assert tok.vocab_size == 512
    assert len(tok.backend.get_vocab()) == 512


@pytest.mark.parametrize(
    "text",
    [
        "Mira walked to the market.",
        "  leading spaces, trailing   ",
        "tabs\tand\n\nnewlines\r\n and   runs     of spaces",
        "Café, naïve, Straße, Ångström",
        "emoji 🐱🌧️ and 👩‍👩‍👧 families",
        "中文字符和日本語のテキスト, 한국어",
        "",
        " ",
        "\u2028\u0000\x7f odd control characters",
    ],
)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_in_text_are_recognised(tok):
    assert tok.encode("<|endoftext|>") == [0]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    # nothing is added automatically
    assert 1 not in tok.encode("plain text") and 2 not in tok.encode("plain text")


def test_encode_batch_equals_encode(tok):
    texts = ["one", "Mira and Tobin", "", "<|im_start|>x<|im_end|>", "çé 🐱"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_arrays_and_tensors(tok):
    ids = tok.encode("Pip the cat")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "Pip the cat"


def test_save_from_file_and_from_json_give_the_same_tokenizer(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.to_json() == tok.to_json()
    assert loaded.fingerprint == tok.fingerprint == Tokenizer.from_json(tok.to_json()).fingerprint
    assert len(tok.fingerprint) == 64
    text = "Snow had fallen in the night. 🐑"
    assert loaded.encode(text) == tok.encode(text)


def test_training_is_deterministic_across_fresh_processes():
    code = (
        "import hashlib\n"
        "from mmnb.corpus import generate_pretrain\n"
        "from mmnb.tokenizer import Tokenizer\n"
        "t = Tokenizer.train(generate_pretrain(seed=3, num_docs=400), vocab_size=700)\n"
        "print(hashlib.sha256(t.to_json().encode()).hexdigest())\n"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert len(outs[0].strip()) == 64
    assert outs[0] == outs[1]
    assert outs[0].strip() == Tokenizer.train(generate_pretrain(3, 400), 700).fingerprint


def test_from_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=r"tokenizer file not found: .*nope\.json$"):
        Tokenizer.from_file(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON \(line 1"):
        Tokenizer.from_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong\.json: not a tokenizer\.json") as err:
        Tokenizer.from_file(wrong)
    assert "\n" not in str(err.value)


def test_a_tokenizer_without_special_tokens_is_refused():
    bare = HFTokenizer(models.BPE())
    with pytest.raises(ValueError, match=r"tokenizer has no <\|endoftext\|> token"):
        Tokenizer(bare)
    with pytest.raises(ValueError, match="tokenizer has no"):
        Tokenizer.from_json(bare.to_str())


def test_vocab_size_below_the_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_chat_template_is_chatml(tok):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
    ]
    expected = (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\n3 plus 4 is 7.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages) == expected == render_chat(messages)
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt == expected[: expected.index("3 plus 4 is 7.")]
    assert tok.decode(tok.encode(expected)) == expected


def test_chat_template_rejects_unknown_roles(tok):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tok.apply_chat_template([{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": None}])
