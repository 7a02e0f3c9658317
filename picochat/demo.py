"""`picochat data demo`: the synthetic demo curriculum, written from templates and a seed.

No corpus ships with Python, so the demo preset trains on text this module writes: simple English about a
small generated world (people, towns, jobs, pets, objects), counting and small sums in prose, spelling facts,
and plain-text questions and answers in the shapes the chat model will see. Everything is short sentences over
a small vocabulary with heavy repetition, so a depth-4, vocab-4K model learns it on a 2-core CPU in minutes.
Same seed -> byte-identical files.

Layout under data/demo/ (same as data/):
    pretrain/shard_00000.parquet ...   prose (~30M characters at --scale 1); the last shard is validation
    sft/train.jsonl                    {"messages": [...], "source": ...}: word problems (assistant turns with
                                       python tool calls), spelling, world questions, greetings and identity
    eval/gsm8k/{train,test}.jsonl      word problems in GSM8K format {"question", "answer", "meta"}
    eval/spelling/{train,test}.jsonl   {"question", "answer", "meta"}; test = letter counting only
    eval/identity/train.jsonl          greeting and identity conversations {"messages": [...]}
    eval/chat/val.jsonl                conversations from the test sets, for an SFT validation loss
    demo.json                          seed, scale and counts
Every answer is checkable by code: check_answer(record, text) (and check_word_problem / check_spelling).
Test questions appear nowhere else (not in train, SFT or pretraining text).
"""
import argparse
import ast
import json
import operator
import random
import time
from pathlib import Path

from picochat.calculator import arithmetic_value, format_value
from picochat.common import UserError, atomic_write_bytes, atomic_write_json, replacing_dir
from picochat.shards import data_dir, write_shards
from picochat.tasks.gsm8k import CALC_RE, answer_to_parts, extract_answer

# What a model trained on this curriculum knows, and prompts in the shapes it learned (chat, serve and the
# speedrun show them, so that a user does not mistake "knows only this" for "broken")
ABOUT = ("the demo's synthetic curriculum only: simple stories about a made-up world, small arithmetic word "
         "problems (solved with the Python tool), spelling and letter counting, greetings; it knows nothing else")
EXAMPLES = ("Tom has 5 apples and buys 3 more. How many apples does he have now?",
            "How many r are in strawberry?", "Who are you?")


# ---- the world's vocabulary (kept small on purpose) ----------------------------------------------------------
NAMES = ("Tom Anna Ben Lily Sam Mia Max Emma Leo Zoe Jack Ella Noah Ava Finn Ruby Owen Ivy Luke Rosa Adam Nora "
         "Eli Jane Hugo Lucy Omar Sara Paul Kate Ivan Maya Theo Nina Carl Lena Dan Ada Ray Eve Otto Amy Kai June "
         "Ned Tess Gus Beth").split()
TOWNS = "Oakford Riverton Millbrook Stonehill Ashby Greenfield Lakeside Redwood Fairview Brookdale".split()
JOBS = [("baker", "bakes bread", "at the bakery"), ("farmer", "grows corn", "on the farm"),
        ("teacher", "teaches children", "at the school"), ("doctor", "helps sick people", "at the hospital"),
        ("fisher", "catches fish", "at the lake"), ("painter", "paints houses", "in town"),
        ("cook", "makes soup", "at the cafe"), ("driver", "drives the bus", "around town"),
        ("nurse", "cares for people", "at the hospital"), ("builder", "builds houses", "in town"),
        ("gardener", "grows flowers", "in the park"), ("librarian", "lends books", "at the library")]
THINGS = [("apple", "apples"), ("egg", "eggs"), ("book", "books"), ("cup", "cups"), ("ball", "balls"),
          ("pencil", "pencils"), ("coin", "coins"), ("shell", "shells"), ("flower", "flowers"),
          ("cookie", "cookies"), ("marble", "marbles"), ("sticker", "stickers"), ("card", "cards"),
          ("orange", "oranges"), ("stamp", "stamps"), ("candle", "candles")]
ANIMALS = [("cat", 4, "meow"), ("dog", 4, "woof"), ("hen", 2, "cluck"), ("cow", 4, "moo"), ("duck", 2, "quack"),
           ("horse", 4, "neigh"), ("sheep", 4, "baa"), ("bird", 2, "tweet"), ("frog", 4, "croak"),
           ("goat", 4, "bleat")]
