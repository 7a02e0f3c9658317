"""`picochat export --hf`: the export, loaded by transformers itself, computes what picochat computes."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from picochat.checkpoint import save_checkpoint, load_model
from picochat.common import UserError
from picochat.export import export_hf, nanochat_weights, picochat_config
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

NATIVE = dict(resid_scalars=False, window_pattern="L", value_embeds=False)
# everything transformers' nanochat lacks, plus grouped-query attention
REMOTE = dict(resid_scalars=True, window_pattern="SL", value_embeds=True, n_kv_head=2)
# and the features of the reference's Jul 2026 architecture, with a non-default value-embedding gate
FEATURES = dict(REMOTE, smear=True, backout=True, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0)


def make_checkpoint(folder, tok, step=7, seed=1, depth=2, **kw):
    cfg = GPTConfig.from_depth(depth, vocab_size=tok.vocab_size, sequence_len=128, head_dim=32, **kw)
    model = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections and unit scalars would hide mapping bugs
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.3))
    save_checkpoint(folder, step, model, tokenizer=tok)
    return Path(folder)


def rel_err(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


@pytest.fixture(scope="module")
def texts(data_root):
    return pq.read_table(data_root / "webtext" / "shards" / "shard_00001.parquet").column("text").to_pylist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """name -> (checkpoint folder, export folder) for a nanochat-compatible model and two remote-code ones."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    # three layers for the features: a backout from the middle of two is from the last, which the final norm undoes
    for name, kw in (("native", NATIVE), ("remote", REMOTE), ("features", dict(FEATURES, depth=3))):
        ckpt = make_checkpoint(root / name / "base", tok, **kw)
        export_hf(ckpt, root / f"hf_{name}")
        out[name] = (ckpt, root / f"hf_{name}")
    return out


def load_both(exported, name):
    ckpt, hf_dir = exported[name]
    model, tok, _ = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=name != "native")
    return model, tok, hf.eval(), hf_dir


@pytest.mark.parametrize("name", ["native", "remote", "features"])
def test_logits_match_picochat(exported, texts, name):
    model, tok, hf, hf_dir = load_both(exported, name)
    config = json.loads((hf_dir / "config.json").read_text())
    if name == "native":
        assert config["model_type"] == "nanochat" and "auto_map" not in config
        assert type(hf).__name__ == "NanoChatForCausalLM" and not (hf_dir / "modeling_picochat.py").exists()
    else:
        assert config["model_type"] == "picochat" and (hf_dir / "modeling_picochat.py").exists()
        assert type(hf).__name__ == "PicochatForCausalLM"
    ids = tok.encode(" ".join(texts[:5]), prepend_bos=True)
    for n in (1, 5, 33, 77, 128):  # past the 32-token window of the remote model's S layer
        x = torch.tensor([ids[:n]])
        with torch.no_grad():
            ref, got = model(x), hf(x).logits
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-4, n
    # a batch of two different prompts, and the loss transformers computes from labels
    x = torch.tensor([ids[:64], ids[64:128]])
    with torch.no_grad():
        out = hf(x, labels=x)
        ref = model(x[:, :-1], targets=x[:, 1:])
        assert rel_err(out.logits, model(x)) < 1e-4
    assert abs(float(out.loss) - float(ref)) < 1e-4


