"""Byte-level BPE: trained with rustbpe, encoded with tiktoken, saved as plain files plus a HF tokenizer.json.

Also renders conversations to token ids and a loss mask: the one place that knows the chat format.
"""
import argparse
import base64
import hashlib
import json
from pathlib import Path

import tiktoken

from picochat.common import UserError, atomic_write_bytes, atomic_write_json

# GPT-4's split, but numbers split into runs of at most 2 digits (3 wastes vocab on number soup at small vocabs)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the pad token
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call written by the assistant
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced into the stream
]
RANKS_FILE, META_FILE, HF_FILE = "tokenizer.tiktoken", "tokenizer_meta.json", "tokenizer.json"


class Tokenizer:
    def __init__(self, mergeable_ranks: dict, pattern: str = SPLIT_PATTERN, name: str = "picochat"):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=specials)
        self.bos_id = specials["<|bos|>"]

    # ---- training, saving, loading -------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int, doc_cap: int = 10_000, max_chars: int = 2_000_000_000):
        """Train on an iterable of documents: each cropped to doc_cap characters, max_chars in all."""
        import rustbpe
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise UserError(f"--vocab-size {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} "
                            f"special tokens need at least {min_size}")
        seen = {"chars": 0}

        def capped():
            for doc in texts:
                doc = doc[:doc_cap]
                if seen["chars"] + len(doc) > max_chars:
                    doc = doc[:max_chars - seen["chars"]]
                seen["chars"] += len(doc)
                if doc:
                    yield doc
                if seen["chars"] >= max_chars:
                    return

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(capped(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        if seen["chars"] == 0:
            raise UserError("no text to train the tokenizer on (the documents were empty)")
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        return cls(ranks, bpe.get_pattern())

    def save(self, folder):
        folder = Path(folder)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in by_rank]
        atomic_write_bytes(folder / RANKS_FILE, ("\n".join(lines) + "\n").encode())
        atomic_write_json(folder / META_FILE, {"pattern": self.pattern, "special_tokens": SPECIAL_TOKENS,
                                              "vocab_size": self.vocab_size})
        atomic_write_bytes(folder / HF_FILE, self.to_hf().to_str(pretty=False).encode())

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        ranks_path, meta_path = folder / RANKS_FILE, folder / META_FILE
        if not ranks_path.exists() or not meta_path.exists():
            raise UserError(f"no tokenizer in {folder} (expected {RANKS_FILE} and {META_FILE}): "
                            f"run `picochat tokenizer train` first")
        meta = json.loads(meta_path.read_text())
        if meta.get("special_tokens") != SPECIAL_TOKENS:
            raise UserError(f"tokenizer in {folder} has different special tokens than this picochat version")
        ranks = {}
        for n, line in enumerate(ranks_path.read_text().splitlines(), 1):
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{ranks_path} line {n} is corrupt: expected '<base64 token> <rank>'") from None
        return cls(ranks, meta["pattern"])

    @property
    def hash(self):
        """Identifies the vocabulary: checkpoints record it so a model is never run with another tokenizer."""
        h = hashlib.sha256(self.pattern.encode())
        for b, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(len(b).to_bytes(2, "little") + b)
        h.update("".join(SPECIAL_TOKENS).encode())
        return h.hexdigest()[:16]

    # ---- encoding -----------------------------------------------------------------------------------
    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def special(self, name):
        return self.enc.encode_single_token(name)

    def encode(self, text, prepend_bos=False, num_threads=8):
        """str -> ids, or list[str] -> list of ids (threaded). Special-token text is treated as plain text."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [self.bos_id] + ids if prepend_bos else ids
        out = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend_bos:
            out = [[self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        """UTF-8 byte length of every token id (0 for specials): the denominator of bits per byte."""
        n = len(self.mergeable_ranks)
        lengths = [0] * self.vocab_size
        for b, r in self.mergeable_ranks.items():
            lengths[r] = len(b)
        assert all(i >= n or lengths[i] > 0 for i in range(self.vocab_size))
        return lengths

    # ---- chat ---------------------------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens=None):
        """Conversation -> (ids, mask). mask=1 on what the assistant writes (its text, its tool calls and
        <|assistant_end|>), 0 on everything else (bos, user turns, tool outputs, role tokens)."""
        messages = normalize_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        S = self.special
        add(self.bos_id, 0)
        for msg in messages:
            if msg["role"] == "user":
                add(S("<|user_start|>"), 0)
                add(self.encode(msg["content"]), 0)
                add(S("<|user_end|>"), 0)
                continue
            add(S("<|assistant_start|>"), 0)
            for part in msg["content"]:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(S("<|python_start|>"), 1)
                    add(self.encode(part["text"]), 1)
                    add(S("<|python_end|>"), 1)
                else:  # python_output: produced by the tool, never trained on
                    add(S("<|output_start|>"), 0)
                    add(self.encode(part["text"]), 0)
                    add(S("<|output_end|>"), 0)
            add(S("<|assistant_end|>"), 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt ids that ask the assistant for its next reply. A trailing assistant message is dropped."""
        messages = normalize_messages(conversation)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages})
        return ids + [self.special("<|assistant_start|>")]

    # ---- HF export ----------------------------------------------------------------------------------
    def to_hf(self):
        """The same tokenizer as a HF `tokenizers.Tokenizer` (byte-level BPE; ids identical to ours)."""
        from tokenizers import Tokenizer as HFTokenizer, Regex, AddedToken, models, pre_tokenizers, decoders
        byte_char = bytes_to_unicode()

        def to_str(b):
            return "".join(byte_char[x] for x in b)

        vocab = {to_str(b): r for b, r in self.mergeable_ranks.items()}
        merges = [(to_str(a), to_str(b)) for a, b in recover_merges(self.mergeable_ranks)]
        # ignore_merges: like tiktoken, a pre-token that is itself in the vocab maps straight to its id
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
        for s in SPECIAL_TOKENS:
            assert hf.token_to_id(s) == self.special(s)
        return hf