COLORS = "red blue green yellow orange purple pink brown black white".split()
# words for spelling: short, common, and every letter of the alphabet somewhere
WORDS = sorted(set("""
cat dog sun hat cup pen box fox egg bed red bus map jam leg net pig rat van web yak zip ant bee cow owl hen
apple banana cherry grape lemon melon orange peach pear plum berry strawberry tomato potato carrot onion
bread butter cheese cookie candy honey juice milk water soup rice pizza salad sugar
house school garden window door table chair kitchen room floor wall roof bridge street market river lake
mountain forest island ocean beach desert valley village city town farm park library hospital bakery
teacher doctor farmer baker painter driver nurse builder gardener fisher cook pilot artist singer
happy sad big small fast slow hot cold warm soft hard loud quiet bright dark clean dirty early late
red blue green yellow purple pink brown black white gray
one two three four five six seven eight nine ten eleven twelve hundred
monday tuesday friday sunday morning evening night today summer winter spring autumn
rabbit turtle monkey tiger zebra giraffe elephant penguin dolphin whale horse sheep goat duck frog bird mouse
pencil paper letter stamp candle marble sticker shell flower ball book coin card basket bottle jacket
happy puzzle pillow mirror ladder hammer needle rocket guitar piano violin camera laptop phone robot
music story dream smile friend family mother father sister brother baby child people
jump run walk swim sing dance read write draw paint cook bake clean sleep laugh think listen
quick jazz quiz fizz buzz yellow queen question quilt kettle kitten knife knee zero xylophone
mississippi bookkeeper committee balloon coffee cookbook bubble giraffe success address assess
""".split()))

PROBLEM_TEST_SIZE = 500   # held-apart word problems (>= 500 so accuracy moves in 0.2% steps)
SPELLING_TEST_SIZE = 500
SHARD_CHARS = 8_000_000   # several small shards, so the demo exercises multi-shard loading
IDENTITY = {
    "name": "I am picochat, a small chat model.",
    "maker": "I was trained with picochat, an open-source stack for training your own small ChatGPT from scratch: "
             "a tokenizer, pretraining, fine-tuning and reinforcement learning.",
    "skills": "I can chat, answer questions about the little world I read about, solve small word problems "
              "with a Python tool, and spell words and count their letters.",
    "size": "I am very small: a few layers and a vocabulary of a few thousand tokens, so I know only a little.",
    "chatgpt": "No, I am picochat, a much smaller model. I was trained from scratch with picochat.",
    "training": "I first read a lot of simple text, then I learned to chat from example conversations, and then "
                "I practised word problems and got a reward for right answers.",
}


# ---- the world ------------------------------------------------------------------------------------------------
def make_world(rng):
    """People with fixed facts, so documents about them agree with each other (the model can learn them)."""
    people = []
    for i, name in enumerate(NAMES):
        job, does, place = JOBS[rng.randrange(len(JOBS))]
        animal = ANIMALS[rng.randrange(len(ANIMALS))][0]
        people.append({"name": name, "town": TOWNS[rng.randrange(len(TOWNS))], "job": job, "does": does,
                       "place": place, "pet": animal, "color": COLORS[rng.randrange(len(COLORS))],
                       "age": rng.randint(8, 70)})
    for p in people:  # one friend each, never oneself
        p["friend"] = rng.choice([q["name"] for q in people if q["name"] != p["name"]])
    return people


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _n(k, thing, things):
    return f"{k} {thing if k == 1 else things}"


def _times(n):
    return "1 time" if n == 1 else f"{n} times"


def person_facts(p):
    n = p["name"]
    return [f"{n} lives in {p['town']}.", f"{n} is {_a(p['job'])}.", f"Every day {n} {p['does']} {p['place']}.",
            f"{n} is {p['age']} years old.", f"{n} has a pet {p['pet']}.", f"{n} likes the color {p['color']}.",
            f"{n} is a friend of {p['friend']}."]


