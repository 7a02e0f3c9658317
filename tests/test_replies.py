from itertools import combinations

import pytest

from picochat import batching, engine as engine_module
from picochat.model import GPT, GPTConfig
from picochat.replies import generate_all, greedy_replies, pass_at_k, reply_text
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


def test_a_failed_generation_raises_instead_of_scoring_as_wrong(tok, monkeypatch):
    """SFT's and RL's greedy replies and the chat evals share generate_all: a decode step that fails stops the
    evaluation with the error rather than counting the cut-off replies as wrong answers."""
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64, head_dim=32)).init_weights(seed=0)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Hi", "Count to three.")]
    assert len(greedy_replies(model, tok, prompts, 4)) == 3

    def broken(self):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(batching.Scheduler, "_step", broken)
    with pytest.raises(RuntimeError, match="generation failed: error: RuntimeError: out of memory"):
        greedy_replies(model, tok, prompts, 4)
    ids = [tok.render_for_completion(c) for c in prompts]
    with pytest.raises(RuntimeError, match="generation failed"):
        generate_all(engine_module.Engine(model, tok, tool=True), ids, [4] * 3, slots=2)


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)        # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)     # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(4, 2, 3) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_pass_at_k_against_brute_force():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(16, 0, 8) == 0.0 and pass_at_k(16, 16, 8) == 1.0
    for n, c, k in ((10, 3, 4), (16, 5, 8), (8, 1, 1)):  # against brute force over all k-subsets
        right = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
