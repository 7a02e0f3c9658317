import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from picochat.common import UserError
from picochat.tokenizer import Tokenizer, SPECIAL_TOKENS, recover_merges


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_roundtrip_arbitrary_bytes(tok, data):
    raw = data.decode("utf-8", errors="surrogateescape").encode("utf-8", errors="surrogatepass")
    text = raw.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_vocab(tok):
    assert tok.vocab_size == 1024
    ids = [tok.special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    assert tok.bos_id == ids[0]
    # special-token text inside user text is encoded as plain text, never as the special token
    assert tok.bos_id not in tok.encode("<|bos|>")


def test_numbers_split_in_pairs(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)


def test_hf_export_gives_identical_ids(tok, webtext_tokenizer, data_root):
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(str(webtext_tokenizer / "tokenizer.json"))
    docs = pq.read_table(data_root / "webtext" / "shards" / "shard_00001.parquet").column("text").to_pylist()[:400]
    docs += ["  leading spaces\n\n\ttabs", "émojis 🙂🚀 and 中文", "x=1234567.89;", "it's  DON'T   we'll\r\n"]
    for d in docs:
        assert hf.encode(d, add_special_tokens=False).ids == tok.encode(d)
        assert hf.decode(tok.encode(d)) == d
    assert hf.encode("<|user_start|>hi<|user_end|>").ids[0] == tok.special("<|user_start|>")


def test_save_load_plain_files(tok, tmp_path):
    tok.save(tmp_path)
    assert not any(p.suffix in (".pkl", ".pickle") for p in tmp_path.iterdir())
    again = Tokenizer.load(tmp_path)
    assert again.hash == tok.hash and again.encode("hello world") == tok.encode("hello world")


def test_load_errors(tmp_path, tok):
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.tiktoken").write_text("garbage\n")
    with pytest.raises(UserError, match="line 1 is corrupt"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(iter(["hello"]), 200)


def test_recovered_merges_rebuild_every_token(tok):
    merges = recover_merges(tok.mergeable_ranks)
    assert len(merges) == len(tok.mergeable_ranks) - 256
    for (a, b), (token, rank) in zip(merges, sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])[256:]):
        assert a + b == token and tok.mergeable_ranks[a] < rank and tok.mergeable_ranks[b] < rank


def test_render_conversation_masks(tok):
    S = tok.special
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    enc = tok.encode
    expected = ([(tok.bos_id, 0), (S("<|user_start|>"), 0)] + [(i, 0) for i in enc("Be brief.\n\nWhat is 6 times 7?")]
                + [(S("<|user_end|>"), 0), (S("<|assistant_start|>"), 0)] + [(i, 1) for i in enc("Let me compute. ")]
                + [(S("<|python_start|>"), 1)] + [(i, 1) for i in enc("6*7")] + [(S("<|python_end|>"), 1)]
                + [(S("<|output_start|>"), 0)] + [(i, 0) for i in enc("42")] + [(S("<|output_end|>"), 0)]
                + [(i, 1) for i in enc("It is 42.")] + [(S("<|assistant_end|>"), 1)]
                + [(S("<|user_start|>"), 0)] + [(i, 0) for i in enc("Thanks")] + [(S("<|user_end|>"), 0)]
                + [(S("<|assistant_start|>"), 0)] + [(i, 1) for i in enc("You're welcome.")]
                + [(S("<|assistant_end|>"), 1)])
    assert list(zip(ids, mask)) == expected
    ids, mask = tok.render_conversation(conv, max_tokens=5)
    assert len(ids) == len(mask) == 5
    first_turn = {"messages": conv["messages"][:2]}
    prompt = tok.render_for_completion(first_turn)
    assert prompt[-1] == S("<|assistant_start|>") and prompt[:-1] == tok.render_conversation(first_turn)[0]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "hi"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty assistant turn"),
    ([], "no messages"),
])
def test_render_errors(tok, messages, match):
    with pytest.raises(UserError, match=match):
        tok.render_conversation({"messages": messages})