def world_qa(p, people, rng):
    """(question, answer) pairs about the world, always true."""
    n = p["name"]
    animal = next(a for a in ANIMALS if a[0] == p["pet"])
    neighbours = [q["name"] for q in people if q["town"] == p["town"]]
    pairs = [(f"Where does {n} live?", f"{n} lives in {p['town']}."),
             (f"What is {n}'s job?", f"{n} is {_a(p['job'])}."),
             (f"What does {n} do?", f"{n} is {_a(p['job'])}. Every day {n} {p['does']} {p['place']}."),
             (f"How old is {n}?", f"{n} is {p['age']} years old."),
             (f"What pet does {n} have?", f"{n} has a pet {p['pet']}."),
             (f"What is {n}'s favorite color?", f"{n} likes the color {p['color']}."),
             (f"Who is {n}'s friend?", f"{p['friend']} is a friend of {n}."),
             (f"Who lives in {p['town']}?", f"{_list(neighbours)} {'lives' if len(neighbours) == 1 else 'live'} "
                                           f"in {p['town']}."),
             (f"How many legs does a {animal[0]} have?", f"A {animal[0]} has {animal[1]} legs."),
             (f"What does a {animal[0]} say?", f"A {animal[0]} says {animal[2]}.")]
    return pairs[rng.randrange(len(pairs))]


# ---- word problems (GSM8K format) ----------------------------------------------------------------------------
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv}


