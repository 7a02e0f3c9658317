"""The tasks' readers of the published data sets (picochat/tasks/*.py, and CORE's bundle in picochat/core.py) on
real files, and the strict reader of a user's own conversations (tasks/chat.py)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.core import read_core_bundle, read_core_task
from picochat.tasks.arc import read_arc
from picochat.common import UserError
from picochat.tasks import chat
from picochat.tasks.chat import read_conversations, read_smoltalk, to_messages
from picochat.tasks.gsm8k import extract_answer, read_gsm8k
from picochat.tasks.humaneval import read_humaneval
from picochat.tasks.mmlu import read_mmlu
from picochat.tasks.spelling import read_words


# ---- readers on the real files --------------------------------------------------------------------------------


def test_read_conversations_sharegpt_and_hh(shared_data):
    from picochat.tokenizer import normalize_messages
    convs, skipped = read_conversations(shared_data / "chat_sft" / "sharegpt_en.jsonl.gz")
    assert len(convs) == 11080 and skipped == {}
    for c in convs[:2000]:
        normalize_messages(c)
    hh, skipped = read_conversations(shared_data / "chat_sft" / "hh_rlhf_harmless_test.jsonl.gz")
    assert len(hh) + sum(skipped.values()) == 2312 and len(hh) > 2000
    for c in hh:
        normalize_messages(c)


def test_to_messages_fixes_and_skips():
    msgs, why = to_messages([{"from": "system", "value": "sys"}, {"from": "gpt", "value": "stray"},
                                  {"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                  {"from": "gpt", "value": ""}, {"from": "gpt", "value": "c"},
                                  {"from": "human", "value": "dangling"}])
    assert why is None and msgs == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a\n\nb"},
                                    {"role": "assistant", "content": "c"}]
    assert to_messages([{"from": "tool", "value": "x"}])[1] == "unknown role"
    assert to_messages([{"from": "human", "value": "x"}])[1] == "no user/assistant exchange"


def test_read_smoltalk_parquet(tmp_path):
    p = tmp_path / "train-00000.parquet"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "source": "s"},
            {"messages": [{"role": "user", "content": "no answer"}], "source": "s"}]
    pq.write_table(pa.Table.from_pylist(rows), p)
    convs, skipped = read_smoltalk(p)
    assert convs == [{"messages": rows[0]["messages"]}] and skipped == {"no user/assistant exchange": 1}


# ---- a user's own conversations (sft --data) ---------------------------------------------------------------
SYSTEM, QUESTION, ANSWER = "Answer in one word.", "What colour is the sky?", "Blue."
OPENAI = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
          {"role": "assistant", "content": ANSWER}]
SHAREGPT = [{"from": "system", "value": SYSTEM}, {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]


def write_lines(path, rows):
    """rows: objects (written as JSON) or raw strings (written as they are), one a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_format_reads_as_the_same_conversation(tmp_path):
    """OpenAI messages, ShareGPT turns and the chosen side of a preference pair (whole, or a prompt and a chosen
    reply, as lists or strings) are one conversation, as the tokenizer renders it."""
    rows = [{"messages": OPENAI},
            {"conversations": SHAREGPT, "id": "x"},
            {"chosen": OPENAI, "rejected": OPENAI[:2] + [{"role": "assistant", "content": "Green."}]},
            {"prompt": OPENAI[:2], "chosen": [OPENAI[2]], "rejected": [{"role": "assistant", "content": "Red."}]},
            {"prompt": OPENAI[:2], "chosen": ANSWER, "rejected": "Red."}]
    convs, skipped = chat.load(write_lines(tmp_path / "mine.jsonl", rows))
    assert skipped == 0 and convs == [{"messages": OPENAI}] * len(rows)
    # the plain string form of a pair is one user turn and one assistant reply
    convs, _ = chat.load(write_lines(tmp_path / "pairs.jsonl", [{"prompt": QUESTION, "chosen": ANSWER,
                                                                 "rejected": "Red."}]))
    assert convs == [{"messages": OPENAI[1:]}]


