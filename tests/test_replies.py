import pytest

from picochat.replies import reply_text
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


def test_reply_text_drops_only_the_trailing_stop_tokens(tok):
    """The stop token that ended a reply goes; an <|assistant_end|> inside it stays, so a reply that closed its
    turn and went on is not read as a clean one."""
    end = tok.special("<|assistant_end|>")
    assert reply_text(tok, tok.encode("#### 5") + [end]) == "#### 5"
    assert reply_text(tok, tok.encode("#### 5") + [tok.bos_id]) == "#### 5"
    assert reply_text(tok, tok.encode("#### 5")) == "#### 5"  # cut off by its budget
    assert reply_text(tok, tok.encode("#### 4") + [end] + tok.encode(" #### 5") + [end]) == \
        "#### 4<|assistant_end|> #### 5"
