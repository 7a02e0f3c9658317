"""`picochat chat`: talk to a trained model in the terminal.

    picochat chat                          # the run trained most recently (its latest stage: rl, else sft, else base)
    picochat chat -p "What is 12 * 7?"     # one reply, then exit
    picochat chat --stage sft --temperature 0 --max-tokens 200
    picochat chat --checkpoint path/to/stage_folder --step 1200

Replies stream as they are generated. Tool calls show up as [python: expr] and the tool's answer as [output: ...]
(in colour on a terminal). In the conversation: /new starts over, /system TEXT sets a system prompt, /exit
quits (or Ctrl-D); Ctrl-C stops a reply. When the conversation outgrows the model's context, the oldest turns
are dropped (and a note says so). A base model has no chat format: with --stage base each prompt is
continued as plain text.
"""
import argparse
import os
import secrets
import sys

from picochat.checkpoint import add_model_args, load_chat_model
from picochat.common import UserError
from picochat.sandbox import describe_sandbox


class Style:
    """ANSI colours on a terminal (unless NO_COLOR is set), nothing otherwise."""

    def __init__(self, stream):
        on = stream.isatty() and not os.environ.get("NO_COLOR")
        self.tool = "\033[36m" if on else ""
        self.output = "\033[33m" if on else ""
        self.dim = "\033[2m" if on else ""
        self.reset = "\033[0m" if on else ""


def stream_reply(engine, prompt, args, seed, *, out=None, chat=True):
    """Generate one reply, writing it to out as it comes. Returns the reply as tokenizer content parts
    (text / python / python_output) and whether it was cut off (Ctrl-C)."""
    from picochat.engine import StreamDecoder
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced after import
    tok = engine.tokenizer
    S = tok.special
    ps, pe, os_, oe = S("<|python_start|>"), S("<|python_end|>"), S("<|output_start|>"), S("<|output_end|>")
    style = Style(out)
    dec = StreamDecoder(tok)
    parts, kind, interrupted = [], "text", False

    def write(text, kind_now):
        if not text:
            return
        if parts and parts[-1]["type"] == kind_now:
            parts[-1]["text"] += text
        else:
            parts.append({"type": kind_now, "text": text})
        out.write(text)
        out.flush()

    try:
        for tokens, _ in engine.generate(prompt, 1, args.max_tokens, temperature=args.temperature,
                                         top_k=args.top_k or None, top_p=args.top_p, seed=seed):
            t = tokens[0]
            if t is None:
                break
            if t in (ps, pe, os_, oe):
                write(dec.flush(), kind)
                if t == ps:
                    kind = "python"
                    parts.append({"type": "python", "text": ""})
                    out.write(f"{style.tool}[python: ")
                elif t == os_:
                    kind = "python_output"
                    parts.append({"type": "python_output", "text": ""})
                    out.write(f"{style.output}[output: ")
                else:
                    kind = "text"
                    out.write(f"]{style.reset}")
                out.flush()
                continue
            write(dec.feed(t), kind)
    except KeyboardInterrupt:
        interrupted = True
    write(dec.flush(), kind)
    if kind != "text":
        out.write(f"]{style.reset}")
    if interrupted:
        out.write(f" {style.dim}[stopped]{style.reset}")
    out.write("\n")
    out.flush()
    return [p for p in parts if p["text"] or p["type"] != "text"], interrupted


def fit_conversation(tokenizer, messages, budget):
    """Drop the oldest user/assistant pairs until the prompt leaves `budget` tokens. (prompt ids, dropped turns)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        prompt = tokenizer.render_for_completion(system + rest)
        if len(prompt) <= budget or len(rest) <= 1:
            return prompt, dropped
        rest = rest[2:]
        dropped += 1


def chat_cli(args):
    from picochat.engine import Engine
    if args.temperature < 0 or args.max_tokens < 1 or (args.top_k or 0) < 0:
        raise UserError("--temperature must be >= 0, --max-tokens >= 1 and --top-k >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    model, tokenizer, info = load_chat_model(args)
    engine = Engine(model, tokenizer, tool=not args.no_tool, compile=args.compile, dtype=info["dtype"])
    if engine.tool:
        print(describe_sandbox(), file=sys.stderr)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    ctx = engine.max_context
    base = info["stage"] == "base"

    def prompt_for(messages):
        if base:  # plain continuation: the model only knows documents
            ids = [tokenizer.bos_id] + tokenizer.encode(messages[-1]["content"])
            return ids[-(ctx - 1):], 0
        return fit_conversation(tokenizer, messages, ctx - min(args.max_tokens, ctx // 2))

    if args.prompt is not None:
        prompt, _ = prompt_for(_with_system(args.system, [{"role": "user", "content": args.prompt}]))
        stream_reply(engine, prompt, args, seed)
        return 0

    style = Style(sys.stdout)
    print(f"{style.dim}picochat: {info['description']}")
    print(f"trained on {info['trained_on']}")
    print("try: " + " | ".join(info["examples"]))
    print(f"{'continuing plain text (base model)' if base else 'chat'}; /new starts over, /system TEXT sets a "
          f"system prompt, /exit quits, Ctrl-C stops a reply{style.reset}")
    messages, system, turn = [], args.system, 0
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text in ("/new", "/clear"):
            messages = []
            print(f"{style.dim}(new conversation){style.reset}")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            messages = []
            print(f"{style.dim}(system prompt {'set' if system else 'cleared'}; new conversation){style.reset}")
            continue
        if text == "/help":
            print("/new  start over    /system TEXT  set the system prompt    /exit  quit")
            continue
        messages.append({"role": "user", "content": line})
        prompt, dropped = prompt_for(_with_system(system, messages))
        if dropped:
            messages = messages[2 * dropped:]
            print(f"{style.dim}(dropped the {dropped} oldest exchange(s) to fit the context){style.reset}")
        print()
        parts, _ = stream_reply(engine, prompt, args, seed + turn)
        turn += 1
        if base or not parts:
            messages = [] if base else messages[:-1]
            continue
        messages.append({"role": "assistant", "content": parts})


def _with_system(system, messages):
    return ([{"role": "system", "content": system}] if system else []) + messages


def add_parser(sub):
    p = sub.add_parser("chat", help="talk to a trained model in the terminal",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--prompt", default=None, help="reply to this one message and exit")
    p.add_argument("--system", default=None, help="system prompt (merged into the first user turn)")
    add_model_args(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    g.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    g.add_argument("--seed", type=int, default=None, help="makes the replies reproducible (default: random)")
    p.set_defaults(func=chat_cli)
