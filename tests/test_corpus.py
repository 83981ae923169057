"""The bundled corpus: reproducible from code, sized and varied as intended, well-formed chats."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from mmnb import corpus


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus.generate_pretrain()


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return corpus.generate_chat()


def test_bundled_files_are_regenerated_byte_for_byte(tmp_path, docs, chats):
    assert (
        corpus.PRETRAIN_PATH.read_bytes() == corpus.to_jsonl([{"text": d} for d in docs]).encode()
    )
    assert corpus.CHAT_PATH.read_bytes() == corpus.to_jsonl(chats).encode()
    corpus.write_assets(tmp_path)
    assert (tmp_path / "pretrain.jsonl").read_bytes() == corpus.PRETRAIN_PATH.read_bytes()
    assert (tmp_path / "chat.jsonl").read_bytes() == corpus.CHAT_PATH.read_bytes()
    assert corpus.DPO_PATH.read_bytes() == corpus.to_jsonl(corpus.generate_dpo()).encode()
    assert (tmp_path / "dpo.jsonl").read_bytes() == corpus.DPO_PATH.read_bytes()


def test_generation_depends_only_on_the_seed():
    random.seed(123)
    state = random.getstate()
    a = corpus.generate_pretrain(seed=7, num_docs=50)
    assert random.getstate() == state  # the global RNG is neither used nor disturbed
    random.seed(999)
    assert corpus.generate_pretrain(seed=7, num_docs=50) == a
    assert corpus.generate_pretrain(seed=8, num_docs=50) != a
    assert corpus.generate_chat(seed=7, num_conversations=30) == corpus.generate_chat(7, 30)


def test_pretrain_size_and_variety(docs):
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 1_200_000 <= total <= 1_600_000
    assert len(docs) == corpus.DEFAULT_NUM_DOCS
    assert len(set(docs)) > 0.99 * len(docs)  # hardly any document repeats
    sentences = {s for d in docs for s in re.split(r"(?<=[.!?])\s+", d)}
    words = {w for d in docs for w in re.findall(r"[A-Za-z']+", d)}
    assert len(sentences) > 7_000  # about 9,000 of 34,000 sentences are distinct
    assert 500 < len(words) < 2_000  # a small world: recurring names and words
    kinds = [d.split(" ", 1)[0] for d in docs]
    assert kinds.count("Dear") > 100  # diaries alongside stories and descriptions
    text = "\n".join(docs)
    for person in corpus.PEOPLE:
        assert text.count(person.name) > 100


def test_world_facts_are_consistent(docs):
    text = "\n".join(docs)
    for p in corpus.PEOPLE:
        assert f"{p.name} is a {p.trait} {p.job} who lives in {p.home}." in text
        assert f"has a {p.pet} called {p.pet_name}" in text
    # No story contradicts where someone lives.
    for p in corpus.PEOPLE:
        for place in corpus.PLACES:
            if place.name != p.home:
                assert f"{p.name} is a {p.trait} {p.job} who lives in {place.name}" not in text


def test_chat_records_are_well_formed(chats):
    assert len(chats) == corpus.DEFAULT_NUM_CONVERSATIONS
    size = len(corpus.to_jsonl(chats).encode("utf-8"))
    assert 200_000 <= size <= 800_000
    systems = 0
    for rec in chats:
        assert set(rec) == {"conversations"}
        msgs = rec["conversations"]
        if msgs[0]["role"] == "system":
            systems += 1
            msgs = msgs[1:]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        for i, m in enumerate(msgs):
            assert set(m) == {"role", "content"}
            assert m["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""
    assert 200 < systems < 600
    multi = sum(len(r["conversations"]) > 3 for r in chats)
    assert multi > 400


def test_chat_answers_are_true(chats):
    people = {p.name: p for p in corpus.PEOPLE}
    checked = 0
    for rec in chats:
        msgs = rec["conversations"]
        for q, a in itertools.pairwise(msgs):
            if q["role"] != "user":
                continue
            if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q["content"]):
                x, op, y = int(m[1]), m[2], int(m[3])
                want = {"plus": x + y, "minus": x - y, "times": x * y}[op]
                assert a["content"] == f"{x} {op} {y} is {want}."
                checked += 1
            elif m := re.fullmatch(r"Where does (\w+) live\?", q["content"]):
                if m[1] in people:
                    assert a["content"] == f"{m[1]} lives in {people[m[1]].home}."
                    checked += 1
    assert checked > 200


def test_jsonl_lines_are_utf8_objects():
    for path in (corpus.PRETRAIN_PATH, corpus.CHAT_PATH):
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        lines = raw.decode("utf-8").split("\n")[:-1]
        assert all(isinstance(json.loads(line), dict) for line in lines)


def test_preference_pairs_share_the_prompt_and_differ_in_the_reply():
    pairs = corpus.generate_dpo()
    assert len(pairs) == corpus.DEFAULT_NUM_PAIRS
    assert corpus.generate_dpo(seed=3, num_pairs=20) == corpus.generate_dpo(3, 20)
    for pair in pairs:
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-2]["role"] == "user"
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
    # the chosen facts agree with the world the corpus describes
    people = {p.name: p for p in corpus.PEOPLE}
    homes = [p for p in pairs if p["chosen"][-1]["content"].split(" lives in ")[0] in people]
    assert homes and all(
        p["chosen"][-1]["content"].endswith(
            f"lives in {people[p['chosen'][-1]['content'].split()[0]].home}."
        )
        for p in homes
    )
