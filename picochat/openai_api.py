"""The OpenAI API's request schemas, their checks, and the response bodies: plain functions, no app, no model.

A request goes through here in three steps, each usable on its own (tests call them directly):
  1. pydantic parses the body (ChatRequest, CompletionRequest): types and ranges, strictly ("12" is no number);
  2. the checks that need the server's limits or the model's sizes (check_sampling, check_stops, conversation,
     parse_prompts, room) raise APIError, which the server answers as {"error": {...}} with its status;
  3. the builders (chat_chunk, chat_completion, text_chunk, completion, ...) return the dicts the server sends
     as JSON or as SSE lines (sse()).
Everything the checks reject is a 4xx; nothing here touches the scheduler.
"""
import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from picochat.engine import TOOL_TAGS, StreamDecoder, parse_reply


@dataclass
class Limits:
    max_messages: int = 200        # messages in one chat request
    max_chars: int = 100_000       # characters of all messages (or prompts) in one request
    max_tokens: int = 0            # generated tokens per request (0 = the model's context)
    max_n: int = 8                 # choices per request
    max_prompts: int = 64          # prompts in one /v1/completions request
    max_choices: int = 64          # generations in one request: prompts x n
    max_logprobs: int = 500_000    # logprob values in one answer: tokens with logprobs x (1 + top logprobs)
    max_stop: int = 4              # stop strings, each at most 200 characters
    max_body_bytes: int = 4 << 20  # request body


# ---- request schemas (strict: "12" is not a number, true is not 1) --------------------------------------------
def _unicode(s):
    # JSON's "\ud800" parses to a lone surrogate, which neither the tokenizer nor a UTF-8 response can carry
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode") \
            from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request may carry


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Schema):
    type: Literal["text"]
    text: Text


