"""Byte-level BPE tokenizer, MiniMind style: a thin wrapper over Hugging Face `tokenizers`.

Any byte sequence round-trips (the byte-level alphabet covers all 256 bytes), and the three
special tokens sit at fixed ids: `<|endoftext|>`=0 (padding), `<|im_start|>`=1 (begin of a
message), `<|im_end|>`=2 (end of a message / document). MiniMind's own tokenizer.json uses the
same three, so it loads here unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
ROLES = ("system", "user", "assistant")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """ChatML as MiniMind writes it: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    It needs no vocabulary, so data code can render conversations before a tokenizer exists.
    """
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(
                f"message {i}: unknown role {role!r} (expected system, user, assistant)"
            )
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        parts.append(f"{BOS_TOKEN}{role}\n{content}{EOS_TOKEN}\n")
    if add_generation_prompt:
        parts.append(f"{BOS_TOKEN}assistant\n")
    return "".join(parts)


class Tokenizer:
    """A byte-level BPE tokenizer with MiniMind's special tokens and chat template."""

    def __init__(self, backend: _HFTokenizer) -> None:
        self._tk = backend
        # Looked up once: a tokenizer without them cannot train or chat here.
        self._special = {token: self._require(token) for token in SPECIAL_TOKENS}

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
        """Train BPE on `texts`. The result has at most `vocab_size` tokens (exactly that many
        unless the texts are too small to find enough merges) and is deterministic: the same
        texts in the same order give the same tokenizer in any process."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
        tk = _HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Load from the text of a tokenizer.json."""
        return cls(_parse(text, "tokenizer JSON"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer.json (ours or MiniMind's)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from None
        return cls(_parse(text, str(path)))

    def to_json(self) -> str:
        return self._tk.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    # ---- encoding ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Nothing is added; special-token strings in it map to their ids."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel inside the library."""
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use.
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, numpy array or tensor of ints)."""
        tolist = getattr(ids, "tolist", None)
        seq = tolist() if callable(tolist) else [int(i) for i in ids]
        return self._tk.decode(seq, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """ChatML text of `messages` (see `render_chat`); encode it with `encode`."""
        return render_chat(messages, add_generation_prompt)

    # ---- properties --------------------------------------------------------------------------

    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`, for features this wrapper does not expose."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding rows must cover it)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._special[PAD_TOKEN]

    @property
    def bos_id(self) -> int:
        return self._special[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._special[EOS_TOKEN]

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer JSON: equal fingerprints encode every text identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    def _require(self, token: str) -> int:
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id


def _parse(text: str, source: str) -> _HFTokenizer:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON (line {e.lineno}: {e.msg})") from None
    try:
        return _HFTokenizer.from_str(text)
    except Exception as e:  # the library raises plain Exception for a malformed tokenizer
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{source}: not a tokenizer.json ({first_line})") from None


__all__ = ["Tokenizer", "render_chat", "SPECIAL_TOKENS", "ROLES"]
