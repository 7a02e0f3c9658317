import json
import math
import random
import shutil

import pytest
import torch

from picochat import checkpoint
from picochat.cli import main
from picochat.core import (fewshot_indices, render_mc, render_schema, render_lm, build_requests, item_requests,
                           score_batch, make_batches, score_shared, make_group_batches, shared_prefix, judge,
                           evaluate_task, evaluate_core, centered, core_label, select_items,
                           read_core_bundle, read_core_task)
from picochat.decode import InferenceModel
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(data_root):
    return data_root / "eval_bundle"


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


_ROWS = {}


def rows_of(bundle, label):
    task = next(t for t in read_core_bundle(bundle) if t["label"] == label)
    if task["path"] not in _ROWS:  # hellaswag is 8 MB: read each file once
        _ROWS[task["path"]] = read_core_task(task["path"])
    return task, _ROWS[task["path"]]


def random_model(vocab, seq_len=128, seed=0, **kw):
    """A tiny GPT with every weight random and large, so that losses differ clearly between choices (at init
    the head is near zero and every choice would tie)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab, sequence_len=seq_len, head_dim=32, **kw))
    model.init_weights(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 if p.ndim > 1 else 0.2)
    return model.eval()


# ---- prompts ----------------------------------------------------------------------------------------------
def test_fewshot_indices():
    assert fewshot_indices(2376, 0, 2) == [1806, 479]  # pinned: the same examples on every machine
    for n, idx, k in [(10, 0, 9), (10, 9, 3), (100, 50, 10), (20321, 20320, 10)]:
        got = fewshot_indices(n, idx, k)
        assert len(got) == len(set(got)) == k and idx not in got and all(0 <= j < n for j in got)
        assert got == fewshot_indices(n, idx, k)
    assert fewshot_indices(1, 0, 5) == [] and sorted(fewshot_indices(3, 1, 10)) == [0, 2]
    assert fewshot_indices(50, 7, 0) == []


def test_multiple_choice_prompt_by_hand(bundle):
    task, rows = rows_of(bundle, "arc_easy")
    assert task["continuation_delimiter"] == "\nAnswer: " and task["num_fewshot"] == 10
    shots = [rows[j] for j in fewshot_indices(len(rows), 0, 2)]
    prompts = render_mc(rows[0], task["continuation_delimiter"], shots)
    expected_prefix = (
        "Question: What causes sound?\nAnswer: vibrations\n\n"  # rows of the fixture's 40, by fewshot_indices(40, 0, 2)
        "Question: Plants use sunlight to make\nAnswer: food.\n\n"
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer: ")
    assert prompts == [expected_prefix + c for c in [
        "Sunlight is the source of energy for nearly all ecosystems.",
        "Most ecosystems are found on land instead of in water.",
        "Carbon dioxide is more available than other gases.",
        "The producers in all ecosystems are plants."]]


def test_language_modeling_prompt_by_hand(bundle, tok):
    task, rows = rows_of(bundle, "bigbench_qa_wikidata")
    assert task["continuation_delimiter"] == " "
    shots = [rows[j] for j in fewshot_indices(len(rows), 3, 2)]
    prompt, full = render_lm(rows[3], " ", shots)
    assert prompt == ("The country of Melbourne is Australia\n\nThe sport played by Ron LeFlore is baseball\n\n"
                      "The sport played by Shane Victorino is")
    assert full == prompt + " baseball"
    (ids, start, end), = build_requests(tok, "language_modeling", rows[3], shots, delim=" ", max_len=10_000)[0]
    assert ids[0] == tok.bos_id and end == len(ids)
    assert tok.decode(ids[start:end]) == " baseball"
    assert tok.decode(ids[1:start]) == prompt


def test_schema_prompt_by_hand(bundle, tok):
    task, rows = rows_of(bundle, "winograd")
    assert task["type"] == "schema"
    shots = [rows[j] for j in fewshot_indices(len(rows), 2, 1)]
    prompts = render_schema(rows[2], " ", shots)
    assert prompts == [
        "Jim comforted Kevin because Kevin was so upset.\n\nThe trophy doesn't fit into the brown suitcase "
        "because the trophy is too large.",
        "Jim comforted Kevin because Kevin was so upset.\n\nThe trophy doesn't fit into the brown suitcase "
        "because the suitcase is too large."]
    seqs, gold = build_requests(tok, "schema", rows[2], shots, delim=" ", max_len=10_000)
    assert gold == 0
    for ids, start, end in seqs:  # the scored part is the shared continuation
        assert tok.decode(ids[start:end]).strip() == "is too large." and end == len(ids)


def test_multiple_choice_spans_and_cropping(bundle, tok):
    task, rows = rows_of(bundle, "hellaswag")
    seqs, gold = item_requests(tok, task, rows, 5, 10_000)
    assert gold == rows[5]["gold"] and len(seqs) == len(rows[5]["choices"])
    starts = {s for _, s, _ in seqs}
    assert len(starts) == 1  # same context: the continuations start where the choices diverge
    for (ids, s, e), choice in zip(seqs, rows[5]["choices"]):
        assert choice.endswith(tok.decode(ids[s:e]).strip()) and e == len(ids)
    cropped, _ = item_requests(tok, task, rows, 5, 64)
    for (ids, s, e), (full, fs, fe) in zip(cropped, seqs):
        assert len(ids) == 64 and ids == full[-64:]  # crop from the left, continuation kept
        assert e - s == fe - fs and ids[s:e] == full[fs:fe]


# ---- scoring ----------------------------------------------------------------------------------------------
def plain_scores(model, ids, start, end, max_len):
    """The obvious computation, written out: one sequence, full logits, log-softmax, pick the targets."""
    if len(ids) > max_len:
        cut = len(ids) - max_len
        ids, start, end = ids[cut:], max(1, start - cut), end - cut
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    logp = torch.log_softmax(logits.double(), -1)
    losses = [-float(logp[t - 1, ids[t]]) for t in range(start, end)]
    exact = all(int(logits[t - 1].argmax()) == ids[t] for t in range(start, end))
    return sum(losses) / len(losses), exact


# an imported model's optional features (a smear reads the token before each row's remainder from the cache)
FEATURES = dict(smear=True, backout=True, value_embeds=True, ve_gate_channels=12, ve_gate_scale=3.0, qk_scale=1.2)


@pytest.mark.parametrize("label,shots,kw", [("hellaswag", 3, {}), ("hellaswag_zeroshot", 0, {}), ("copa", 0, {}),
                                            ("winogrande", 0, {}), ("winograd", 0, {}), ("arc_easy", 1, {}),
                                            ("lambada_openai", 0, {}), ("bigbench_qa_wikidata", 3, {}),
                                            ("winogrande", 0, FEATURES), ("arc_easy", 1, FEATURES)])
def test_batched_scoring_matches_one_at_a_time(bundle, tok, label, shots, kw):
    model = random_model(tok.vocab_size, seq_len=128, **kw)
    net = InferenceModel(model)
    task, rows = rows_of(bundle, label)
    task = dict(task, num_fewshot=shots)  # 3-shot hellaswag (500+ tokens) and some lambada items are cropped
    items = random.Random(0).sample(range(len(rows)), 6)
    reqs, owner = [], []
    for k, i in enumerate(items):
        seqs, gold = item_requests(tok, task, rows, i, 128)
        reqs += seqs
        owner += [k] * len(seqs)
    got = [None] * len(reqs)  # batched, every sequence whole
    batches = make_batches([len(r[0]) for r in reqs], batch_tokens=250)
    assert len(batches) > 1 and sorted(j for b in batches for j in b) == list(range(len(reqs)))
    for b in batches:
        for j, s in zip(b, score_batch(net, [reqs[j] for j in b])):
            got[j] = s
    groups = [[r for r, o in zip(reqs, owner) if o == k] for k in range(len(items))]
    shared = [None] * len(items)  # batched, each item's common prefix once in a KV cache
    gbatches = make_group_batches(groups, batch_tokens=200, max_len=128)
    assert len(gbatches) > 1 and sorted(g for b in gbatches for g in b) == list(range(len(items)))
    for b in gbatches:
        scores = iter(score_shared(net, [groups[g] for g in b]))
        for g in b:
            shared[g] = [next(scores) for _ in groups[g]]
    shared = [s for g in shared for s in g]
    if task["type"] != "language_modeling" and label != "hellaswag":  # cropped sequences share nothing
        assert sum(shared_prefix(g) for g in groups) > 0
    # the plain computation starts again from the raw item, with its own cropping
    k = 0
    for i in items:
        shots = [rows[j] for j in fewshot_indices(len(rows), i, task["num_fewshot"])]
        seqs, _ = build_requests(tok, task["type"], rows[i], shots, delim=task["continuation_delimiter"],
                                 max_len=10_000)
        for ids, s, e in seqs:
            loss, exact = plain_scores(model, ids, s, e, 128)
            assert math.isclose(got[k][0], loss, rel_tol=2e-4, abs_tol=2e-4), (label, i, got[k][0], loss)
            assert math.isclose(shared[k][0], loss, rel_tol=2e-4, abs_tol=2e-4), (label, i, shared[k][0], loss)
            assert got[k][1] == exact and shared[k][1] == exact
            k += 1
    losses = [g[0] for g in got]
    if task["type"] != "language_modeling":
        assert max(losses) - min(losses) > 0.1  # the model separates choices: the comparison means something


def test_exact_match_both_ways(tok):
    """A model that predicts 'the same token again': continuations that repeat are exact, others are not."""
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64, head_dim=32)).init_weights(seed=0)
    with torch.no_grad():  # blocks are identity at init (zero output projections); the head reads the input token
        model.lm_head.weight.copy_(model.wte.weight * 0.05)  # small: the soft-cap must not flatten the logits
    model.eval()
    assert len(set(tok.encode(" a a a"))) == 1  # " a" is one token
    repeat = {"context": "a a a a", "continuation": "a a a"}
    other = {"context": "a a a a", "continuation": "b a"}
    for item, want in [(repeat, True), (other, False)]:
        seqs, gold = build_requests(tok, "language_modeling", item, [], delim=" ", max_len=64)
        scores = score_batch(InferenceModel(model), seqs)
        assert judge("language_modeling", scores, gold) is want
        assert scores[0][1] == plain_scores(model, *seqs[0], 64)[1]


def test_judge_picks_lowest_mean_loss():
    assert judge("multiple_choice", [(2.0, False), (1.5, False), (1.7, False)], 1)
    assert not judge("multiple_choice", [(2.0, False), (1.5, False), (1.7, False)], 2)
    assert judge("schema", [(0.5, False), (0.9, False)], 0)
    assert judge("language_modeling", [(9.0, True)], None) and not judge("language_modeling", [(0.1, False)], None)


def test_ranks_partition_the_items(bundle, tok):
    for n, m in [(100, None), (100, 10), (7, 100)]:
        parts = [select_items(n, m, r, 3) for r in range(3)]
        flat = sorted(i for p in parts for i in p)
        assert flat == select_items(n, m) and len(flat) == min(n, m or n)
    model = random_model(tok.vocab_size, seq_len=128)
    task, rows = rows_of(bundle, "copa")
    whole = evaluate_task(model, tok, task, rows, CPU, max_items=9)
    halves = [evaluate_task(model, tok, task, rows, CPU, max_items=9, rank=r, world=2) for r in range(2)]
    assert whole[1] == 9 and sum(h[0] for h in halves) == whole[0] and sum(h[1] for h in halves) == 9


# ---- centered accuracy and CORE ------------------------------------------------------------------------
def test_centered_accuracy_by_hand():
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0
    assert math.isclose(centered(0.5, 0.25), 1 / 3) and math.isclose(centered(0.4, 0.5), -0.2)
    assert centered(0.3, 0.0) == 0.3
    assert core_label(22, 22) == "CORE" and core_label(20, 22) == "CORE (20/22 tasks)"


def test_shared_bundle_skips_squad_and_coqa(shared_data):
    tasks = read_core_bundle(shared_data / "eval_bundle")
    assert len(tasks) == 22
    missing = sorted(t["label"] for t in tasks if t["missing"])
    assert missing == ["coqa", "squad"]  # the approx/ stand-ins are not the real tasks
    baselines = {t["label"]: t["random_baseline"] for t in tasks}
    assert baselines["hellaswag"] == 0.25 and baselines["copa"] == 0.5 and baselines["jeopardy"] == 0.0


def small_bundle(bundle, tmp_path, labels):
    """A copy of the bundle whose core.yaml lists only `labels` (files of the missing ones stay missing)."""
    import yaml
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("approx", "reference_results"))
    doc = yaml.safe_load((bundle / "core.yaml").read_text())
    doc["icl_tasks"] = [t for t in doc["icl_tasks"] if t["label"] in labels]
    (out / "core.yaml").write_text(yaml.safe_dump(doc))
    return out


def test_core_is_mean_of_centered_and_says_what_it_covers(bundle, tok, tmp_path):
    b = small_bundle(bundle, tmp_path, ["copa", "winograd", "bigbench_operators", "squad"])
    model = random_model(tok.vocab_size, seq_len=128)
    logs = []
    res = evaluate_core(model, tok, b, CPU, max_per_task=10, batch_tokens=2048, log=logs.append)
    assert res["missing"] == ["squad"] and res["num_scored"] == 3 and res["num_tasks"] == 4
    assert res["label"] == "CORE (3/4 tasks)" and any("squad" in line and "skipped" in line for line in logs)
    by_hand = []
    for label, r in res["tasks"].items():
        assert r["total"] == 10
        acc = r["correct"] / 10
        base = {"copa": 0.5, "winograd": 0.5, "bigbench_operators": 0.0}[label]
        assert r["accuracy"] == acc and math.isclose(r["centered"], (acc - base) / (1 - base))
        by_hand.append((acc - base) / (1 - base))
    assert math.isclose(res["core"], sum(by_hand) / 3)
    # the one-at-a-time path agrees item for item
    single = evaluate_core(model, tok, b, CPU, max_per_task=10, single=True, log=lambda *a: None)
    assert {k: v["correct"] for k, v in single["tasks"].items()} == {k: v["correct"] for k, v in res["tasks"].items()}


def test_eval_base_command(bundle, tok, webtext_tokenizer, data_root, tmp_path, capsys):
    from picochat.common import home_dir
    model = random_model(tok.vocab_size, seq_len=128)
    folder = home_dir() / "runs" / "t" / "base"
    checkpoint.save_checkpoint(folder, 7, model, meta={"stage": "base"}, tokenizer=tok)
    b = small_bundle(bundle, tmp_path, ["copa", "bigbench_qa_wikidata", "coqa"])
    rc = main(["eval", "base", "--run", "t", "--max-per-task", "6", "--bundle", str(b), "--data",
               str(data_root / "webtext" / "shards"), "--eval-tokens", "2048", "--device", "cpu"])
    assert rc == 0
    out = json.loads((folder / "eval_base.json").read_text())
    assert out["step"] == 7 and 0 < out["val_bpb"] < 20
    assert out["core_label"] == "CORE (2/3 tasks)" and out["core_missing"] == ["coqa"]
    assert set(out["core_tasks"]) == {"copa", "bigbench_qa_wikidata"}
    assert all(r["total"] == 6 for r in out["core_tasks"].values())
    assert "CORE (2/3 tasks)" in capsys.readouterr().out
    # a bundle path that is not a bundle is a clear error
    assert main(["eval", "base", "--run", "t", "--skip-bpb", "--bundle", str(tmp_path / "nope")]) == 2
    assert "core.yaml" in capsys.readouterr().err


def test_eval_base_under_torchrun_matches_one_process(bundle, tok, data_root, tmp_path):
    """Two ranks (gloo) each score every other item and all-reduce the counts: same CORE as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from picochat import launch
    home = tmp_path / "home"
    model = random_model(tok.vocab_size, seq_len=128)
    checkpoint.save_checkpoint(home / "runs" / "t" / "base", 1, model, meta={"stage": "base"}, tokenizer=tok)
    b = small_bundle(bundle, tmp_path, ["copa", "winograd", "bigbench_operators"])
    args = ["eval", "base", "--run", "t", "--max-per-task", "7", "--bundle", str(b), "--data",
            str(data_root / "webtext" / "shards"), "--eval-tokens", "4096", "--device", "cpu"]
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    out = {}
    for nproc in (1, 2):
        cmd = launch.torchrun_command(args, nproc) if nproc > 1 else [sys.executable, "-m", "picochat", *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        out[nproc] = json.loads((home / "runs" / "t" / "base" / "eval_base.json").read_text())
    one, two = out[1], out[2]
    assert {k: (v["correct"], v["total"]) for k, v in one["core_tasks"].items()} == \
        {k: (v["correct"], v["total"]) for k, v in two["core_tasks"].items()}
    assert one["core"] == two["core"] and all(v["total"] == 7 for v in two["core_tasks"].values())
    assert abs(one["val_bpb"] - two["val_bpb"]) < 1e-5 * one["val_bpb"]  # the same validation tokens
