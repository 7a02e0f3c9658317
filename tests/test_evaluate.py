import gzip
import json
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

from picochat import checkpoint
from picochat.cli import main
from picochat.common import home_dir
from picochat.evaluate import (choice_predictions, run_chat_task, chat_tasks, chatcore,
                               select_chat_tasks, letter_ids)
from picochat.model import GPT, GPTConfig
from picochat.replies import generate_all, reply_text
from picochat.tasks import arc, mmlu, gsm8k, spelling, humaneval
from picochat.tasks.common import mc_user_message
from picochat.tokenizer import Tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


def random_model(vocab, seq_len=256, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab, sequence_len=seq_len, head_dim=32)).init_weights(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 if p.ndim > 1 else 0.2)
    return model.eval()


class Favour(nn.Module):
    """Wraps the head: adds a bonus to some token ids, so the model 'prefers' those letters."""

    def __init__(self, head, bonus):
        super().__init__()
        self.head, self.bonus = head, bonus

    def forward(self, h):
        out = self.head(h)
        for tid, b in self.bonus.items():
            out[..., tid] += b
        return out


# ---- multiple choice ----------------------------------------------------------------------------------
ITEM = {"question": "What is 2+2?", "choices": ["3", "4", "5", "22"], "answer": 1}


def test_multiple_choice_prompt_rendering(tok):
    assert mc_user_message(ITEM["question"], ITEM["choices"]) == (
        "What is 2+2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\nAnswer with the letter of the correct choice (A, B, C or D).")
    ids = tok.render_for_completion(arc.prompt(ITEM))
    assert ids[0] == tok.bos_id and ids[-1] == tok.special("<|assistant_start|>")
    assert tok.decode(ids) == ("<|bos|><|user_start|>" + mc_user_message(ITEM["question"], ITEM["choices"]) +
                               "<|user_end|><|assistant_start|>")
    # the training conversation answers with the letter alone, and only the letter (and the end) is trained on
    conv_ids, mask = tok.render_conversation(mmlu.conversation(ITEM))
    assert conv_ids[:len(ids)] == ids and tok.decode([i for i, m in zip(conv_ids, mask) if m]) == "B<|assistant_end|>"
    assert arc.letters({"choices": ["a", "b", "c"]}) == ["A", "B", "C"] and arc.answer_letter(ITEM) == "B"
    assert arc.check(ITEM, " B") and not arc.check(ITEM, "C") and not arc.check(ITEM, "")
    five = mc_user_message("Q?", ["a", "b", "c", "d", "e"])
    assert "E. e" in five and "(A, B, C, D or E)" in five


def test_letter_argmax_follows_a_patched_model(tok, data_root):
    items = arc.load("ARC-Easy", "test", root=data_root)[:24]
    model = random_model(tok.vocab_size)
    A, B, C, D, E = letter_ids(tok, "ABCDE")
    model.lm_head = Favour(model.lm_head, {C: 50.0})
    preds = choice_predictions(model, tok, arc, items, CPU, batch_size=5)
    assert preds == [2] * len(items)
    # a letter the item does not offer can never win: E is strongest, B next, so 4-way items answer B
    model.lm_head.bonus = {E: 80.0, B: 50.0}
    four = [it for it in items if len(it["choices"]) == 4]
    assert choice_predictions(model, tok, arc, four, CPU, batch_size=7) == [1] * len(four)
    # accuracy of "always C" is the share of items whose answer is C
    model.lm_head.bonus = {C: 50.0}
    task = chat_tasks()["arc-easy"]
    r = run_chat_task(task, model, tok, CPU, items, batch_size=4)
    share = sum(it["answer"] == 2 for it in items) / len(items)
    assert r["total"] == len(items) and math.isclose(r["accuracy"], share)
    assert math.isclose(r["centered"], (share - 0.25) / 0.75)


def test_batched_letters_match_one_at_a_time(tok, data_root):
    items = mmlu.load("test", root=data_root)[::6][:20]  # many subjects: prompt lengths vary
    model = random_model(tok.vocab_size, seq_len=512)
    batched = choice_predictions(model, tok, mmlu, items, CPU, batch_size=8)
    letters = letter_ids(tok, "ABCD")
    for it, got in zip(items, batched):
        ids = tok.render_for_completion(mmlu.prompt(it))[-512:]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        assert got == int(logits[letters].argmax())
    assert len(set(batched)) > 1


# ---- generative tasks -------------------------------------------------------------------------------
def test_gsm8k_answer_extraction():
    item = {"question": "q", "answer": "She has 1000 + 234 = <<1000+234=1234>>1234 apples.\n#### 1,234"}
    assert gsm8k.reference(item) == "1234"
    assert gsm8k.check(item, "so the answer is\n#### 1234")
    assert gsm8k.check(item, "<|python_start|>1000+234<|python_end|><|output_start|>1234<|output_end|>\n#### 1,234")
    assert not gsm8k.check(item, "#### 1235") and not gsm8k.check(item, "1234") and not gsm8k.check(item, "")
    assert gsm8k.check({"answer": "#### -5"}, "#### -5") and not gsm8k.check({"answer": "#### -5"}, "#### 5")
    assert gsm8k.check({"answer": "#### 3.50"}, "#### 3.5")