def make_word_problem(rng, people):
    """A 1-3 step problem with small integers. Returns {"question", "answer", "meta"}: the answer is a worked
    solution whose <<expr=result>> steps are plain Python on integers (division is // and always exact), ending
    in '#### N'; meta holds the structure (start, ops) the answer can be recomputed from."""
    p = rng.choice(people)
    n, friend = p["name"], p["friend"]
    thing, things = THINGS[rng.randrange(len(THINGS))]
    steps = rng.choice((1, 2, 2, 3, 3))
    story, work, ops = [], [], []
    if rng.random() < 0.3:  # open with a product: bags of things
        start, k = rng.randint(2, 9), rng.randint(2, 9)
        story.append(rng.choice([f"{n} buys {start} bags of {things}. Each bag has {k} {things}.",
                                 f"{n} has {start} boxes with {k} {things} in each box."]))
        ops.append(("*", k))
        work.append(f"{n} has {start} * {k} = <<{start}*{k}={start * k}>>{start * k} {things}.")
        x = start * k
    else:
        start = x = rng.randint(2, 20)
        story.append(rng.choice([f"{n} has {x} {things}.", f"{n} had {x} {things} in the morning.",
                                 f"There are {x} {things} in {n}'s bag."]))
    while len(ops) < steps:
        feasible = ["+"] + (["-"] if x >= 2 else []) + (["*"] if x <= 40 else []) + \
                   (["//"] if any(x % d == 0 for d in range(2, 7) if x // d >= 1) else [])
        op = rng.choice(feasible)
        if op == "+":
            b = rng.randint(1, 20)
            story.append(rng.choice([f"{n} buys {b} more {things if b > 1 else thing}.",
                                     f"{friend} gives {n} {_n(b, thing, things)}.",
                                     f"{n} finds {b} more {things if b > 1 else thing}."]))
            line = f"{n} now has {x} + {b} = <<{x}+{b}={x + b}>>{x + b} {things}."
        elif op == "-":
            b = rng.randint(1, x - 1)
            story.append(rng.choice([f"{n} gives {_n(b, thing, things)} to {friend}.",
                                     f"{n} loses {_n(b, thing, things)}.",
                                     f"{n} sells {_n(b, thing, things)} at the market."]))
            line = f"{n} now has {x} - {b} = <<{x}-{b}={x - b}>>{_n(x - b, thing, things)}."
        elif op == "*":
            b = rng.randint(2, 5)
            story.append(rng.choice([f"Then {n} gets more {things} until {n} has {b} times as many as before.",
                                     f"The next day {n} has {b} times as many {things} as before."]))
            line = f"{n} now has {x} * {b} = <<{x}*{b}={x * b}>>{x * b} {things}."
        else:
            b = rng.choice([d for d in range(2, 7) if x % d == 0])
            story.append(rng.choice([f"{n} puts the {things} into {b} bags, the same number in each bag, "
                                     f"and keeps one bag.",
                                     f"{n} shares the {things} equally among {b} children, {n} and "
                                     f"{b - 1} {'friend' if b == 2 else 'friends'}, and keeps one share."]))
            line = f"{n} keeps {x} / {b} = <<{x}//{b}={x // b}>>{_n(x // b, thing, things)}."
        ops.append((op, b))
        work.append(line)
        x = OPS[op](x, b)
    question = " ".join(story) + " " + rng.choice([f"How many {things} does {n} have now?",
                                                   f"How many {things} does {n} have in the end?",
                                                   f"How many {things} does {n} have at the end?"])
    answer = "\n".join(work) + f"\n#### {x}"
    return {"question": question, "answer": answer,
            "meta": {"kind": "word_problem", "start": start, "ops": [list(o) for o in ops], "result": x}}


def solve(meta):
    """Recompute a word problem's answer from its structure."""
    x = meta["start"]
    for op, b in meta["ops"]:
        x = OPS[op](x, b)
    return x


# the demo's steps are integer + - * // only (division always exact): stricter than the tool, which
# also takes floats, / % ** and unary signs
_CALC_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)


def calc(expr):
    """The value of an integer + - * // expression, computed without eval() by the chat's python tool
    itself (calculator.arithmetic_value, in-process). Raises ValueError for anything else."""
    for node in ast.walk(ast.parse(expr, mode="eval")):
        if not (isinstance(node, _CALC_NODES) or (isinstance(node, ast.Constant) and type(node.value) is int)):
            raise ValueError(f"not a simple integer expression: {expr!r}")
    return arithmetic_value(expr)


def check_calculations(answer):
    """True if every <<expr=result>> step of a worked answer shows exactly what the python tool prints."""
    return all(format_value(calc(e)) == r for e, r in CALC_RE.findall(answer))


def strip_calculations(answer):
    """The worked answer as plain prose (the <<...>> annotations removed)."""
    return CALC_RE.sub("", answer)


def check_word_problem(record, answer_text):
    """True if answer_text's final answer ('#### N') is the problem's answer, recomputed from record['meta']."""
    return extract_answer(answer_text) == str(solve(record["meta"]))


# ---- spelling and letter counting ---------------------------------------------------------------------------
COUNT_TEMPLATES = ["How many {l} are in {w}?", "How many times does the letter {l} appear in {w}?",
                   "Count the letter {l} in the word {w}.", "How many {l}'s are in the word {w}?"]
SPELL_TEMPLATES = ["Spell the word {w}.", "How do you spell {w}?", "Can you spell {w}?"]


def spelled(word):
    return "-".join(word)


def count_answer(word, letter):
    c, tally = 0, []
    for ch in word:
        if ch == letter:
            c += 1
            tally.append(f"{ch}={c}")
        else:
            tally.append(ch)
    return (f"Let me spell {word}: {spelled(word)}.\nCounting {letter}: {', '.join(tally)}.\n"
            f"So the letter {letter} appears {_times(c)} in {word}.\n#### {c}")


def make_count_question(rng, word, letter):
    q = rng.choice(COUNT_TEMPLATES).format(l=letter, w=word)
    return {"question": q, "answer": count_answer(word, letter),
            "meta": {"kind": "spelling", "task": "count", "word": word, "letter": letter,
                     "count": word.count(letter)}}


def make_spell_question(rng, word):
    return {"question": rng.choice(SPELL_TEMPLATES).format(w=word), "answer": f"{word} is spelled {spelled(word)}.",
            "meta": {"kind": "spelling", "task": "spell", "word": word}}


def random_letter(rng, word):
    """Mostly a letter of the word, sometimes one it lacks (answer 0)."""
    if rng.random() < 0.75:
        return rng.choice(word)
    return rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])


def check_spelling(record, answer_text):
    m = record["meta"]
    if m["task"] == "count":
        return extract_answer(answer_text) == str(m["word"].count(m["letter"]))
    return spelled(m["word"]) in answer_text


def check_answer(record, answer_text):
    """Is answer_text a right answer to this demo record (word problem or spelling)?"""
    kind = record["meta"]["kind"]
    if kind == "word_problem":
        return check_word_problem(record, answer_text)
    if kind == "spelling":
        return check_spelling(record, answer_text)
    raise ValueError(f"unknown demo record kind {kind!r}")


# ---- greetings and identity -----------------------------------------------------------------------------------
GREETINGS = ["Hi", "Hello", "Hey", "Hi there", "Hello there", "Good morning", "Good evening", "Hey there", "Howdy"]
GREETING_REPLIES = ["Hello! I am picochat. How can I help you today?", "Hi! I'm picochat, a small chat model. "
                    "What can I do for you?", "Hello! What would you like to talk about?"]
