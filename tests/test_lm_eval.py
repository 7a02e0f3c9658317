"""lm-evaluation-harness scores picochat exactly as picochat scores itself.

Offline: a local ARC-Easy task (custom task YAML + jsonl in a temp folder, multiple_choice), run by
lm-eval's `local-completions` model against a live `picochat serve` app (uvicorn thread on 127.0.0.1), with
the tokenizer taken from a `picochat export` of the same model. The accuracy must equal the one computed
here from picochat's own logprobs: per item, the sum of continuation-token logprobs of each choice, argmax.
"""
import json
import pytest
import torch

from picochat.checkpoint import save_checkpoint, load_model
from picochat.export import export_hf
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")
pytest.importorskip("uvicorn")

N_ITEMS = 30
NATIVE = dict(resid_scalars=False, window_pattern="L", value_embeds=False)
REMOTE = dict(resid_scalars=True, window_pattern="SL", value_embeds=True, n_kv_head=2)
FEATURES = dict(REMOTE, smear=True, backout=True, qk_scale=1.2, ve_gate_scale=3.0)  # the Jul 2026 architecture's
TASK_YAML = """\
task: picochat_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def server_module():
    try:
        from picochat import server
        server.create_app, server.ServerThread
    except (ImportError, AttributeError) as e:
        pytest.skip(f"picochat.server.create_app is not available yet ({e})")
    return server


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access: datasets and huggingface_hub both read offline flags."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_model(folder, webtext_tokenizer, **kw):
    """A tiny random model: its checkpoint and an HF export of it."""
    tok = Tokenizer.load(webtext_tokenizer)
    cfg = GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=256, head_dim=32, **kw)
    model = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_checkpoint(folder / "ckpt", 1, model, tokenizer=tok)
    model, tok, _ = load_model(folder / "ckpt")
    export_hf(folder / "ckpt", folder / "hf")
    return model, tok, folder / "hf"


@pytest.fixture
def served(tmp_path, webtext_tokenizer):
    """The model behind `picochat serve` (create_app, served by uvicorn from a thread on a free local port)."""
    server = server_module()
    model, tok, hf_dir = make_model(tmp_path, webtext_tokenizer, **NATIVE)
    with server.ServerThread(server.create_app(model, tok)) as url:
        yield model, tok, hf_dir, url


@pytest.fixture
def arc_task(tmp_path, data_root):
    """(items, task folder): the first N_ITEMS ARC-Easy validation questions as a local lm-eval task."""
    lines = (data_root / "arc" / "ARC-Easy" / "validation.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines[:N_ITEMS]]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "arc_easy.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (task_dir / "picochat_arc_easy.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "ds_cache"))
    return items, task_dir


def run_lm_eval(model, model_args, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model=model, model_args=model_args, tasks=["picochat_arc_easy"],
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           log_samples=True, bootstrap_iters=0)


def check_same_scores(results, model, tok, items):
    ours = picochat_scores(model, tok, items)
    gold = [it["choices"]["label"].index(it["answerKey"]) for it in items]
    our_acc = sum(max(range(len(s)), key=s.__getitem__) == g for s, g in zip(ours, gold)) / len(items)
    samples = sorted(results["samples"]["picochat_arc_easy"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for s, row in zip(samples, ours):  # every choice's loglikelihood, not only the argmax
        theirs = [r[0] for r in s["filtered_resps"]]
        assert theirs == pytest.approx(row, abs=1e-3)
    assert results["results"]["picochat_arc_easy"]["acc,none"] == pytest.approx(our_acc, abs=1e-12)


@torch.no_grad()
def picochat_scores(model, tok, items):
    """lm-eval's multiple-choice scoring done by hand with picochat: context "Question: ...\\nAnswer:" and
    continuation " <choice>", tokenized as lm-eval does (whole string, then split at the context length,
    <|bos|> first), score = sum of the continuation tokens' logprobs."""
    scores = []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        row = []
        for choice in item["choices"]["text"]:
            ctx = tok.encode(context, prepend_bos=True)
            whole = tok.encode(context + " " + choice, prepend_bos=True)
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], dim=-1)
            row.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        scores.append(row)
    return scores


def test_lm_eval_local_completions_matches_picochat(served, arc_task, offline):
    """lm-eval -> HTTP /v1/completions (echo + logprobs, token-id prompts) -> picochat serve."""
    model, tok, hf_dir, base_url = served
    items, task_dir = arc_task
    import requests
    model_id = requests.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    # the server puts <|bos|> in front of a prompt that lacks it without echoing it, so token positions match
    # lm-eval's tokenization either way and the scores are the same with or without add_bos_token
    for add_bos in (False, True):
        results = run_lm_eval("local-completions", {
            "model": model_id, "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(hf_dir), "add_bos_token": add_bos, "max_length": 256, "max_retries": 1,
            "num_concurrent": 2}, task_dir)
        check_same_scores(results, model, tok, items)


@pytest.mark.parametrize("kind", ["native", "remote", "features"])
def test_lm_eval_hf_export_matches_picochat(tmp_path, webtext_tokenizer, arc_task, offline, kind):
    """lm-eval's own `hf` model on the export (transformers' nanochat, or our modeling file as remote code)."""
    items, task_dir = arc_task
    kw = {"native": NATIVE, "remote": REMOTE, "features": FEATURES}[kind]
    model, tok, hf_dir = make_model(tmp_path, webtext_tokenizer, **kw)
    results = run_lm_eval("hf", {"pretrained": str(hf_dir), "add_bos_token": True, "device": "cpu",
                                 "batch_size": 8, "trust_remote_code": kind != "native"}, task_dir)
    check_same_scores(results, model, tok, items)
