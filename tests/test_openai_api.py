"""picochat.openai_api without an app: what a hostile or careless client's request meets (the schemas, then the
checks against the limits and the model) and the response bodies the server sends."""
import json

import pytest
from pydantic import ValidationError

from picochat.openai_api import (APIError, ChatRequest, ChoiceText, CompletionRequest, Limits, chat_chunk,
                                 chat_completion, chat_logprob_entry, chat_logprobs_count, chat_usage_chunk,
                                 check_echo, check_sampling, check_stops, check_work, completion,
                                 completion_logprobs, conversation, echo_logprobs, error_body, finish_reason,
                                 parse_prompts, room, sampling_params, sse, text_chunk, token_str, usage)

HI = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ChatRequest.model_validate({"messages": HI, **fields})


def api_error(fn, *args, **kwargs):
    with pytest.raises(APIError) as e:
        fn(*args, **kwargs)
    return e.value


# ---- the schemas: types and ranges, strictly ------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"temperature": 3}, {"temperature": -0.1}, {"temperature": "hot"}, {"temperature": None, "top_p": 0},
    {"top_p": 1.5}, {"top_k": -1}, {"top_k": 2.5}, {"n": 0}, {"n": 1.5}, {"n": True}, {"n": "2"},
    {"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": "5"}, {"max_tokens": 1.5},
    {"max_completion_tokens": 0}, {"stream": "yes"}, {"stream": 1}, {"logprobs": 1}, {"top_logprobs": 21},
    {"top_logprobs": -1}, {"seed": "1"}, {"stop": 5}, {"stop": [1]}, {"presence_penalty": 3},
    {"stream_options": {"include_usage": "yes"}},
    {"messages": []}, {"messages": "hi"}, {"messages": [{"role": "tool", "content": "hi"}]},
    {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 42}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
])
def test_chat_schema_refuses(fields):
    with pytest.raises(ValidationError):
        chat(**fields)


@pytest.mark.parametrize("fields", [
    {"prompt": {"a": 1}}, {"prompt": [1.5]}, {"prompt": [[1], "a"]}, {"prompt": None}, {"max_tokens": -1},
    {"logprobs": 21}, {"logprobs": True}, {"echo": "true"},
])
def test_completion_schema_refuses(fields):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "a", **fields})


LONE = json.loads('"a\\ud800b"')  # what JSON's "\ud800" parses to: a lone surrogate, no Unicode text