IDENTITY_QUESTIONS = {
    "name": ["Who are you?", "What is your name?", "What are you?", "Tell me about yourself."],
    "maker": ["Who made you?", "Who built you?", "Where do you come from?"],
    "skills": ["What can you do?", "How can you help me?", "What are you good at?"],
    "size": ["How big are you?", "Are you a big model?"],
    "chatgpt": ["Are you ChatGPT?", "Are you GPT-4?"],
    "training": ["How were you trained?", "How did you learn?"],
}
CLOSINGS = [("Thank you!", "You are welcome!"), ("Thanks.", "You're welcome. Anything else?"),
            ("Bye!", "Goodbye! Have a nice day."), ("Nice to meet you.", "Nice to meet you too!")]


def make_identity_conversation(rng):
    msgs = []
    if rng.random() < 0.6:
        g = rng.choice(GREETINGS) + rng.choice(["!", ".", "", "!!"])
        if rng.random() < 0.3:
            name = rng.choice(NAMES)
            g += f" I am {name}."
            reply = f"Hello, {name}! Nice to meet you. I am picochat. How can I help you?"
        else:
            reply = rng.choice(GREETING_REPLIES)
        msgs += [{"role": "user", "content": g}, {"role": "assistant", "content": reply}]
    for _ in range(rng.choice((0, 1, 1, 2)) if msgs else rng.choice((1, 1, 2))):
        topic = rng.choice(sorted(IDENTITY_QUESTIONS))
        q = rng.choice(IDENTITY_QUESTIONS[topic])
        msgs += [{"role": "user", "content": q if rng.random() < 0.8 else q.lower()},
                 {"role": "assistant", "content": IDENTITY[topic]}]
    if rng.random() < 0.3:
        q, a = rng.choice(CLOSINGS)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


# ---- pretraining prose ------------------------------------------------------------------------------------------
def _qa_pair(rng, people, problem_gen, exclude_pairs):
    kind = rng.random()
    if kind < 0.35:
        return world_qa(rng.choice(people), people, rng)
    if kind < 0.6:
        pr = problem_gen()
        return pr["question"], strip_calculations(pr["answer"])
    if kind < 0.8:
        w = rng.choice(WORDS)
        letter = random_letter(rng, w)
        # a held-out (word, letter) pair becomes a spelling question instead
        pr = make_spell_question(rng, w) if (w, letter) in exclude_pairs else make_count_question(rng, w, letter)
        return pr["question"], pr["answer"]
    if kind < 0.9:
        topic = rng.choice(sorted(IDENTITY_QUESTIONS))
        return rng.choice(IDENTITY_QUESTIONS[topic]), IDENTITY[topic]
    return rng.choice(GREETINGS) + "!", rng.choice(GREETING_REPLIES)


