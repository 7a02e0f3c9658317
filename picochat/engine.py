"""Inference: a decode path laid out for speed, a static KV cache, sampling, the calculator tool, UTF-8-safe
streaming text, and batched generation (the server's continuous batching is picochat/batching.py).

    engine = Engine(model, tokenizer, tool=True)
    for tokens, forced in engine.generate(prompt_ids, num_samples=2, max_tokens=64, temperature=0.8, top_k=50):
        ...  # one step: tokens[i] is sample i's next token, or None once sample i has finished (the step
             # that carries its stop token is the last one where it appears); forced[i] is True when the
             # calculator tool put the token there (masked out of RL's loss)
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64, temperature=1.0, seed=0)

Generation: the prompt is prefilled once into a one-row cache, the cache is copied to num_samples rows, then
all samples decode together, one token per step. A sample finishes on <|assistant_end|> or <|bos|> (the stop
token is part of its output), after max_tokens tokens (forced ones count), or when the context is full.
temperature <= 0 is greedy; a seed makes sampling deterministic (one torch.Generator per call).

The tool: when a sample writes <|python_start|> expr <|python_end|>, expr goes to
picochat.calculator.evaluate_expression and <|output_start|> result <|output_end|> is forced into the stream
one token per step (nothing is forced when the expression fails).

Context-length policy: a prompt must leave room for at least one new token (else UserError, the server's 400
context_length_exceeded); max_tokens is clipped to what the context has left, so a long generation ends with
finish reason "length" at the context's end. Callers that keep a conversation (the CLI) drop old turns first.

The decode path itself (InferenceModel, StaticCache, int8 weights) is picochat/decode.py.
"""
import codecs
import re
from collections import deque

import torch

from picochat.common import UserError
from picochat.decode import InferenceModel, StaticCache, softcap

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TOOL_TAGS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


# ---- sampling -----------------------------------------------------------------------------------------------
def sample(logits, temperature=1.0, *, top_k=None, top_p=None, generator=None, cap=15.0):
    """Next tokens (B,) from raw logits (B, V) (before the soft-cap `cap`). temperature <= 0: greedy. top_k keeps
    the k most likely tokens, top_p the smallest set whose probability reaches p (after top_k)."""
    if temperature is None or temperature <= 0:
        return logits.argmax(-1)
    idx = None
    if top_k and top_k < logits.shape[-1]:
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted; the soft-cap keeps the order
    z = softcap(logits.float(), cap) / temperature
    if top_p is not None and top_p < 1.0:
        if idx is None:
            z, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(z, dim=-1)
        z = z.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))  # the first token always stays
    choice = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)
    return (idx.gather(-1, choice) if idx is not None else choice).squeeze(-1)


# ---- the tool and streaming text ----------------------------------------------------------------------------
class ToolState:
    """One sample's tool state machine: tokens the tool forces next, and the call being written."""
    __slots__ = ("forced", "call", "ids")

    def __init__(self, ids):
        self.ids = ids  # (python_start, python_end)
        self.forced = deque()
        self.call = None  # tokens after <|python_start|>, until <|python_end|>

    def next(self, sampled):
        """(token, forced, finished_call): a forced token while any is waiting, else the sampled one.
        finished_call is the token list of a tool call that this token closed (or None)."""
        if self.forced:
            return self.forced.popleft(), True, None
        start, end = self.ids
        if sampled == start:
            self.call = []
        elif sampled == end and self.call is not None:
            call, self.call = self.call, None
            return sampled, False, call
        elif self.call is not None:
            self.call.append(sampled)
        return sampled, False, None


class StreamDecoder:
    """Token ids -> text pieces that never split a UTF-8 character: a token can end inside a multibyte
    character, and its bytes wait until the character is complete. Special tokens give "" unless named in
    `keep`, which come out as their own text (the chat UI and API show tool calls that way)."""

    def __init__(self, tokenizer, keep=()):
        self.enc = tokenizer.enc
        self.n_regular = len(tokenizer.mergeable_ranks)
        self.keep = {tokenizer.special(s): s for s in keep}
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token):
        if token >= self.n_regular:
            tag = self.keep.get(token)
            return self.flush() + tag if tag else ""
        return self.dec.decode(self.enc.decode_single_token_bytes(token))

    def flush(self):
        return self.dec.decode(b"", final=True)