@pytest.mark.parametrize("fields", [
    {"messages": [{"role": "user", "content": LONE}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
    {"messages": [{"role": "user", "content": "hi", "name": LONE}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONE},
                  {"role": "user", "content": "hi"}]},
    {"stop": LONE}, {"stop": ["x", LONE]}, {"model": LONE}, {"user": LONE},
])
def test_lone_surrogates_are_refused_anywhere(fields):
    with pytest.raises(ValidationError, match="lone UTF-16 surrogate"):
        chat(**fields)
    for prompt in (LONE, ["ok", LONE]):
        with pytest.raises(ValidationError, match="lone UTF-16 surrogate"):
            CompletionRequest.model_validate({"prompt": prompt, "echo": True})
    # a pair of surrogates in JSON is one character beyond the BMP: fine
    pair = json.loads('"\\ud83d\\ude00"')
    assert chat(messages=[{"role": "user", "content": pair}]).messages[0].content == "\U0001F600"


def test_schema_defaults_and_unknown_fields():
    body = chat(frequency_penalty=1.0, tools=[{"type": "function"}])  # unknown fields are ignored
    assert (body.n, body.stream, body.temperature, body.max_tokens, body.logprobs) == (1, False, None, None, False)
    body = CompletionRequest.model_validate({"prompt": [[1, 2], [3]]})
    assert body.max_tokens == 16 and body.echo is False and body.logprobs is None
    assert CompletionRequest.model_validate({"prompt": "a", "max_tokens": 0}).max_tokens == 0  # scoring only


# ---- the checks against the limits and the model ---------------------------------------------------------------
def test_check_sampling():
    lim = Limits(max_n=2, max_tokens=100)
    assert check_sampling(chat(), lim, vocab_size=1000, max_len=256) is None
    assert check_sampling(chat(max_tokens=100, n=2, top_k=1000), lim, vocab_size=1000, max_len=256) == 100
    # max_completion_tokens (the newer name) wins over max_tokens
    assert check_sampling(chat(max_tokens=100, max_completion_tokens=7), lim, vocab_size=1000, max_len=256) == 7
    e = api_error(check_sampling, chat(n=3), lim, vocab_size=1000, max_len=256)
    assert (e.status, e.param, e.type) == (400, "n", "invalid_request_error")
    e = api_error(check_sampling, chat(top_k=1001), lim, vocab_size=1000, max_len=256)
    assert (e.status, e.param) == (400, "top_k")
    e = api_error(check_sampling, chat(max_tokens=10 ** 9), lim, vocab_size=1000, max_len=256)
    assert (e.status, e.param) == (400, "max_tokens") and "limit of 100" in e.message
    e = api_error(check_sampling, chat(max_completion_tokens=101), lim, vocab_size=1000, max_len=256)
    assert e.param == "max_tokens"
    # no cap of the server's own: the context is the cap; a cap over the context: still the context
    for cap in (0, 10_000):
        e = api_error(check_sampling, chat(max_tokens=257), Limits(max_tokens=cap), vocab_size=1000, max_len=256)
        assert "limit of 256" in e.message
        assert check_sampling(chat(max_tokens=256), Limits(max_tokens=cap), vocab_size=1000, max_len=256) == 256


def test_check_stops():
    lim = Limits(max_stop=2)
    assert check_stops(None, lim) == [] and check_stops("x", lim) == ["x"]
    assert check_stops(["a", "b"], lim) == ["a", "b"]
    assert check_stops(["y" * 200], lim) == ["y" * 200]
    for stop in (["a", "b", "c"], ["y" * 201], "y" * 201):
        e = api_error(check_stops, stop, lim)
        assert (e.status, e.param) == (400, "stop")


def test_conversation():
    lim = Limits(max_messages=3, max_chars=60)
    msgs = chat(messages=[{"role": "system", "content": "be brief"},
                          {"role": "assistant", "content": "<|python_start|>1+1<|python_end|>2"},
                          {"role": "user", "content": [{"type": "text", "text": "and "},
                                                       {"type": "text", "text": "3"}]}]
                ).messages
    conv = conversation(msgs, lim)
    assert conv[0] == {"role": "system", "content": "be brief"}
    assert [p["type"] for p in conv[1]["content"]] == ["python", "text"]
    assert conv[2] == {"role": "user", "content": "and 3"}
    cases = [(HI * 4, "messages", "at most 3"), ([{"role": "user", "content": "x" * 61}], "messages", "at most 60"),
             ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages", "last message"),
             ([{"role": "assistant", "content": ""}, {"role": "user", "content": "a"}], "messages.0.content", "empty")]
    for messages, param, words in cases:
        e = api_error(conversation, chat(messages=messages).messages, lim)
        assert (e.status, e.param) == (400, param) and words in e.message, e.message


def test_parse_prompts(tok):
    lim = Limits(max_prompts=2, max_chars=10)
    ids = tok.encode("hello")
    assert parse_prompts("hello", tok, lim, tok.vocab_size) == [(ids, "hello")]
    assert parse_prompts(["a", "b"], tok, lim, tok.vocab_size) == [(tok.encode("a"), "a"), (tok.encode("b"), "b")]
    assert parse_prompts(ids, tok, lim, tok.vocab_size) == [(ids, "hello")]  # one prompt of token ids
    assert parse_prompts([ids, ids], tok, lim, tok.vocab_size) == [(ids, "hello")] * 2
    for prompt, words in [([], "empty"), (["a", "b", "c"], "at most 2"), ("x" * 11, "at most 10"),
                          ([0, -1], "[0, "), ([tok.vocab_size], "[0, "), ([[1], [tok.vocab_size + 5]], "[0, ")]:
        e = api_error(parse_prompts, prompt, tok, lim, tok.vocab_size)
        assert (e.status, e.param) == (400, "prompt") and words in e.message, e.message


def test_room_echo_and_generation_parameters():
    assert room([1] * 10, 256) == 246 and room([1] * 255, 256) == 1
    e = api_error(room, [1] * 256, 256)
    assert (e.status, e.code) == (400, "context_length_exceeded")
    e = api_error(check_echo, CompletionRequest.model_validate({"prompt": "a", "echo": True, "stream": True,
                                                                "logprobs": 0}))
    assert (e.status, e.param) == (400, "stream")
    check_echo(CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 0}))
    check_echo(CompletionRequest.model_validate({"prompt": "a", "echo": True, "stream": True}))
    assert sampling_params(chat(), 0) == {"temperature": 1.0, "top_k": None, "top_p": None, "seed": None}
    p = [sampling_params(chat(temperature=0, top_k=0, top_p=0.5, seed=(1 << 63) - 1), i) for i in range(2)]
    assert p[0] == {"temperature": 0, "top_k": None, "top_p": 0.5, "seed": (1 << 63) - 1}
    assert p[1]["seed"] == 0  # seed + i stays a valid 63-bit seed
    assert sampling_params(chat(top_k=5, seed=3), 2)["top_k"] == 5 and sampling_params(chat(seed=3), 2)["seed"] == 5
    assert chat_logprobs_count(chat()) is None and chat_logprobs_count(chat(top_logprobs=3)) is None
    assert chat_logprobs_count(chat(logprobs=True)) == 0
    assert chat_logprobs_count(chat(logprobs=True, top_logprobs=3)) == 3