def make_document(rng, people, problem_gen, exclude_pairs):
    """One pretraining document of a random kind, a few hundred to ~1,500 characters."""
    r = rng.random()
    if r < 0.22:  # a person: facts and a little story with counting
        p = rng.choice(people)
        facts = person_facts(p)
        rng.shuffle(facts)
        out = facts[:rng.randint(4, 7)]
        for _ in range(rng.randint(1, 3)):
            thing, things = THINGS[rng.randrange(len(THINGS))]
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            out.append(f"One day {p['name']} went to the market in {p['town']} and bought {_n(a, thing, things)}. "
                       f"Then {p['name']} bought {b} more. Now {p['name']} had {a + b} {things}.")
        return " ".join(out)
    if r < 0.3:  # a town
        t = rng.choice(TOWNS)
        who = [p for p in people if p["town"] == t]
        out = [f"{t} is a small town."]
        if who:
            out.append(f"{len(who)} of our friends live in {t}: {_list([p['name'] for p in who])}.")
            for p in who:
                out.append(f"{p['name']} is {_a(p['job'])} and has a pet {p['pet']}.")
        else:
            out.append(f"None of our friends live in {t}.")
        return " ".join(out)
    if r < 0.45:  # counting stories
        out = []
        for _ in range(rng.randint(3, 6)):
            p = rng.choice(people)
            thing, things = THINGS[rng.randrange(len(THINGS))]
            a = rng.randint(2, 20)
            b = rng.randint(1, a - 1)
            c = rng.randint(2, 5)
            out.append(rng.choice([
                f"{p['name']} has {a} {things}. {p['friend']} gives {p['name']} {b} more. "
                f"Now {p['name']} has {a} + {b} = {a + b} {things}.",
                f"{p['name']} has {a} {things}. {p['name']} gives {_n(b, thing, things)} to {p['friend']}. "
                f"Now {p['name']} has {a} - {b} = {_n(a - b, thing, things)}.",
                f"There are {c} baskets. Each basket has {a} {things}. "
                f"So there are {c} * {a} = {c * a} {things} in all.",
                f"{p['name']} shares {a * c} {things} equally among {c} friends. Each friend gets "
                f"{a * c} / {c} = {a} {things}."]))
        return " ".join(out)
    if r < 0.55:  # arithmetic facts
        out = []
        for _ in range(rng.randint(8, 16)):
            a, b = rng.randint(0, 20), rng.randint(1, 12)
            out.append(rng.choice([f"{a} plus {b} is {a + b}.", f"{a} + {b} = {a + b}.",
                                   f"{a + b} minus {b} is {a}.", f"{a + b} - {b} = {a}.",
                                   f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}.",
                                   f"{a * b} divided by {b} is {a}.", f"{a * b} / {b} = {a}."]))
        return " ".join(out)
    if r < 0.7:  # spelling facts
        out = []
        for _ in range(rng.randint(5, 9)):
            w = rng.choice(WORDS)
            out.append(f"The word {w} is spelled {spelled(w)}. It has {len(w)} letters. "
                       f"It starts with {w[0]} and ends with {w[-1]}.")
            letter = rng.choice(w)
            if (w, letter) not in exclude_pairs:
                out.append(f"The letter {letter} appears {_times(w.count(letter))} in {w}.")
        return " ".join(out)
    # plain-text questions and answers, in the shapes of the chat format
    out = []
    user, asst = rng.choice([("Question", "Answer"), ("Q", "A"), ("User", "Assistant")])
    for _ in range(rng.randint(3, 6)):
        q, a = _qa_pair(rng, people, problem_gen, exclude_pairs)
        out.append(f"{user}: {q}\n{asst}: {a}")
    return "\n\n".join(out)


