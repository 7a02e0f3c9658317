"""`picochat import`: an imported model computes what the model that wrote it computes, and bad input is refused
with one clear line, leaving the run as it was."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from picochat.checkpoint import load_model
from picochat.cli import main
from picochat.common import UserError
from picochat.engine import Engine
from picochat.importer import read_pickled_tokenizer, read_source, write_import

FIXTURES = Path(__file__).parent / "fixtures" / "nanochat_ckpt"
REFERENCE = ["nov2025_d2", "jul2026_d2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def snapshot(folder):
    """Every file under folder with its bytes: to assert a failed import changed nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else None


def greedy_no_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_checkpoint_reproduces_the_references_logits(home, name):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    assert main(["import", str(FIXTURES / name), "--run", "ref"]) == 0
    model, tok, meta = load_model(home / "runs" / "ref" / "base")
    assert meta["stage"] == "base" and meta["step"] == 40
    assert tok.encode(expected["text"], prepend_bos=True) == expected["ids"]
    x = torch.tensor([expected["ids"]])
    with torch.no_grad():
        logits = model(x)[0]
    assert (logits[-1] - torch.tensor(expected["last_logits"])).abs().max() < 1e-4
    assert (logits.mean(-1) - torch.tensor(expected["mean_logits_per_position"])).abs().max() < 1e-4
    assert greedy_no_cache(model, expected["ids"], 20) == expected["greedy_20"]
    # the engine (KV cache, decode layout) continues it the same way
    eng = Engine(model, tok, tool=False)
    seqs, _ = eng.generate_batch(expected["ids"], num_samples=1, max_tokens=20, temperature=0.0)
    got = seqs[0][len(expected["ids"]):]
    assert got == expected["greedy_20"][:len(got)] and len(got) >= 1
    # the run's tokenizer is the model's, so sft/rl/pretrain of this run find it
    assert (home / "runs" / "ref" / "tokenizer" / "tokenizer.tiktoken").exists()


def test_missing_tokenizer_asks_for_one_and_takes_it(home, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "nov2025_d2", src)
    (src / "tokenizer.pkl").unlink()
    with pytest.raises(UserError, match="no tokenizer.pkl: name the model's tokenizer with --tokenizer"):
        read_source(src)
    imp = read_source(src, tokenizer=str(FIXTURES / "jul2026_d2" / "tokenizer.pkl"))
    write_import(imp, "t")
    # a picochat tokenizer folder works as well
    imp2 = read_source(src, tokenizer=str(home / "runs" / "t" / "tokenizer"))
    assert imp2.tokenizer.hash == imp.tokenizer.hash


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_asking_for_anything_but_the_tokenizer_is_refused(home, tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "jul2026_d2", src)
    (src / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match=r"asks to load (posix|os)\.system: a tokenizer.pkl may hold only"):
        main_raise(["import", str(src), "--run", "evil"])
    assert not marker.exists() and snapshot(home) is None
    # an Encoding whose state smuggles another object in is refused the same way
    good = (FIXTURES / "jul2026_d2" / "tokenizer.pkl").read_bytes()
    (src / "tokenizer.pkl").write_bytes(good.replace(b"tiktoken.core", b"subprocess\x00\x00\x00"))
    with pytest.raises(UserError):
        read_pickled_tokenizer(src / "tokenizer.pkl")
    assert read_pickled_tokenizer(FIXTURES / "jul2026_d2" / "tokenizer.pkl").vocab_size == 512


def main_raise(argv):
    """Run the CLI's parser and command without its error printing, so the UserError reaches the test."""
    from picochat.cli import build_parser
    args = build_parser().parse_args(argv)
    return args.func(args)


def corrupt(src, name, how):
    p = src / name
    if how == "delete":
        p.unlink()
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    else:
        how(p)


def edit_meta(key, value):
    def f(p):
        meta = json.loads(p.read_text())
        meta["model_config"][key] = value
        p.write_text(json.dumps(meta))
    return f


def edit_state(fn):
    def f(p):
        sd = torch.load(p, weights_only=True)
        fn(sd)
        torch.save(sd, p)
    return f


@pytest.mark.parametrize("name,how,message", [
    ("model_000040.pt", "truncate", "cannot read .*model_000040.pt .*truncated"),
    ("meta_000040.json", "delete", "meta_000040.json is missing"),
    ("meta_000040.json", "truncate", "meta_000040.json is truncated"),
    ("tokenizer.pkl", "truncate", "cannot read .*tokenizer.pkl .*truncated"),
    ("meta_000040.json", edit_meta("mtp_n", 2), "model_config keys this import does not know: mtp_n"),
    ("meta_000040.json", edit_meta("vocab_size", 600), "shapes do not match the config: wte.weight"),
    ("meta_000040.json", edit_meta("window_pattern", "SX"), "window-pattern must be made of S and L"),
    ("model_000040.pt", edit_state(lambda sd: sd.update(rsm_head=torch.zeros(3))), "match no reference architecture"),
    ("model_000040.pt", edit_state(lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight")),
     "tensors missing for this architecture: blocks.1.mlp.c_fc.weight"),
    ("model_000040.pt", edit_state(lambda sd: sd.update({"transformer.h.1.attn.c_bias": torch.zeros(3)})),
     "1 tensors have no place in picochat's model .blocks.1.attn.c_bias"),
])
def test_bad_input_is_refused_and_the_run_is_unchanged(home, tmp_path, name, how, message):
    assert main(["import", str(FIXTURES / "jul2026_d2"), "--run", "r"]) == 0
    before = snapshot(home)
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "jul2026_d2", src)
    corrupt(src, name, how)
    with pytest.raises(UserError, match=message):
        main_raise(["import", str(src), "--run", "r", "--force"])
    assert snapshot(home) == before