def test_check_work():
    lim = Limits(max_choices=8, max_logprobs=1000)
    check_work(lim, choices=8, tokens=10 ** 6, top_n=None)  # without logprobs, tokens do not count
    check_work(lim, choices=8, tokens=50, top_n=19)  # 50 x 20 = 1000
    e = api_error(check_work, lim, choices=9, tokens=1, top_n=None)
    assert (e.status, e.param) == (400, "n") and "at most 8" in e.message
    e = api_error(check_work, lim, choices=1, tokens=51, top_n=19)
    assert (e.status, e.param) == (400, "logprobs") and "1020" in e.message
    e = api_error(check_work, lim, choices=1, tokens=1001, top_n=0)
    assert e.param == "logprobs"


# ---- streaming text and the response bodies --------------------------------------------------------------------
def test_choice_text_holds_back_a_possible_stop(tok):
    ids = tok.encode("the cat sat on the mat")
    t = ChoiceText(tok, ["on the"])
    out = "".join(t.feed(i) for i in ids) + t.finish()
    assert out == t.text == "the cat sat " and t.stopped and finish_reason("length", t) == "stop"
    t = ChoiceText(tok, [])
    assert "".join(t.feed(i) for i in ids) + t.finish() == "the cat sat on the mat" and not t.stopped
    reasons = [finish_reason(r, t) for r in ("length", "stop", "cancelled", "error: boom")]
    assert reasons == ["length", "stop", "stop", "stop"]


def test_error_body_and_sse():
    assert error_body("no", code="c") == {"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                                    "code": "c"}}
    line = sse({"text": "é ☃"})
    assert line == 'data: {"text": "é ☃"}\n\n' and json.loads(line[6:]) == {"text": "é ☃"}


def test_chat_bodies(tok):
    u = usage(5, 3)
    assert u == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    c = chat_chunk("id", 1, "m", 1, {"content": "x"}, finish="stop")
    assert c == {"id": "id", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 1, "delta": {"content": "x"}, "logprobs": None, "finish_reason": "stop"}]}
    assert chat_usage_chunk("id", 1, "m", u)["choices"] == [] and chat_usage_chunk("id", 1, "m", u)["usage"] == u
    a = tok.encode("a")[0]
    entry = chat_logprob_entry(tok, a, (-0.5, [(a, -0.5)]))
    assert entry == {"token": "a", "logprob": -0.5, "bytes": [97],
                     "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
    body = chat_completion("id", 1, "m", texts=["x", "y"], finish=["stop", "length"], logprobs=None, usage=u)
    assert body["object"] == "chat.completion" and body["usage"] == u
    assert body["choices"][1] == {"index": 1, "message": {"role": "assistant", "content": "y"}, "logprobs": None,
                                  "finish_reason": "length"}
    body = chat_completion("id", 1, "m", texts=["x"], finish=["stop"], logprobs=[[entry]], usage=u)
    assert body["choices"][0]["logprobs"] == {"content": [entry]}


def test_completion_bodies(tok):
    assert text_chunk("id", 1, "m", 0, "x", finish="length")["choices"] == [
        {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}]
    assert completion("id", 1, "m", choices=[], usage=usage(1, 0))["object"] == "text_completion"
    ids = tok.encode("the cat")
    scored = [None] + [(-1.0, [(t, -1.0)]) for t in ids[1:]]
    echoed = echo_logprobs(tok, ids, scored)
    assert "".join(echoed["tokens"]) == "the cat" and echoed["token_logprobs"][0] is None
    assert echoed["top_logprobs"][0] is None and echoed["text_offset"][0] == 0
    assert echoed["text_offset"] == [len("".join(echoed["tokens"][:i])) for i in range(len(ids))]
    gen = tok.encode(" sat")
    lp = completion_logprobs(tok, [(t, (-2.0, [(t, -2.0)])) for t in gen], offset=len("the cat"), base=echoed)
    assert lp["tokens"] == echoed["tokens"] + [token_str(tok, t) for t in gen]
    assert lp["text_offset"][len(ids)] == len("the cat") and lp["token_logprobs"][-1] == -2.0
    assert len(echoed["tokens"]) == len(ids)  # base is copied, not extended in place
    alone = completion_logprobs(tok, [(gen[0], (-2.0, []))], offset=7)
    assert alone == {"tokens": [token_str(tok, gen[0])], "token_logprobs": [-2.0], "top_logprobs": [{}],
                     "text_offset": [7]}