# ---- the whole curriculum ---------------------------------------------------------------------------------------
def _jsonl(path, rows):
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def generate(out, seed=0, scale=1.0, pretrain_chars=30_000_000):
    """Write the curriculum into the folder out (pretrain/, sft/, eval/, demo.json). Returns the counts."""
    if scale <= 0:
        raise UserError(f"--scale must be positive, got {scale}")
    out = Path(out)
    people = make_world(random.Random(f"{seed}-world"))
    n_problems, n_spelling = max(50, round(5000 * scale)), max(50, round(5000 * scale))

    # word problems: test first, then train from the same generator, rejecting every test question
    prng = random.Random(f"{seed}-problems")
    test, seen = [], set()
    while len(test) < PROBLEM_TEST_SIZE:
        pr = make_word_problem(prng, people)
        if pr["question"] not in seen:
            seen.add(pr["question"])
            test.append(pr)
    test_questions = set(seen)

    def fresh_problem(r=prng):
        while True:
            pr = make_word_problem(r, people)
            if pr["question"] not in test_questions:
                return pr

    train = [fresh_problem() for _ in range(n_problems)]

    # spelling: test pairs (word, letter) are never asked, or stated, anywhere else
    srng = random.Random(f"{seed}-spelling")
    pairs = sorted({(w, c) for w in WORDS for c in "abcdefghijklmnopqrstuvwxyz"})
    present = [p for p in pairs if p[1] in p[0]]
    absent = [p for p in pairs if p[1] not in p[0]]
    srng.shuffle(present)
    srng.shuffle(absent)
    n_abs = SPELLING_TEST_SIZE // 5
    test_pairs = present[:SPELLING_TEST_SIZE - n_abs] + absent[:n_abs]
    srng.shuffle(test_pairs)
    exclude = set(test_pairs)
    spell_test = [make_count_question(srng, w, c) for w, c in test_pairs]
    train_pairs = present[SPELLING_TEST_SIZE - n_abs:] + absent[n_abs:n_abs + len(present) // 3]
    spell_train = []
    for _ in range(n_spelling):
        if srng.random() < 0.2:
            spell_train.append(make_spell_question(srng, srng.choice(WORDS)))
        else:
            spell_train.append(make_count_question(srng, *train_pairs[srng.randrange(len(train_pairs))]))

    irng = random.Random(f"{seed}-identity")
    identity = [make_identity_conversation(irng) for _ in range(max(50, round(1000 * scale)))]

    # the SFT mix
    crng = random.Random(f"{seed}-chat")
    world_convs = []
    for _ in range(max(50, round(2000 * scale))):
        msgs = []
        for _ in range(crng.choice((1, 1, 2, 3))):
            q, a = world_qa(crng.choice(people), people, crng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        world_convs.append({"messages": msgs})
    sft = ([_problem_chat(p, "word_problem") for p in train] + [_problem_chat(s, "spelling") for s in spell_train] +
           [dict(c, source="identity") for c in identity] + [dict(c, source="world") for c in world_convs])
    crng.shuffle(sft)
    val = [_problem_chat(p, "word_problem") for p in test[:200]] + \
          [_problem_chat(s, "spelling") for s in spell_test[:200]]

    # pretraining prose
    drng = random.Random(f"{seed}-pretrain")
    docs, chars, target = [], 0, int(pretrain_chars * scale)
    gen = random.Random(f"{seed}-pretrain-problems")
    while chars < target:
        d = make_document(drng, people, lambda: fresh_problem(gen), exclude)
        docs.append(d)
        chars += len(d)
    drng.shuffle(docs)

    tmp = out / "pretrain"
    shards = write_shards(docs, tmp, SHARD_CHARS)
    _jsonl(out / "sft" / "train.jsonl", sft)
    _jsonl(out / "eval" / "gsm8k" / "train.jsonl", train)
    _jsonl(out / "eval" / "gsm8k" / "test.jsonl", test)
    _jsonl(out / "eval" / "spelling" / "train.jsonl", spell_train)
    _jsonl(out / "eval" / "spelling" / "test.jsonl", spell_test)
    _jsonl(out / "eval" / "identity" / "train.jsonl", identity)
    _jsonl(out / "eval" / "chat" / "val.jsonl", val)
    counts = {"seed": seed, "scale": scale, "pretrain_docs": len(docs), "pretrain_chars": chars,
              "pretrain_shards": len(shards), "sft_conversations": len(sft), "word_problems_train": len(train),
              "word_problems_test": len(test), "spelling_train": len(spell_train), "spelling_test": len(spell_test),
              "identity": len(identity), "chat_val": len(val)}
    atomic_write_json(out / "demo.json", counts)
    return counts


def _problem_chat(record, source):
    """A demo record as a conversation: word problems call the Python tool for every <<expr=result>> step."""
    content = answer_to_parts(record["answer"]) if source == "word_problem" else record["answer"]
    return {"messages": [{"role": "user", "content": record["question"]},
                         {"role": "assistant", "content": content}], "source": source}


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("demo", help="write the offline synthetic demo curriculum (no network needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size multiplier: 1.0 = ~30M characters of prose and ~13K SFT conversations")
    p.add_argument("--out", default="", help="output folder (default $PICOCHAT_HOME/data/demo)")
    p.set_defaults(func=demo_cli)


def build(out=None, seed=0, scale=1.0):
    """Generate the curriculum into out (default data/demo) atomically: written to a temp folder beside it and
    swapped in at the end, replacing an older one. Returns (out, counts); counts is also out/demo.json."""
    out = Path(out) if out else data_dir(demo=True)
    with replacing_dir(out) as tmp:
        counts = generate(tmp, seed, scale)
    return out, counts


def demo_cli(args):
    t0 = time.time()
    out, counts = build(args.out or None, args.seed, args.scale)
    print(f"demo curriculum (seed {args.seed}, scale {args.scale}) in {out} in {time.time() - t0:.1f}s: "
          f"{counts['pretrain_chars'] / 1e6:.1f}M characters in {counts['pretrain_shards']} shards, "
          f"{counts['sft_conversations']:,} SFT conversations, {counts['word_problems_test']} held-out word "
          f"problems, {counts['spelling_test']} held-out spelling questions")
    return 0
