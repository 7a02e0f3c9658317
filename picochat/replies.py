"""Chat replies generated offline, in batches, and how to read them: for the chat evals (evaluate), SFT's chat eval
and RL's rewards and evals.

A reply is the list of tokens generated after <|assistant_start|>, ending in <|assistant_end|> when the model
closed its turn."""
import math
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
    """The text of a reply (tool calls and outputs included as their token strings) without its stop token: only
    trailing <|assistant_end|> and <|bos|> tokens go; one inside the reply stays in the text, so a reply that
    ended its turn and went on does not read as a clean one."""
    stops = {tokenizer.special("<|assistant_end|>"), tokenizer.bos_id}
    tokens = list(completion)
    while tokens and tokens[-1] in stops:
        tokens.pop()
    return tokenizer.decode(tokens)


def generate_all(engine, prompts, budgets, *, num_samples=1, temperature=0.0, top_k=None, seeds=None, slots=1,
                 progress=None):
    """Completions as token lists (the stop token included when produced): out[i][j] is sample j of prompts[i],
    at most budgets[i] tokens. slots=1: one prompt at a time through engine.generate_batch (one prefill, the
    samples decode together). slots>1: continuous batching of every (prompt, sample) pair over that many cache
    rows (picochat.batching.Scheduler): a finished row takes the next pair at once, so the batch stays full."""
    seeds = seeds or [0] * len(prompts)
    total = len(prompts) * num_samples
    if slots <= 1:
        out = []
        for p, b, s in zip(prompts, budgets, seeds):
            seqs, _ = engine.generate_batch(p, num_samples=num_samples, max_tokens=b, temperature=temperature,
                                            top_k=top_k, seed=s)
            out.append([list(q[len(p):]) for q in seqs])
            if progress:
                progress(len(out) * num_samples, total)
        return out
    out = [[[] for _ in range(num_samples)] for _ in prompts]
    state = {"left": total, "errors": []}
    cond = threading.Condition()

    def emitter(i, j):
        def emit(event):  # called on the scheduler thread
            if event[0] == "token":
                out[i][j].append(event[1])
                return
            with cond:
                if str(event[1]).startswith("error"):
                    state["errors"].append(event[1])
                state["left"] -= 1
                cond.notify_all()
        return emit

    sched = Scheduler(engine, slots=slots, max_queue=total).start()
    try:
        for i, (p, b, s) in enumerate(zip(prompts, budgets, seeds)):
            for j in range(num_samples):
                sched.submit(Request(prompt=list(p), max_tokens=b, temperature=temperature, top_k=top_k,
                                     seed=s * 1_000_003 + j, emit=emitter(i, j)))
        reported = 0
        with cond:
            while state["left"] > 0:
                cond.wait(timeout=2.0)
                done = total - state["left"]
                if progress and done - reported >= max(1, total // 10):
                    progress(done, total)
                    reported = done
    finally:
        sched.stop()
    if state["errors"]:
        raise RuntimeError(f"generation failed: {state['errors'][0]}")
    return out


def greedy_replies(model, tokenizer, prompts, max_tokens, slots=32):
    """Greedy replies (completion token lists) to a list of conversations, with the Python tool live, decoded
    together `slots` at a time by generate_all. A prompt that leaves no room in the model's context gets the empty
    reply (which scores as wrong); a generation that fails raises, as in generate_all, rather than scoring as a
    wrong reply."""
    engine = Engine(model, tokenizer, tool=True)
    ids = [tokenizer.render_for_completion(conv) for conv in prompts]
    out = [[] for _ in ids]
    todo = [i for i, p in enumerate(ids) if len(p) < model.config.sequence_len]
    if todo:
        replies = generate_all(engine, [ids[i] for i in todo], [max_tokens] * len(todo), slots=min(slots, len(todo)))
        for i, r in zip(todo, replies):
            out[i] = r[0]
    return out


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