def greedy(model, ids, n):
    """n greedy tokens after ids by full recompute (GPT.forward over the whole sequence each step)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name", ["native", "remote", "features"])
def test_greedy_generation_matches(exported, texts, name):
    model, tok, hf, _ = load_both(exported, name)
    prompts = [tok.encode(texts[3][:200], prepend_bos=True)[:40], tok.encode("The river", prepend_bos=True)]
    refs = [greedy(model, p, 20) for p in prompts]
    assert all(len(r) == 20 for r in refs)
    for p, ref in zip(prompts, refs):
        x = torch.tensor([p])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False, eos_token_id=None)
        assert out[0, len(p):].tolist() == ref
    # both prompts in one left-padded batch: padding must be invisible
    L = max(map(len, prompts))
    x = torch.tensor([[tok.bos_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(x, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert [row[L:].tolist() for row in out] == refs


@pytest.mark.parametrize("name", ["native", "remote"])
def test_tokenizer_ids_identical_on_real_text(exported, texts, name):
    _, hf_dir = exported[name]
    tok = Tokenizer.load(exported[name][0] / "tokenizer")
    ht = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=name == "remote")
    docs = texts[:200] + ["", " leading space", "tabs\tand\nnewlines\r\n", "numbers 1234567 and 3.14", "café 東京 🚀"]
    for doc in docs:
        ours = tok.encode(doc)
        assert ht(doc, add_special_tokens=False).input_ids == ours
        assert ht(doc).input_ids == [tok.bos_id] + ours  # picochat starts every document with <|bos|>
        assert ht.decode(ours) == doc
    assert ht.bos_token_id == ht.pad_token_id == tok.bos_id
    assert ht.convert_tokens_to_ids("<|assistant_end|>") == tok.special("<|assistant_end|>")


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "How many r in strawberry?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me count. "},
                                       {"type": "python", "text": "'strawberry'.count('r')"},
                                       {"type": "python_output", "text": "3"},
                                       {"type": "text", "text": " There are 3."}]}],
    [{"role": "user", "content": "Line one\nline two\n\n  indented"}, {"role": "assistant", "content": "Sure."}],
]


@pytest.mark.parametrize("cls", ["auto", "fast"])
def test_chat_template_renders_like_picochat(exported, tok, cls):
    hf_dir = exported["native"][1]
    ht = AutoTokenizer.from_pretrained(hf_dir) if cls == "auto" else PreTrainedTokenizerFast.from_pretrained(hf_dir)

    def render(conv, gen):
        out = ht.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    for conv in CONVERSATIONS:
        assert render(conv, True) == tok.render_for_completion(conv)
        assert render(conv, False) == tok.render_conversation(conv)[0]
    text = ht.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|bos|><|user_start|>You are terse.\n\nWhat is 2+2?<|user_end|>")
    assert text.endswith("<|user_start|>And 3+3?<|user_end|><|assistant_start|>")


def test_features_nanochat_lacks_need_remote_code_or_are_refused(tmp_path, tok):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **REMOTE)
    with pytest.raises(UserError, match="value embeddings, sliding windows .*residual scalars"):
        export_hf(ckpt, tmp_path / "out", remote_code=False)
    assert not (tmp_path / "out").exists()
    # residual scalars that are exactly the identity are no obstacle
    ckpt = make_checkpoint(tmp_path / "ident", tok, resid_scalars=True, window_pattern="L")
    model, _, _ = load_model(ckpt)
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.zero_()
    save_checkpoint(ckpt, 8, model, tokenizer=tok)
    s = export_hf(ckpt, tmp_path / "ident_out", remote_code=False)
    assert s["target"] == "nanochat" and s["max_rel_err"] < 1e-4


def test_features_picochat_computes_and_nanochat_lacks(exported, texts):
    """The smear, the backout, a QK scale and a non-default value-embedding gate reach the export's config and
    each changes its logits (so test_logits_match_picochat's "features" case would see one left out)."""
    model, tok, hf, hf_dir = load_both(exported, "features")
    config = json.loads((hf_dir / "config.json").read_text())
    assert {k: config[k] for k in ("smear", "backout_layer", "qk_scale", "ve_gate_channels", "ve_gate_scale")} == \
        dict(smear=True, backout_layer=1, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0)
    x = torch.tensor([tok.encode(" ".join(texts[:3]), prepend_bos=True)[:60]])
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, model(x)) < 1e-4
        for name in ("smear_lambda", "backout_lambda"):
            saved = getattr(hf, name).clone()
            getattr(hf, name).zero_()
            assert rel_err(hf(x).logits, ref) > 1e-3, name
            getattr(hf, name).copy_(saved)
        for name, off in (("qk_scale", 1.0), ("ve_gate_scale", 2.0)):
            for block in hf.blocks:
                setattr(block.attn, name, off)
            assert rel_err(hf(x).logits, ref) > 1e-3, name
            for block in hf.blocks:
                setattr(block.attn, name, config[name])