def test_tokenizer_and_weights_must_agree_on_the_vocabulary(home, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "nov2025_d2", src)
    edit_meta("vocab_size", 640)(src / "meta_000040.json")
    edit_state(lambda sd: sd.update({k: torch.zeros(640, 128) for k in ("transformer.wte.weight", "lm_head.weight")}))(
        src / "model_000040.pt")
    with pytest.raises(UserError, match="the tokenizer has 512 tokens but the weights 640"):
        read_source(src)


def test_existing_stage_needs_force_and_is_replaced_whole(home):
    assert main(["import", str(FIXTURES / "nov2025_d2"), "--run", "r"]) == 0
    before = snapshot(home)
    with pytest.raises(UserError, match="already holds a checkpoint: pass --force"):
        main_raise(["import", str(FIXTURES / "jul2026_d2"), "--run", "r"])
    assert snapshot(home) == before
    assert main(["import", str(FIXTURES / "jul2026_d2"), "--run", "r", "--force"]) == 0
    model, _, _ = load_model(home / "runs" / "r" / "base")
    assert model.config.smear and sorted(p.name for p in (home / "runs" / "r").iterdir()) == ["base", "tokenizer"]


def test_unknown_source_is_a_clear_error(home, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        read_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a reference checkpoint"):
        read_source(tmp_path / "empty")


# ---- transformers folders ---------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fixture_tok():
    return read_pickled_tokenizer(FIXTURES / "jul2026_d2" / "tokenizer.pkl")


def test_transformers_nanochat_folder(home, tmp_path, fixture_tok):
    from transformers import NanoChatConfig, NanoChatForCausalLM
    cfg = NanoChatConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    torch.manual_seed(0)
    hf = NanoChatForCausalLM(cfg).eval()
    with torch.no_grad():  # a random init with a near-zero head would make every continuation tie
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    fixture_tok.to_hf().save(str(tmp_path / "hf" / "tokenizer.json"))
    assert main(["import", str(tmp_path / "hf"), "--run", "hf", "--stage", "sft"]) == 0
    model, tok, meta = load_model(home / "runs" / "hf" / "sft")
    assert tok.hash == fixture_tok.hash and meta["stage"] == "sft"
    ids = tok.encode("The Moon is Earth's only natural satellite.", prepend_bos=True)
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, use_cache=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert greedy_no_cache(model, ids, 20) == ref

    # a config key this import does not know is refused by name, and so is a leftover tensor
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "hf", bad)
    c = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(c, sliding_window=16)))
    with pytest.raises(UserError, match="keys this import does not know: sliding_window"):
        read_source(bad)
    (bad / "config.json").write_text(json.dumps(dict(c, hidden_act="silu")))
    with pytest.raises(UserError, match="hidden_act 'silu'"):
        read_source(bad)
    (bad / "config.json").write_text(json.dumps(c))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(bad / "model.safetensors"))
    save_file(dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(32)}), str(bad / "model.safetensors"))
    with pytest.raises(UserError, match="no place in picochat's model .blocks|model.layers.0.self_attn.q_norm"):
        read_source(bad)
    (bad / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read .*model.safetensors .*truncated"):
        read_source(bad)


def test_picochat_export_round_trips(home, tmp_path, fixture_tok):
    from picochat.checkpoint import save_checkpoint
    from picochat.export import export_hf
    from picochat.model import GPT, GPTConfig
    for name, kw in (("native", dict(resid_scalars=False)),
                     ("remote", dict(value_embeds=True, window_pattern="SL", n_kv_head=1)),
                     # an Oct 2025 import, exported (window_pattern as the import spells full attention)
                     ("bf16_rope", dict(resid_scalars=False, rope_bf16=True, window_pattern="LL")),
                     # the Jul 2026 features (three layers: the backout's middle one is not the last)
                     ("features", dict(depth=3, value_embeds=True, window_pattern="SLL", short_window=9, smear=True,
                                       backout=True, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0))):
        kw = dict(kw)
        cfg = GPTConfig.from_depth(kw.pop("depth", 2), vocab_size=512, sequence_len=64, head_dim=32, **kw)
        model = GPT(cfg).init_weights(seed=0)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        save_checkpoint(tmp_path / name / "base", 5, model, tokenizer=fixture_tok)
        export_hf(tmp_path / name / "base", tmp_path / f"hf_{name}", verify=False)
        assert main(["import", str(tmp_path / f"hf_{name}"), "--run", name]) == 0
        back, _, _ = load_model(home / "runs" / name / "base")
        assert back.config == model.config or name == "native"  # nanochat's config has no resid_scalars etc.
        x = torch.randint(0, 512, (2, 40))
        with torch.no_grad():
            assert (back(x) - model.eval()(x)).abs().max() < 1e-4


def test_hub_repo_id_without_network_is_a_clear_error(home, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not download someone/no-such-model from the Hugging Face hub"):
        read_source("someone/no-such-model")
