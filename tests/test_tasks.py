"""The tasks' readers of the published data sets (picochat/tasks/*.py, and CORE's bundle in picochat/core.py) on
real files."""
import pyarrow as pa
import pyarrow.parquet as pq

from picochat.core import read_core_bundle, read_core_task
from picochat.tasks.arc import read_arc
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
