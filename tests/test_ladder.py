"""bench/ladder.py's evaluator, the one both tools are scored by: it counts what picochat's bits_per_byte counts."""
import importlib.util
from pathlib import Path

import torch

from picochat.model import GPT, GPTConfig, bits_per_byte

spec = importlib.util.spec_from_file_location("ladder", Path(__file__).resolve().parents[1] / "bench" / "ladder.py")
ladder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ladder)


def test_the_ladder_evaluator_equals_bits_per_byte_on_the_same_rows(webtext_tokenizer):
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.load(webtext_tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, sequence_len=64))
    model.init_weights()
    model.eval()
    docs = ["The cat sat on the mat.", "A much longer document about ships, whales and the sea " * 4, "Hi."]
    bos = tok.special("<|bos|>")
    got = ladder.score_documents(docs, encode=tok.encode, bos=bos, token_bytes=tok.token_bytes(),
                                 logits=lambda x: model(x), doc_tokens=40, batch=2)
    # the same rows as picochat's validation builds them: inputs and targets, padding targets ignored (-1)
    rows = [[bos] + tok.encode(d)[:40] for d in docs]
    width = max(len(r) for r in rows)
    x = torch.tensor([r[:-1] + [bos] * (width - len(r)) for r in rows])
    y = torch.tensor([r[1:] + [-1] * (width - len(r)) for r in rows])
    with torch.no_grad():
        want = bits_per_byte(model, [(x, y)], tok.token_bytes())
    assert abs(got - want) < 1e-6 and 2 < got < 30
    # and truncation is what it says: a document's first doc_tokens tokens only
    short = ladder.score_documents(docs[1:2], encode=tok.encode, bos=bos, token_bytes=tok.token_bytes(),
                                   logits=lambda x: model(x), doc_tokens=5)
    assert short != ladder.score_documents(docs[1:2], encode=tok.encode, bos=bos, token_bytes=tok.token_bytes(),
                                           logits=lambda x: model(x), doc_tokens=40)


def test_training_seconds_and_equal_time_reading():
    dts = {1: 60.0, 2: 1.2, 3: 1.0, 4: 1.1, 5: 0.9}  # step 1 compiled for a minute
    assert abs(ladder.training_seconds(dts, 5) - (1.1 + 1.1 + 1.0 + 1.1 + 0.9)) < 1e-9
    curve = [{"seconds": 10.0, "val": 3.0}, {"seconds": 20.0, "val": 2.0}]
    assert ladder.at_seconds(curve, 15.0, "val") == 2.5
    assert ladder.at_seconds(curve, 25.0, "val") == 2.0 and ladder.at_seconds(curve, 5.0, "val") == 3.0