_TAG_RE = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>|$)"
                     r"|<\|output_start\|>(.*?)(?:<\|output_end\|>|$)", re.S)


def parse_reply(text):
    """Assistant text with tool tags (as the server and UI show them) -> content parts for the tokenizer:
    [{type: text|python|python_output, text}]. An unclosed tag (a reply cut short) runs to the end."""
    parts, pos = [], 0
    for m in _TAG_RE.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        if m.group(1) is not None:
            parts.append({"type": "python", "text": m.group(1)})
        else:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def evaluate_tool(expr):
    from picochat.calculator import evaluate_expression
    return evaluate_expression(expr)


# ---- the engine ---------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model, tokenizer, tool=True, compile=False, dtype=None):
        self.model, self.tokenizer, self.tool = model, tokenizer, tool
        self.net = InferenceModel(model, dtype=dtype, compile=compile)
        S = tokenizer.special
        self.stop_ids = frozenset(S(s) for s in STOP_TOKENS)
        self.python_ids = (S("<|python_start|>"), S("<|python_end|>"))
        self.output_ids = (S("<|output_start|>"), S("<|output_end|>"))
        self.bos_id = tokenizer.bos_id
        self.vocab_size = model.config.vocab_size
        self.softcap = model.config.softcap

    @property
    def device(self):
        return self.net.device

    @property
    def max_context(self):
        return self.net.max_positions

    def tool_tokens(self, call_tokens):
        """The tokens to force after a tool call: <|output_start|> result <|output_end|>, or [] on failure."""
        if not self.tool:
            return []
        result = evaluate_tool(self.tokenizer.decode(call_tokens))
        if result is None:
            return []
        return [self.output_ids[0]] + self.tokenizer.encode(result) + [self.output_ids[1]]

    def check_prompt(self, prompt_ids):
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise UserError("empty prompt: give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise UserError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_context:
            raise UserError(f"prompt of {len(prompt)} tokens leaves no room to generate in the model's context of "
                            f"{self.max_context} tokens: shorten it")
        return prompt

    # ---- the steps both decode loops share (generate below, batching.Scheduler) ---------------------------------
    def prefill(self, prompt, cache, row=0):
        """The prompt's keys and values into cache row `row` (positions 0..len-1); its last position's raw logits
        (V,). The caller advances cache.lens."""
        h = self.net.hidden(torch.tensor([prompt], device=self.device), cache, slice(row, row + 1), [0])
        return self.net.logits(h[:, -1])[0]

    def decode(self, tokens, cache, start):
        """One token per cache row 0..len(tokens)-1, row b's at position start[b]: raw logits (B, V)."""
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        h = self.net.hidden(ids, cache, slice(0, len(tokens)), start)
        return self.net.logits(h[:, -1])

    def next_token(self, state, sampled):
        """One sample's next token: the tool's output while any is waiting in state.forced (`sampled` is ignored
        then, and may be None), else `sampled`. Returns (token, forced, call, stop): call is the tool call this
        token closed, or None (always None without the tool): the caller evaluates it with tool_tokens and queues
        the result on state.forced; stop says the sample ends with this token (a sampled stop token)."""
        tok, forced, call = state.next(sampled)
        return tok, forced, call if self.tool else None, tok in self.stop_ids and not forced

    def generate(self, prompt_ids, num_samples=1, max_tokens=256, *, temperature=1.0, top_k=None, top_p=None, seed=0):
        """Yields (tokens, forced), one step at a time (see the module docstring)."""
        # 1) check the request and clip it to the context
        prompt = self.check_prompt(prompt_ids)
        n = int(num_samples)
        if n < 1:
            raise UserError(f"num_samples must be at least 1, got {num_samples}")
        budget = min(int(max_tokens), self.max_context - len(prompt))
        if budget <= 0:
            return
        net, dev = self.net, self.device
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        # 2) prefill the prompt once into a one-row cache, then copy the row to every sample.
        # Inference mode only around the compute: a caller may train between our yields (RL)
        with torch.inference_mode():
            net.refresh()
            length = len(prompt) + budget
            if net.static:  # a CUDA graph per cache length: round lengths up so that few distinct ones occur
                length = min(self.max_context, -(-length // 256) * 256)
            cache = StaticCache(self.model.config, 1, length, dev, net.dtype, static=net.static)
            logits = self.prefill(prompt, cache)[None]
            cache.expand(n)
            logits = logits.expand(n, -1)
        states = [ToolState(self.python_ids) for _ in range(n)]
        done = [False] * n
        live = list(range(n))  # live[r] = the sample in cache row r
        pos = len(prompt)
        for step in range(budget):
            # 3) sample every live row, take each unfinished sample's next token (tool calls run right here)
            with torch.inference_mode():
                sampled = sample(logits, temperature, top_k=top_k, top_p=top_p, generator=gen,
                                 cap=self.softcap).tolist()
            tokens, forced = [None] * n, [False] * n
            for r, i in enumerate(live):
                if done[i]:
                    continue
                tokens[i], forced[i], call, done[i] = self.next_token(states[i], sampled[r])
                if call is not None:
                    states[i].forced.extend(self.tool_tokens(call))
            yield tokens, forced
            if step == budget - 1 or all(done):
                return
            # 4) drop the cache rows of finished samples once they are half the batch: they cost as much as live ones
            active = [r for r, i in enumerate(live) if not done[i]]
            if len(active) <= len(live) // 2:
                with torch.inference_mode():
                    cache.keep(active)
                live = [live[r] for r in active]
            # 5) decode the step's tokens (a finished sample still in the batch feeds <|bos|>, never read)
            with torch.inference_mode():
                logits = self.decode([tokens[i] if not done[i] else self.bos_id for i in live], cache,
                                     [pos] * len(live))
            pos += 1

    def generate_batch(self, prompt_ids, num_samples=1, max_tokens=256, *, temperature=1.0, top_k=None, top_p=None,
                       seed=0):
        """(sequences, masks): sequences[i] = prompt + completion i (with its stop token if produced); masks[i]
        is 0 on the prompt and on tool-forced tokens, 1 on sampled tokens."""
        prompt = self.check_prompt(prompt_ids)
        seqs = [list(prompt) for _ in range(num_samples)]
        masks = [[0] * len(prompt) for _ in range(num_samples)]
        for tokens, forced in self.generate(prompt, num_samples, max_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p, seed=seed):
            for i, tok in enumerate(tokens):
                if tok is not None:
                    seqs[i].append(tok)
                    masks[i].append(0 if forced[i] else 1)
        return seqs, masks

    @torch.inference_mode()
    def score(self, ids, top_n=0, chunk=256):
        """Log-probabilities of ids[1:] given what precedes each (one forward, no cache): a list of
        (logprob, [(token, logprob) x top_n]) for positions 1..len-1."""
        ids = [int(t) for t in ids]
        if len(ids) > self.max_context:
            raise UserError(f"{len(ids)} tokens exceed the model's context of {self.max_context}")
        self.net.refresh()
        h = self.net.hidden(torch.tensor([ids], device=self.device))[0]
        targets = torch.tensor(ids[1:], device=self.device)
        out = []
        for s in range(0, len(ids) - 1, chunk):
            lp = torch.log_softmax(softcap(self.net.logits(h[s:s + chunk]), self.softcap), dim=-1)
            e = s + lp.shape[0]
            chosen = lp.gather(1, targets[s:e, None])[:, 0].tolist()
            if top_n:
                tv, ti = torch.topk(lp, top_n, dim=-1)
                tops = [list(zip(a, b)) for a, b in zip(ti.tolist(), tv.tolist())]
            else:
                tops = [[] for _ in chosen]
            out.extend(zip(chosen, tops))
        return out[:len(ids) - 1]