def normalize_messages(conversation):
    """Validate roles and merge a leading system message into the first user turn. Assistant content
    becomes a list of parts {type: text|python|python_output, text}. Raises UserError naming the problem."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise UserError("conversation has no messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise UserError(f"message {i} must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role == "system":
            if i != 0:
                raise UserError(f"message {i}: a system message may only come first")
            out.append({"role": "system", "content": _text(content, i)})
            continue
        expected = "user" if (len(out) - (1 if out and out[0]["role"] == "system" else 0)) % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise UserError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        if role != expected:
            raise UserError(f"message {i}: role {role!r} out of order, expected {expected!r} "
                            f"(user and assistant must alternate, starting with user)")
        if role == "user":
            out.append({"role": "user", "content": _text(content, i)})
        else:
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") in
                                                      ("text", "python", "python_output") and
                                                      isinstance(p.get("text"), str) for p in parts):
                raise UserError(f"message {i}: assistant content must be a string or a list of "
                                f"{{type: text|python|python_output, text}} parts")
            if not any(p["text"] for p in parts):
                raise UserError(f"message {i}: empty assistant turn")
            out.append({"role": "assistant", "content": parts})
    if out[0]["role"] == "system":
        if len(out) == 1:
            raise UserError("conversation has a system message but no user message")
        out[1] = {"role": "user", "content": out[0]["content"] + "\n\n" + out[1]["content"]}
        out = out[1:]
    return out


def _text(content, i):
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise UserError(f"message {i}: content must be a string")


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet of tokenizer.json)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def recover_merges(ranks: dict):
    """tiktoken stores ranks, HF wants merges: the merge that made token t is the split of t that BPE over the
    lower-ranked tokens reaches."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by merges")
        merges.append((parts[0], parts[1]))
    return merges


