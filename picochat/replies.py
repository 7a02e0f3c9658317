"""Greedy chat replies and how to read them, for the fine-tuning stages (SFT's chat eval, RL's rewards and evals).

A reply is the list of tokens generated after <|assistant_start|>, ending in <|assistant_end|> when the model
closed its turn."""
import threading

from picochat.batching import Request, Scheduler
from picochat.engine import Engine

FORMAT_BAD = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")


def follows_format(tokenizer, completion):
    """Does a generated reply (the tokens after <|assistant_start|>) follow the chat format: some text, tool
    calls closed and followed by their output, no other role's tokens, and it ends with <|assistant_end|>."""
    S = tokenizer.special
    if not completion or completion[-1] != S("<|assistant_end|>") or len(completion) < 2:
        return False
    bad = {S(t) for t in FORMAT_BAD}
    state = "text"  # text -> (python_start) call -> (python_end) closed -> (output_start) output -> text
    for t in completion[:-1]:
        if t in bad or t == S("<|assistant_end|>"):
            return False
        if t == S("<|python_start|>"):
            if state != "text":
                return False
            state = "call"
        elif t == S("<|python_end|>"):
            if state != "call":
                return False
            state = "closed"
        elif t == S("<|output_start|>"):
            if state != "closed":
                return False
            state = "output"
        elif t == S("<|output_end|>"):
            if state != "output":
                return False
            state = "text"
        elif state == "closed":
            return False  # a call must be followed by its output
    return state == "text"


def reply_text(tokenizer, completion):
    """The text of a reply (tool calls and outputs included as their token strings), without <|assistant_end|>."""
    end = tokenizer.special("<|assistant_end|>")
    return tokenizer.decode([t for t in completion if t != end])


def greedy_replies(model, tokenizer, prompts, max_tokens, slots=32):
    """Greedy replies (completion token lists) to a list of conversations, with the Python tool live. The
    prompts are decoded together, `slots` at a time, by the engine's continuous-batching scheduler."""
    engine = Engine(model, tokenizer, tool=True)
    ids = [tokenizer.render_for_completion(conv) for conv in prompts]
    out = [[] for _ in ids]
    todo = [i for i, p in enumerate(ids) if len(p) < model.config.sequence_len]
    if not todo:
        return out
    finished = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if event[0] == "token":
                out[i].append(event[1])
            else:
                finished.release()
        return emit

    sched = Scheduler(engine, slots=min(slots, len(todo)), max_queue=len(todo)).start()
    try:
        for i in todo:
            sched.submit(Request(prompt=ids[i], max_tokens=max_tokens, temperature=0.0, emit=emitter(i)))
        for _ in todo:
            finished.acquire()
    finally:
        sched.stop()
    return out
