"""picochat.demo: the synthetic curriculum is deterministic, sized as promised, and every answer in it is right."""
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from picochat import demo, shards
from picochat.shards import read_jsonl
from picochat.tasks import gsm8k
from picochat.cli import main
from picochat.tokenizer import normalize_messages


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default curriculum (seed 0, scale 1), generated once for the checks below."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.time()
    counts = demo.generate(out, seed=0, scale=1.0)
    return out, counts, time.time() - t0


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, home):
    assert main(["data", "demo", "--scale", "0.05"]) == 0
    a = files_of(home / "data" / "demo")
    assert main(["data", "demo", "--scale", "0.05", "--out", str(tmp_path / "b")]) == 0
    assert files_of(tmp_path / "b") == a
    assert "pretrain/shard_00000.parquet" in a and "sft/train.jsonl" in a and "eval/gsm8k/test.jsonl" in a
    demo.generate(tmp_path / "c", seed=1, scale=0.05)
    assert files_of(tmp_path / "c")["eval/gsm8k/test.jsonl"] != a["eval/gsm8k/test.jsonl"]


def test_size_and_speed(full):
    out, counts, seconds = full
    assert seconds < 45, f"the curriculum took {seconds:.0f}s"
    assert 20e6 <= counts["pretrain_chars"] <= 40e6
    train, val = shards.split_shards(out / "pretrain")
    assert len(train) >= 2
    for p in train + val:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows == 1024 for i in range(pf.num_row_groups - 1))
    assert pq.read_metadata(val[0]).num_rows == 1024
    assert counts["word_problems_test"] >= 500 and counts["spelling_test"] >= 500
    chars = {c for p in train for t in shards.iter_texts([p]) for c in t}
    assert len(chars) < 100  # a small alphabet: plain ASCII prose


def test_every_word_problem_is_right(full):
    out = full[0]
    for split in ("train", "test"):
        rows = gsm8k.read_gsm8k(out / "eval" / "gsm8k" / f"{split}.jsonl")
        assert len(rows) >= 500
        for r in rows:
            m = r["meta"]
            assert 1 <= len(m["ops"]) <= 3 and demo.solve(m) == m["result"] >= 0
            assert demo.check_word_problem(r, r["answer"])
            assert demo.check_calculations(r["answer"])
            assert gsm8k.extract_answer(r["answer"]) == str(m["result"])
            steps = re.findall(r"<<([^=]+)=(\d+)>>", r["answer"])
            assert len(steps) == len(m["ops"]) and steps[-1][1] == str(m["result"])
            for expr, result in steps:  # plain Python on integers: the tool returns exactly the result
                assert eval(expr, {"__builtins__": {}}) == int(result)
            assert not demo.check_word_problem(r, r["answer"].replace(f"#### {m['result']}", f"#### {m['result'] + 1}"))
    train = gsm8k.read_gsm8k(out / "eval" / "gsm8k" / "train.jsonl")
    test = gsm8k.read_gsm8k(out / "eval" / "gsm8k" / "test.jsonl")
    assert len({r["question"] for r in test}) == len(test)
    assert not {r["question"] for r in test} & {r["question"] for r in train}


def test_every_spelling_answer_is_right(full):
    out = full[0]
    test = read_jsonl(out / "eval" / "spelling" / "test.jsonl")
    train = read_jsonl(out / "eval" / "spelling" / "train.jsonl")
    assert len(test) >= 500 and all(r["meta"]["task"] == "count" for r in test)
    assert {r["meta"]["task"] for r in train} == {"count", "spell"}
    for r in test + train:
        m = r["meta"]
        assert demo.check_spelling(r, r["answer"]) and demo.check_answer(r, r["answer"])
        if m["task"] == "count":
            assert m["count"] == m["word"].count(m["letter"]) and m["word"] in r["question"]
            assert not demo.check_spelling(r, f"#### {m['count'] + 1}")
        else:
            assert "-".join(m["word"]) in r["answer"]
    test_pairs = {(r["meta"]["word"], r["meta"]["letter"]) for r in test}
    assert len(test_pairs) == len(test)
    assert not test_pairs & {(r["meta"]["word"], r["meta"].get("letter")) for r in train}