def test_cached_forward_takes_the_smears_previous_token(exported, texts):
    """Outside generate(), a cached forward of a model that smears needs the token before its input: given it,
    it continues exactly as the whole sequence; without it, it fails rather than guess."""
    model, tok, hf, _ = load_both(exported, "features")
    x = torch.tensor([tok.encode(texts[1], prepend_bos=True)[:30]])
    with torch.no_grad():
        out = hf(x[:, :20], use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        step = hf(x[:, 20:], cache=cache, prev_ids=x[:, 19], use_cache=True).logits
        assert rel_err(step, model(x)[:, 20:]) < 1e-4
        with pytest.raises(ValueError, match="prev_ids"):
            hf(x[:, 29:], cache=cache, use_cache=True)


def test_left_padding_is_invisible_to_the_smear(exported, texts):
    """A row's first token after left padding has no predecessor to smear in, as at the start of a sequence."""
    model, tok, hf, _ = load_both(exported, "features")
    ids = tok.encode(texts[2], prepend_bos=True)[:30]
    x = torch.tensor([[tok.bos_id] * 10 + ids[:20], ids])
    mask = torch.tensor([[0] * 10 + [1] * 20, [1] * 30])
    with torch.no_grad():
        got = hf(x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert rel_err(got[0, 10:], model(torch.tensor([ids[:20]]))[0]) < 1e-4
        assert rel_err(got[1], model(torch.tensor([ids]))[0]) < 1e-4


def test_smear_backout_qk_scale_and_ve_gate_need_remote_code(tmp_path, tok):
    """transformers' nanochat computes none of them: --no-remote-code refuses, naming each, and writes nothing;
    the picochat target carries them."""
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **NATIVE, smear=True, backout=True, qk_scale=1.2)
    with pytest.raises(UserError, match=r"cannot express this checkpoint's smear .*, backout .*, qk_scale=1\.2:"):
        export_hf(ckpt, tmp_path / "out", remote_code=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    s = export_hf(ckpt, tmp_path / "out")
    assert s["target"] == "picochat" and s["max_rel_err"] < 1e-4
    ckpt = make_checkpoint(tmp_path / "gate", tok, **REMOTE, ve_gate_channels=12, ve_gate_scale=3.0)
    with pytest.raises(UserError, match=r"value embeddings \(gate ve_gate_channels=12, ve_gate_scale=3\.0\)"):
        export_hf(ckpt, tmp_path / "gate_out", remote_code=False)


def test_bf16_rotary_tables_go_to_the_picochat_target(tmp_path, tok, texts):
    """An import of the reference's Oct 2025 model rounds its rotary tables to bf16: transformers' nanochat does
    not, so the export ships picochat's modeling file, whose logits are picochat's."""
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **NATIVE, rope_bf16=True)
    with pytest.raises(UserError, match="rotary tables rounded to bf16"):
        export_hf(ckpt, tmp_path / "native", remote_code=False)
    s = export_hf(ckpt, tmp_path / "out")
    assert s["target"] == "picochat" and s["max_rel_err"] < 1e-4
    model, _, _ = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    x = torch.tensor([tok.encode(" ".join(texts[:3]), prepend_bos=True)[:100]])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        # the rounding matters: the same weights with fp32 tables give other logits
        model.config.rope_bf16 = False
        cos, sin = model._rotary(model.config.sequence_len)
        model.cos.copy_(cos)
        model.sin.copy_(sin)
        assert (model(x) - theirs).abs().max() > 1e-3


def test_every_tensor_is_mapped(tok):
    cfg = GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=32, head_dim=32, **NATIVE)
    weights = GPT(cfg).state_dict()
    mapped = nanochat_weights(weights, cfg)
    assert len(mapped) == len(weights)
    with pytest.raises(UserError, match="cannot map 1 tensors"):
        nanochat_weights(dict(weights, extra=torch.zeros(3)), cfg)
    # picochat's modeling file has a tensor of the same name and shape for every one of the checkpoint's
    from picochat.hf_modeling import PicochatConfig, PicochatForCausalLM
    cfg = GPTConfig.from_depth(3, vocab_size=tok.vocab_size, sequence_len=32, head_dim=32, **FEATURES)
    ours = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    hf = PicochatForCausalLM(PicochatConfig.from_dict(picochat_config(cfg, tok)))
    assert {k: v.shape for k, v in hf.state_dict().items()} == ours


def test_bf16_export_loads(tmp_path, tok, texts):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **NATIVE)
    s = export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert s["max_rel_err"] < 1e-4  # checked against picochat on the same bf16-rounded weights
    from safetensors import safe_open
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    fp32 = export_hf(ckpt, tmp_path / "fp32")
    assert s["bytes"] < 0.6 * fp32["bytes"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16
    model, _, _ = load_model(ckpt)
    x = torch.tensor([tok.encode(texts[0], prepend_bos=True)[:50]])
    with torch.no_grad():
        assert rel_err(hf(x).logits.float(), model(x)) < 0.1


def test_bad_inputs_leave_nothing_behind(tmp_path, tok):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **NATIVE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty: pass --force"):
        export_hf(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="--dtype must be float32 or bfloat16"):
        export_hf(ckpt, tmp_path / "new", dtype="float16")
    export_hf(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(UserError, match="holds the checkpoint"):
        export_hf(ckpt, tmp_path, force=True)

    bare = make_checkpoint(tmp_path / "bare", tok, **NATIVE)
    for f in (bare / "tokenizer").iterdir():
        f.unlink()
    (bare / "tokenizer").rmdir()
    with pytest.raises(UserError, match="no tokenizer/ folder"):
        export_hf(bare, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # no temporary folders are left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "ckpt", "out"]


def test_failed_check_writes_nothing(tmp_path, tok, monkeypatch):
    import picochat.export as export
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, **NATIVE)

    def broken(*a, **k):
        raise UserError("check failed: simulated")
    monkeypatch.setattr(export, "check_logits", broken)
    with pytest.raises(UserError, match="simulated"):
        export_hf(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli(tmp_path, tok, capsys, monkeypatch):
    from picochat import cli
    from picochat.common import home_dir
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("export",))  # independent of the other stages' modules
    main = cli.main
    run = home_dir() / "runs" / "r1"
    make_checkpoint(run / "base", tok, step=3, **NATIVE)
    make_checkpoint(run / "sft", tok, step=5, **REMOTE)
    assert main(["export", "--run", "r1", "--hf", str(tmp_path / "a")]) == 0  # the last trained stage: sft
    assert "sft step 5" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "picochat"
    tc = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|assistant_end|>"
    assert main(["export", "--run", "r1", "--stage", "base", "--hf", str(tmp_path / "b"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "nanochat"
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["eos_token"] == "<|bos|>"
    capsys.readouterr()
    assert main(["export", "--run", "r1", "--hf", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and "\n" not in err
    assert main(["export", "--run", "r1", "--hf", str(tmp_path / "c"), "--dtype", "int8"]) == 2
    assert main(["export", "--run", "nope", "--hf", str(tmp_path / "d")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