# ---- CLI -------------------------------------------------------------------------------------------------
EVAL_SAMPLES = {
    # held-out kinds of text that a web-prose tokenizer handles differently; written for this purpose
    "numbers": "In 2023 the budget rose from 1,234,567.89 to 9,876,543.21 dollars; 3.14159 x 2.71828 = 8.53973. "
               "Call 555-0142 before 10:45 on 12/03/2024. " * 4,
    "non-English": "Le chat dort sur le canapé depuis ce matin. Der schnelle braune Fuchs springt über den faulen "
                   "Hund. El niño come una manzana roja. Быстрая коричневая лиса прыгает через ленивую собаку. "
                   "敏捷的棕色狐狸跳过了懒狗。 素早い茶色の狐がのろまな犬を飛び越える。 " * 2,
}


def add_parser(sub):
    p = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer",
                       description="Byte-level BPE (GPT-4 split, 1-2 digit numbers), trained with rustbpe, "
                                   "encoded with tiktoken, saved to runs/<run>/tokenizer.")
    tsub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    t = tsub.add_parser("train", help="train on the training shards of a data folder")
    t.add_argument("--run", default="default",
                   help="run name: the tokenizer goes to $PICOCHAT_HOME/runs/<run>/tokenizer")
    t.add_argument("--data", default="", help="folder of parquet shards (default $PICOCHAT_HOME/data/pretrain)")
    t.add_argument("--out", default="", help="output folder (overrides --run)")
    t.add_argument("--vocab-size", type=int, default=32768, help="including the 9 special tokens")
    t.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters to train on")
    t.add_argument("--doc-cap", type=int, default=10_000, help="characters taken from each document")
    t.set_defaults(func=train_cli)
    e = tsub.add_parser("eval", help="bytes per token on held-out prose, code, numbers and non-English text")
    e.add_argument("--run", default="default")
    e.add_argument("--data", default="", help="data folder whose validation shard is the prose sample")
    e.add_argument("--tokenizer", default="", help="tokenizer folder (default runs/<run>/tokenizer)")
    e.set_defaults(func=eval_cli)


def _paths(args):
    from picochat.common import home_dir
    data = Path(args.data) if args.data else home_dir() / "data" / "pretrain"
    out = Path(getattr(args, "out", "") or getattr(args, "tokenizer", "")
               or home_dir() / "runs" / args.run / "tokenizer")
    return data, out


def train_cli(args):
    import time
    import pyarrow.parquet as pq
    from picochat.shards import split_shards
    data, out = _paths(args)
    train_files, _ = split_shards(data)

    def texts():
        for f in train_files:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()

    t0 = time.time()
    tok = Tokenizer.train(texts(), args.vocab_size, args.doc_cap, args.max_chars)
    tok.save(out)
    print(f"trained a {tok.vocab_size}-token tokenizer in {time.time() - t0:.1f}s -> {out}")
    return eval_cli(argparse.Namespace(run=args.run, data=str(data), tokenizer=str(out)))


def eval_cli(args):
    import inspect
    import pyarrow.parquet as pq
    from picochat.shards import split_shards
    data, folder = _paths(args)
    tok = Tokenizer.load(folder)
    samples = {}
    try:
        _, val = split_shards(data)
        prose = pq.ParquetFile(val[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
        samples["prose"] = "\n\n".join(prose[:200])
    except UserError:
        pass
    # Python's own standard library is code that exists on every machine
    samples["code"] = inspect.getsource(json)
    samples.update(EVAL_SAMPLES)
    print(f"{'text':<12} {'bytes':>9} {'tokens':>8} {'bytes/token':>12}")
    for kind, text in samples.items():
        n_bytes, n_tokens = len(text.encode()), len(tok.encode(text))
        print(f"{kind:<12} {n_bytes:>9,} {n_tokens:>8,} {n_bytes / max(1, n_tokens):>12.2f}")
    return 0