def test_gsm8k_training_conversation_calls_the_tool(tok, data_root):
    item = gsm8k.load("train", root=data_root)[0]
    conv = gsm8k.conversation(item)
    parts = conv["messages"][1]["content"]
    assert [p["type"] for p in parts[:4]] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24"
    ids, mask = tok.render_conversation(conv)
    out = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(out).count("<|output_start|>24<|output_end|>") == 1  # tool output is not trained on


class FakeEngine:
    """Stands in for picochat.engine.Engine: returns canned replies, one list per call."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, list(replies), []

    def generate_batch(self, prompt_ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None,
                       seed=0):
        self.calls.append(dict(num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, seed=seed))
        texts = self.replies.pop(0)
        assert len(texts) == num_samples
        end = self.tok.special("<|assistant_end|>")
        seqs = [list(prompt_ids) + self.tok.encode(t) + [end] for t in texts]
        return seqs, [[0] * len(prompt_ids) + [1] * (len(s) - len(prompt_ids)) for s in seqs]


def test_generative_task_pass_at_k_with_a_fake_engine(tok):
    items = [{"question": "a", "answer": "#### 72"}, {"question": "b", "answer": "#### 5"},
             {"question": "c", "answer": "#### 0"}]
    engine = FakeEngine(tok, [["#### 72", "#### 71"], ["x #### 5", "#### 5"], ["no idea", "#### 1"]])
    task = chat_tasks()["gsm8k"]
    model = random_model(tok.vocab_size, seq_len=64)
    r = run_chat_task(task, model, tok, CPU, items, engine=engine, num_samples=2, temperature=0.7, max_tokens=30,
                      batch_size=1)
    assert r["pass@1"] == pytest.approx((0.5 + 1 + 0) / 3) and r["accuracy"] == pytest.approx(2 / 3)
    assert r["total"] == 3 and r["centered"] == pytest.approx(2 / 3)
    assert all(c["num_samples"] == 2 and c["temperature"] == 0.7 and c["max_tokens"] <= 30 for c in engine.calls)


def test_spelling_from_a_word_list(tmp_path, data_root):
    words = gzip.decompress((data_root / "english_words" / "words_alpha.txt.gz").read_bytes())
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "words_alpha.txt").write_bytes(words)
    test, train = spelling.load("test", root=tmp_path, n=300), spelling.load("train", root=tmp_path, n=300)
    assert spelling.load("test", root=tmp_path, n=300) == test  # deterministic
    assert not {t["meta"]["word"] for t in test} & {t["meta"]["word"] for t in train}
    item = test[0]
    m = item["meta"]
    assert m["word"] in item["question"] and m["count"] == m["word"].count(m["letter"])
    assert spelling.check(item, item["answer"]) and spelling.check(item, f"#### {m['count']}")
    assert not spelling.check(item, f"#### {m['count'] + 1}")
    assert spelling.conversation(item)["messages"][1]["content"].endswith(f"#### {m['count']}")


def test_humaneval_runs_in_the_sandbox(data_root):
    item = humaneval.load("example_problem", root=data_root)[0]
    assert humaneval.check(item, item["prompt"] + item["canonical_solution"])  # a whole definition
    assert humaneval.check(item, "    return 1\n")                               # a body that continues the prompt
    assert humaneval.check(item, "Here it is:\n```python\ndef return1():\n    return 1\n```\nDone.")
    assert not humaneval.check(item, "```python\ndef return1():\n    return 2\n```")
    assert not humaneval.check(item, "    import os; os._exit(0)\n")  # exiting with status 0 before the tests
    assert not humaneval.check(item, "    while True: pass\n", timeout=1.0)


# ---- the command ---------------------------------------------------------------------------------------
@pytest.fixture
def chat_checkpoint(tok):
    model = random_model(tok.vocab_size, seq_len=512)
    folder = home_dir() / "runs" / "t" / "sft"
    checkpoint.save_checkpoint(folder, 3, model, meta={"stage": "sft"}, tokenizer=tok)
    return folder


def test_eval_chat_command_accumulates_tasks(chat_checkpoint, data_root, capsys):
    rc = main(["eval", "chat", "-t", "ARC-Easy,mmlu", "--run", "t", "--max-problems", "12", "--data",
               str(data_root), "--device", "cpu", "--batch-size", "5"])
    assert rc == 0
    out = json.loads((chat_checkpoint / "eval_chat.json").read_text())
    assert set(out["tasks"]) == {"ARC-Easy", "MMLU"} and out["step"] == 3
    assert all(r["total"] == 12 for r in out["tasks"].values())
    assert out["chatcore"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / 2)
    # a second task joins the first ones; 'all' picks the tasks whose data exists (no GSM8K test here)
    assert main(["eval", "chat", "-t", "all", "--run", "t", "--max-problems", "4", "--data", str(data_root)]) == 0
    out = json.loads((chat_checkpoint / "eval_chat.json").read_text())
    assert set(out["tasks"]) == {"ARC-Easy", "ARC-Challenge", "MMLU"} and out["chatcore_label"] == "ChatCORE (3 tasks)"
    assert main(["eval", "chat", "-t", "nonsense", "--run", "t"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_eval_chat_demo_tasks_through_the_engine(chat_checkpoint, tok, monkeypatch):
    problems = [{"question": f"Tom has {n} apples and buys 2 more. How many apples does Tom have now?",
                 "answer": f"Tom has {n} + 2 = <<{n}+2={n + 2}>>{n + 2} apples.\n#### {n + 2}"} for n in range(4)]
    root = home_dir() / "data" / "demo" / "eval" / "gsm8k"
    root.mkdir(parents=True)
    (root / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    replies = [[p["answer"]] if i % 2 == 0 else ["#### 0"] for i, p in enumerate(problems)]
    fake = types.ModuleType("picochat.engine")
    fake.Engine = lambda model, tokenizer, tool=True: FakeEngine(tokenizer, replies)
    monkeypatch.setitem(sys.modules, "picochat.engine", fake)
    assert select_chat_tasks("demo")[0].name == "DemoProblems"
    assert main(["eval", "chat", "-t", "DemoProblems", "--run", "t", "--batch-size", "1"]) == 0
    out = json.loads((chat_checkpoint / "eval_chat.json").read_text())
    assert out["tasks"]["DemoProblems"]["accuracy"] == 0.5 and out["chatcore"] == 0.5
    assert chatcore(out["tasks"]) == 0.5


def test_eval_chat_with_the_real_engine(chat_checkpoint):
    root = home_dir() / "data" / "demo" / "eval"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(
        {"question": f"What is {n} + 1?", "answer": f"{n} + 1 = <<{n}+1={n + 1}>>{n + 1}\n#### {n + 1}"}) + "\n"
        for n in range(3)))
    assert main(["eval", "chat", "-t", "DemoProblems", "--run", "t", "-k", "2", "--max-tokens", "6"]) == 0
    r = json.loads((chat_checkpoint / "eval_chat.json").read_text())["tasks"]["DemoProblems"]
    assert r["total"] == 3 and r["num_samples"] == 2 and r["temperature"] == 1.0 and 0 <= r["accuracy"] <= 1


def test_continuous_batching_matches_one_prompt_at_a_time(tok):
    from picochat.engine import Engine
    model = random_model(tok.vocab_size, seq_len=64)
    engine = Engine(model, tok, tool=True)
    prompts = [tok.render_for_completion(gsm8k.prompt({"question": q})) for q in
               ["What is 2 + 3?", "Tom has 5 apples and eats 2. How many are left?", "Hi", "Count to ten, please."]]
    budgets = [12, 5, 9, 1]
    one = generate_all(engine, prompts, budgets, slots=1)
    many = generate_all(engine, prompts, budgets, slots=3)  # fewer rows than prompts: rows are reused
    assert one == many and all(1 <= len(o[0]) <= b for o, b in zip(many, budgets))
    assert len(one[3][0]) == 1
    sampled = generate_all(engine, prompts, budgets, num_samples=3, temperature=1.0, seeds=[1, 2, 3, 4], slots=4)
    assert [len(s) for s in sampled] == [3] * 4 and all(len(c) <= b for s, b in zip(sampled, budgets) for c in s)
    end = tok.special("<|assistant_end|>")
    assert reply_text(tok, tok.encode("#### 5") + [end]) == "#### 5"


def test_eval_base_auto_batch_is_8_rows_on_cpu(tok, data_root, capsys):
    """--device-batch-size auto (the default) sizes the bits-per-byte batches from fastpath's estimate: on a CPU
    8 rows, so the number is the one an explicit 8 gives (the demo's numbers stay as they were)."""
    folder = home_dir() / "runs" / "t" / "base"
    checkpoint.save_checkpoint(folder, 1, random_model(tok.vocab_size, seq_len=128), meta={"stage": "base"},
                               tokenizer=tok)
    args = ["eval", "base", "--run", "t", "--skip-core", "--data", str(data_root / "webtext" / "shards"),
            "--eval-tokens", "4096", "--device", "cpu"]
    bpb = {}
    for batch in ("auto", "8"):
        assert main(args + ["--device-batch-size", batch]) == 0
        bpb[batch] = json.loads((folder / "eval_base.json").read_text())["val_bpb"]
    assert "bits per byte in batches of 8 rows (auto: cpu, no probe" in capsys.readouterr().out
    assert bpb["auto"] == bpb["8"]