class Message(_Schema):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampling(_Schema):
    model: Text | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted for compatibility, not applied
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: Text | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class APIError(Exception):
    """An error the client sees: status and OpenAI's {"message", "type", "code", "param"}."""

    def __init__(self, status, message, type="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message, type="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- checks past the schema: limits and the model's sizes -----------------------------------------------------
def check_stops(stop, limits):
    """The stop field as a list of strings, or APIError 400 past limits.max_stop or 200 characters each."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop or any(len(s) > 200 for s in stops):
        raise APIError(400, f"stop: at most {limits.max_stop} strings of at most 200 characters", param="stop")
    return stops


def check_sampling(body, limits, *, vocab_size, max_len):
    """Checks n, top_k and max_tokens (max_completion_tokens first) against the limits and the model; returns
    the max_tokens asked for (None when not given)."""
    if body.n > limits.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit of {limits.max_n}", param="n")
    if body.top_k is not None and body.top_k > vocab_size:
        raise APIError(400, f"top_k={body.top_k} is larger than the vocabulary ({vocab_size})", param="top_k")
    cap = min(limits.max_tokens or max_len, max_len)
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if requested is not None and requested > cap:
        raise APIError(400, f"max_tokens={requested} is over this server's limit of {cap}", param="max_tokens")
    return requested


def conversation(messages, limits):
    """Chat messages -> the tokenizer's conversation: assistant text parsed into text / python / python_output
    parts (tool tags inline), user and system text as it is. The last message must be the user's."""
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages: this server takes at most {limits.max_messages}",
                       param="messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        chars += len(text)
        if m.role == "assistant":
            parts = [p for p in parse_reply(text) if p["text"] or p["type"] != "text"]
            if not parts:
                raise APIError(400, f"messages[{i}]: empty assistant message", param=f"messages.{i}.content")
            out.append({"role": "assistant", "content": parts})
        else:
            out.append({"role": m.role, "content": text})
    if chars > limits.max_chars:
        raise APIError(400, f"messages hold {chars} characters: this server takes at most {limits.max_chars}",
                       param="messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return out


def parse_prompts(prompt, tokenizer, limits, vocab):
    """The completions prompt (a string, strings, token ids or lists of them) -> [(token ids, text)]."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    if len(items) > limits.max_prompts:
        raise APIError(400, f"{len(items)} prompts: this server takes at most {limits.max_prompts} per request",
                       param="prompt")
    chars = sum(len(x) for x in items if isinstance(x, str))
    if chars > limits.max_chars:
        raise APIError(400, f"the prompts hold {chars} characters: this server takes at most {limits.max_chars}",
                       param="prompt")
    out = []
    for x in items:
        if isinstance(x, str):
            out.append((tokenizer.encode(x), x))
        else:
            if any(t < 0 or t >= vocab for t in x):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((list(x), tokenizer.decode(list(x))))
    return out


def check_work(limits, *, choices, tokens, top_n):
    """Bounds what one request asks of the server: at most limits.max_choices generations (choices: prompts x n)
    and, with logprobs on (top_n not None), at most limits.max_logprobs logprob values in its answer (tokens: the
    most tokens that carry logprobs, generated and scored prompt tokens together; each carries 1 + top_n)."""
    if choices > limits.max_choices:
        raise APIError(400, f"{choices} generations (prompts x n): this server takes at most {limits.max_choices} "
                            "per request", param="n")
    values = 0 if top_n is None else tokens * (1 + top_n)
    if values > limits.max_logprobs:
        raise APIError(400, f"the answer could hold {values} logprob values (tokens x (1 + top logprobs)): this "
                            f"server sends at most {limits.max_logprobs}; ask for fewer tokens, choices or top "
                            "logprobs", param="logprobs")


def room(prompt, max_len):
    """Tokens the context has left after prompt; APIError 400 context_length_exceeded when none."""
    left = max_len - len(prompt)
    if left < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens and leaves no room in the model's context of "
                            f"{max_len} tokens: shorten it", code="context_length_exceeded")
    return left


def chat_logprobs_count(body):
    """How many top logprobs each chat token carries: None when logprobs are off, else top_logprobs or 0."""
    return (body.top_logprobs or 0) if body.logprobs else None


def check_echo(body):
    """Prompt logprobs (echo with logprobs) come from a separate scoring pass, only without stream."""
    if body.echo and body.stream and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is only supported without stream", param="stream")


def sampling_params(body, i):
    """The batching.Request sampling fields of choice i: choice i draws with seed + i, so n choices differ and the
    same seed gives the same n choices; temperature defaults to 1, top_k 0 means off."""
    seed = None if body.seed is None else (body.seed + i) % (1 << 63)
    temperature = 1.0 if body.temperature is None else body.temperature
    return {"temperature": temperature, "top_k": body.top_k or None, "top_p": body.top_p, "seed": seed}


# ---- one choice's text as it streams --------------------------------------------------------------------------
class ChoiceText:
    """One choice's text as it streams: UTF-8-safe decoding, tool tags as text, and stop strings (text that
    could still become a stop string is held back until it cannot)."""

    def __init__(self, tokenizer, stops):
        self.dec = StreamDecoder(tokenizer, keep=TOOL_TAGS)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf, self.sent, self.stopped = "", 0, False

    def feed(self, token):
        if self.stopped:
            return ""
        self.buf += self.dec.feed(token)
        return self._release(final=False)

    def finish(self):
        if self.stopped:
            return ""
        self.buf += self.dec.flush()
        return self._release(final=True)

    def _release(self, final):
        hits = [i for i in (self.buf.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            out, self.sent, self.stopped = self.buf[self.sent:min(hits)], min(hits), True
            return out
        end = len(self.buf) if final else max(self.sent, len(self.buf) - self.hold)
        out, self.sent = self.buf[self.sent:end], end
        return out

    @property
    def text(self):
        return self.buf[:self.sent]


def finish_reason(reason, text):
    """The OpenAI finish_reason of a generation that ended with the scheduler's reason; text: its ChoiceText."""
    if text.stopped:
        return "stop"
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


# ---- response bodies ------------------------------------------------------------------------------------------
def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def token_str(tokenizer, t):
    """A token as text (specials as their names; a partial UTF-8 character as U+FFFD)."""
    return tokenizer.enc.decode_single_token_bytes(t).decode("utf-8", "replace")


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprob_entry(tokenizer, tok, lp):
    """One entry of a chat choice's logprobs.content; lp: (the token's logprob, [(top token, logprob)])."""
    s = token_str(tokenizer, tok)
    return {"token": s, "logprob": lp[0], "bytes": list(s.encode()),
            "top_logprobs": [{"token": token_str(tokenizer, t), "logprob": v,
                              "bytes": list(token_str(tokenizer, t).encode())} for t, v in lp[1]]}


def chat_chunk(cid, created, model, i, delta, *, finish=None, logprobs=None):
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def chat_usage_chunk(cid, created, model, usage):
    """The last chunk before [DONE] when stream_options.include_usage: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage}


def chat_completion(cid, created, model, *, texts, finish, logprobs, usage):
    """The non-streamed chat answer; texts: the choices' text; logprobs: each choice's logprobs.content list,
    or None when the request did not ask for logprobs."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": logprobs[i]} if logprobs is not None else None,
                         "finish_reason": finish[i]} for i, text in enumerate(texts)],
            "usage": usage}


def text_chunk(cid, created, model, i, text, *, finish=None):
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}


def text_usage_chunk(cid, created, model, usage):
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": usage}


def completion(cid, created, model, *, choices, usage):
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def echo_logprobs(tokenizer, ids, scored):
    """The completions logprobs of an echoed prompt: ids, the prompt's tokens; scored[j], (logprob,
    [(top token, logprob)]) of ids[j], None for the first (nothing precedes it). text_offset counts characters
    from the prompt's start."""
    dec, offsets, pos, toks, tops = StreamDecoder(tokenizer, keep=()), [], 0, [], []
    for t, sc in zip(ids, scored):
        offsets.append(pos)
        pos += len(dec.feed(t))
        toks.append(token_str(tokenizer, t))
        tops.append(None if sc is None else {token_str(tokenizer, a): b for a, b in sc[1]})
    lps = [None if sc is None else sc[0] for sc in scored]
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_logprobs(tokenizer, tokens, *, offset, base=None):
    """A completions choice's logprobs: base (the echoed prompt's, or None) followed by the generated tokens
    [(token, (logprob, [(top token, logprob)]))], whose offsets start at offset (the prompt's length in
    characters: offsets count from the start of the prompt, echoed or not, as OpenAI's do)."""
    out = base or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    out = {key: list(v) for key, v in out.items()}
    dec, pos = StreamDecoder(tokenizer, keep=TOOL_TAGS), offset
    for tok, lp in tokens:
        out["text_offset"].append(pos)
        pos += len(dec.feed(tok))
        out["tokens"].append(token_str(tokenizer, tok))
        out["token_logprobs"].append(lp[0])
        out["top_logprobs"].append({token_str(tokenizer, a): b for a, b in lp[1]})
    return out