def test_sft_conversations_are_valid_and_tool_calls_right(full):
    out = full[0]
    convs = read_jsonl(out / "sft" / "train.jsonl")
    assert {c["source"] for c in convs} == {"word_problem", "spelling", "identity", "world"}
    n_tool = 0
    for c in convs + read_jsonl(out / "eval" / "chat" / "val.jsonl"):
        msgs = normalize_messages(c)
        for m in msgs:
            if m["role"] != "assistant":
                continue
            parts = m["content"]
            for i, p in enumerate(parts):
                if p["type"] == "python":
                    n_tool += 1
                    assert parts[i + 1]["type"] == "python_output"
                    assert str(demo.calc(p["text"])) == parts[i + 1]["text"]
    assert n_tool > 5000
    for c in read_jsonl(out / "eval" / "identity" / "train.jsonl"):
        normalize_messages(c)
    # a word problem's conversation still carries the checkable final answer
    wp = next(c for c in convs if c["source"] == "word_problem")
    text = "".join(p["text"] for p in wp["messages"][1]["content"] if p["type"] != "python")
    assert gsm8k.extract_answer(text) is not None


def test_test_questions_appear_nowhere_else(full):
    out = full[0]
    test_q = {r["question"] for r in read_jsonl(out / "eval" / "gsm8k" / "test.jsonl")}
    test_q |= {r["question"] for r in read_jsonl(out / "eval" / "spelling" / "test.jsonl")}
    sft_q = {m["content"] for c in read_jsonl(out / "sft" / "train.jsonl") for m in c["messages"]
             if m["role"] == "user"}
    assert not test_q & sft_q
    train_files, _ = shards.split_shards(out / "pretrain")
    asked = set()
    for t in shards.iter_texts(train_files):
        asked.update(re.findall(r"^(?:Question|Q|User): (.*)$", t, flags=re.M))
    assert asked and not test_q & asked
    # and the letter counts of held-out pairs are never stated in the prose
    spelling_test = read_jsonl(out / "eval" / "spelling" / "test.jsonl")
    pairs = [(r["meta"]["word"], r["meta"]["letter"]) for r in spelling_test]
    stated = set()
    for t in shards.iter_texts(train_files):
        stated.update(re.findall(r"The letter (\w) appears \d+ times? in (\w+)\.", t))
    assert stated and not {(w, c) for w, c in pairs} & {(w, c) for c, w in stated}


def test_answer_helpers():
    ans = "Tom has 3 * 4 = <<3*4=12>>12 cups.\nTom keeps 12 / 4 = <<12//4=3>>3 cups.\n#### 3"
    assert gsm8k.answer_to_parts(ans) == [
        {"type": "text", "text": "Tom has 3 * 4 = "}, {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"}, {"type": "text", "text": "12 cups.\nTom keeps 12 / 4 = "},
        {"type": "python", "text": "12//4"}, {"type": "python_output", "text": "3"},
        {"type": "text", "text": "3 cups.\n#### 3"}]
    assert demo.strip_calculations(ans) == "Tom has 3 * 4 = 12 cups.\nTom keeps 12 / 4 = 3 cups.\n#### 3"
    assert demo.check_calculations(ans) and not demo.check_calculations("<<2+2=5>>")
    with pytest.raises(ValueError):
        demo.calc("__import__('os')")
    for expr in ("7/2", "-3+5", "2**3", "1.5+1"):  # the tool takes these; the demo's steps are integer + - * //
        with pytest.raises(ValueError):
            demo.calc(expr)
    assert demo.calc("(2+3)*4//3") == 6
    # the real GSM8K's annotations split the same way
    assert [p["type"] for p in gsm8k.answer_to_parts("48/2 = <<48/2=24>>24\n#### 24")] == \
        ["text", "python", "python_output", "text"]