GOOD = {"messages": OPENAI}
USER, ASSISTANT = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "hello"}, "unknown format (keys 'text'): expected 'messages' (OpenAI), 'conversations' (ShareGPT) or "
                        "'chosen' (a preference pair)"),
    ({}, "unknown format (an empty object)"),
    ({"messages": []}, "empty conversation (no messages)"),
    ({"conversations": []}, "empty conversation (no messages)"),
    ({"messages": "hello"}, "the messages must be a list of {role, content}"),
    ({"messages": [USER, USER, ASSISTANT]}, "message 1: role 'user' out of order, expected 'assistant' (user and "
                                             "assistant must alternate, starting with user)"),
    ({"messages": [ASSISTANT]}, "message 0: role 'assistant' out of order, expected 'user'"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "message 1: role 'user' out of order"),
    ({"messages": [USER, ASSISTANT, USER]}, "the last message is the user's: a conversation must end with the "
                                            "assistant's reply"),
    ({"messages": [OPENAI[0]]}, "conversation has a system message but no user message"),
    ({"messages": [USER, ASSISTANT, OPENAI[0]]}, "message 2: a system message may only come first"),
    ({"messages": [USER, {"role": "tool", "content": "4"}]}, "message 1: unknown role 'tool'"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "message 1: empty assistant turn"),
    ({"messages": [USER, {"role": "assistant"}]}, "message 1 must be an object with 'role' and 'content'"),
    ({"conversations": [{"from": "function", "value": "x"}]}, "message 0: unknown ShareGPT role 'function' (use "
                                                              "system, human or gpt)"),
    ({"conversations": [{"from": "human", "text": "x"}]}, "message 0 must be an object with 'from' and 'value'"),
    ({"chosen": "Blue.", "rejected": "Red."}, "'chosen' is a string but there is no 'prompt'"),
    ({"prompt": QUESTION, "chosen": {"text": "Blue."}}, "'prompt' and 'chosen' must each be a string or a list"),
])
def test_bad_line_named_with_its_problem(tmp_path, line, message):
    """Each problem is one line naming the file, the line (counting blank ones) and what is wrong; a bad line
    anywhere stops the read, so nothing of the file is used."""
    path = write_lines(tmp_path / "mine.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(UserError) as e:
        chat.load(path)
    assert str(e.value).startswith(f"{path} line 3: {message}")
    assert "\n" not in str(e.value)


def check_eval_readers(root, n):
    """The readers on real files under root; n: the row counts that root's files have."""
    gsm = read_gsm8k(root / "gsm8k" / "train.jsonl")
    assert len(gsm) == n["gsm8k"] and extract_answer(gsm[0]["answer"]) == "72"
    assert extract_answer("so\n#### 1,234") == "1234" and extract_answer("#### -3.50") == "-3.5"
    assert extract_answer("no answer") is None
    arc = read_arc(root / "arc" / "ARC-Challenge" / "test.jsonl")
    assert len(arc) == n["arc"] and all(0 <= r["answer"] < len(r["choices"]) for r in arc)
    mmlu = read_mmlu(root / "mmlu" / "all" / "test.parquet")
    assert len(mmlu) == n["mmlu"] and mmlu[0]["labels"] == ["A", "B", "C", "D"]
    assert len({r["subject"] for r in mmlu}) == 57
    he = read_humaneval(root / "humaneval" / "example_problem.jsonl")
    assert he[0]["entry_point"] == "return1"
    tasks = read_core_bundle(root / "eval_bundle")
    assert len(tasks) == 22
    assert {t["label"] for t in tasks if not t["missing"]} >= {"hellaswag", "jeopardy"} - n["core_absent"]
    assert len([t for t in tasks if t["missing"]]) == n["core_missing"]
    hs = next(t for t in tasks if t["label"] == "hellaswag")
    assert hs["num_fewshot"] == 10 and hs["random_baseline"] == 0.25 and hs["type"] == "multiple_choice"
    assert next(t for t in tasks if t["label"] == "jeopardy")["continuation_delimiter"] == "\nAnswer: "
    assert set(read_core_task(hs["path"])[0]) == {"query", "choices", "gold"}
    words = read_words(root / "english_words" / "words_alpha.txt.gz")
    assert len(words) == n["words"] and words[0] == "a"
    return tasks


def test_read_eval_sets(data_root):
    tasks = check_eval_readers(data_root, dict(gsm8k=30, arc=30, mmlu=114, words=2468, core_missing=13,
                                               core_absent={"jeopardy"}))
    assert {t["label"] for t in tasks if not t["missing"]} == {  # the 8 task files the fixture slices
        "arc_easy", "bigbench_qa_wikidata", "winograd", "hellaswag", "hellaswag_zeroshot", "copa", "winogrande",
        "lambada_openai", "bigbench_operators"}


def test_read_eval_sets_full(shared_data):
    tasks = check_eval_readers(shared_data, dict(gsm8k=7473, arc=1172, mmlu=14042, words=370099, core_missing=2,
                                                 core_absent=set()))
    assert {t["label"] for t in tasks if t["missing"]} == {"squad", "coqa"}
    assert {len(r["choices"]) for r in read_arc(shared_data / "arc" / "ARC-Easy" / "train.jsonl")} >= {3, 4}
    words = read_words(shared_data / "english_words" / "words_alpha.txt.gz")
    assert words[:2] == ["a", "aa"]  # 370,098 line breaks, no newline at the end
