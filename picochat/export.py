"""`picochat export --hf OUT`: a checkpoint as a Hugging Face `transformers` model folder.

OUT gets model.safetensors (fp32 or bf16), config.json, generation_config.json, tokenizer.json and
tokenizer_config.json (with a chat template that renders conversations exactly as picochat does), so
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` work, and so do the
tools built on them (lm-evaluation-harness `--model hf`, vLLM, ...).

Two targets:
  nanochat  transformers' own `nanochat` model type (no custom code), used whenever the checkpoint is within
            what it computes: no value embeddings, no sliding windows, residual scalars off (or exactly 1/0),
            rotary tables in fp32, no smear, no backout, qk_scale 1.
  picochat  our own modeling file (modeling_picochat.py, a copy of picochat/hf_modeling.py) named in
            config.json's auto_map: load with trust_remote_code=True. Used for everything else, unless
            --no-remote-code, which refuses instead.
Every tensor of the checkpoint is mapped, or the export fails. Before OUT appears, the export is loaded
back with transformers and its logits are compared with picochat's (--no-verify skips this). Files are
written to a temporary folder next to OUT and renamed at the end: OUT is either complete or untouched.
"""
import shutil
import time
from pathlib import Path

import torch

from picochat.common import UserError, atomic_write_bytes, atomic_write_json, pick_run, replacing_dir
from picochat.checkpoint import load_model, resolve_checkpoint
from picochat.model import GPTConfig, describe

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
REMOTE_FILE = "modeling_picochat.py"

# Renders a conversation exactly as Tokenizer.render_conversation / render_for_completion: bos, then
# <|user_start|>text<|user_end|> and <|assistant_start|>parts<|assistant_end|> turns; a leading system
# message is merged into the first user turn with "\n\n"; with add_generation_prompt a trailing assistant
# message is dropped and <|assistant_start|> is appended. Assistant content may be a string or a list of
# {type: text|python|python_output, text} parts (tool calls and their outputs).
CHAT_TEMPLATE = (
    "{%- if not messages %}{{ raise_exception('conversation has no messages') }}{% endif -%}"
    "{%- set msgs = messages -%}"
    "{%- if add_generation_prompt and msgs[-1]['role'] == 'assistant' %}{% set msgs = msgs[:-1] %}{% endif -%}"
    "{%- set ns = namespace(system='', turn=0) -%}"
    "{{- '<|bos|>' -}}"
    "{%- for m in msgs -%}"
    "{%- if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{%- else %}{% set parts = m['content'] %}{% endif -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if not loop.first %}{{ raise_exception('a system message may only come first') }}{% endif -%}"
    "{%- set ns.system = (parts | map(attribute='text') | join('')) + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{%- if ns.turn % 2 == 1 %}{{ raise_exception('user and assistant turns must alternate') }}{% endif -%}"
    "{{- '<|user_start|>' + ns.system + (parts | map(attribute='text') | join('')) + '<|user_end|>' -}}"
    "{%- set ns.system = '' %}{% set ns.turn = ns.turn + 1 -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if ns.turn % 2 == 0 %}{{ raise_exception('user and assistant turns must alternate') }}{% endif -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'python' %}{{- '<|python_start|>' + p['text'] + '<|python_end|>' -}}"
    "{%- elif p['type'] == 'python_output' %}{{- '<|output_start|>' + p['text'] + '<|output_end|>' -}}"
    "{%- else %}{{- p['text'] -}}{% endif -%}"
    "{%- endfor -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- else %}{{ raise_exception('unknown role ' + m['role'] + ' (use system, user or assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{- '<|assistant_start|>' -}}{% endif -%}"
)


# ---- what transformers' nanochat computes ---------------------------------------------------------------
def nanochat_gaps(config, weights):
    """The features of this checkpoint that transformers' `nanochat` model type does not compute (empty list:
    it can be exported there exactly). Residual scalars that are exactly 1 and 0 are the identity."""
    gaps = []
    if config.value_embeds:
        gate = (config.ve_gate_channels, config.ve_gate_scale)
        gaps.append("value embeddings" if gate == (GPTConfig.ve_gate_channels, GPTConfig.ve_gate_scale) else
                    f"value embeddings (gate ve_gate_channels={gate[0]}, ve_gate_scale={gate[1]})")
    windows = config.window_sizes()
    if any(w is not None for w in windows):
        gaps.append(f"sliding windows (window_pattern {config.window_pattern})")
    if config.resid_scalars and not (bool((weights["resid_lambdas"] == 1).all()) and
                                     bool((weights["x0_lambdas"] == 0).all())):
        gaps.append("residual scalars (resid_lambdas/x0_lambdas)")
    if config.rope_bf16:  # an import of the reference's Oct 2025 model: transformers' nanochat keeps them fp32
        gaps.append("rotary tables rounded to bf16")
    if config.smear:
        gaps.append("smear (the previous token's embedding mixed in)")
    if config.backout:
        gaps.append("backout (the middle layer's output subtracted)")
    if config.qk_scale != 1.0:
        gaps.append(f"qk_scale={config.qk_scale}")
    return gaps


def nanochat_weights(weights, config):
    """picochat state dict -> NanoChatForCausalLM state dict. Fails unless every tensor is mapped."""
    out, used = {"model.embed_tokens.weight": weights["wte.weight"], "lm_head.weight": weights["lm_head.weight"]}, \
        {"wte.weight", "lm_head.weight"}
    names = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            key = f"blocks.{i}.{ours}.weight"
            out[f"model.layers.{i}.{theirs}.weight"] = weights[key]
            used.add(key)
    if config.resid_scalars:  # checked to be the identity by nanochat_gaps
        used |= {"resid_lambdas", "x0_lambdas"}
    left = sorted(set(weights) - used)
    if left:
        raise UserError(f"cannot map {len(left)} tensors to transformers' nanochat ({', '.join(left[:4])}): "
                        f"nothing was written")
    return out


def nanochat_config(config, tok):
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
        # picochat's norm is F.rms_norm with its default eps, the fp32 machine epsilon
        "rms_norm_eps": torch.finfo(torch.float32).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "final_logit_softcapping": config.softcap, "tie_word_embeddings": False,
        **special_ids(tok),
    }


def picochat_config(config, tok):
    return {
        "architectures": ["PicochatForCausalLM"], "model_type": "picochat",
        "auto_map": {"AutoConfig": f"{REMOTE_FILE[:-3]}.PicochatConfig",
                     "AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.PicochatForCausalLM"},
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len, "rope_base": config.rope_base, "softcap": config.softcap,
        "window_sizes": config.window_sizes(),
        "value_embed_layers": [i for i in range(config.n_layer) if config.has_value_embed(i)],
        "ve_gate_channels": min(config.ve_gate_channels, config.n_embd), "ve_gate_scale": config.ve_gate_scale,
        "resid_scalars": config.resid_scalars, "rope_bf16": config.rope_bf16, "smear": config.smear,
        "backout_layer": config.backout_layer if config.backout else None, "qk_scale": config.qk_scale,
        "tie_word_embeddings": False,
        **special_ids(tok),
    }


def special_ids(tok):
    # generation stops at the end of an assistant turn (chat models) or of a document (base models)
    return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.special("<|assistant_end|>"), tok.bos_id],
            "pad_token_id": tok.bos_id}


# ---- tokenizer ------------------------------------------------------------------------------------------
def tokenizer_files(tok, stage, max_len):
    """tokenizer.json + tokenizer_config.json. The HF tokenizer prepends <|bos|> when asked for special
    tokens (the default of `tokenizer(text)`), as picochat always starts a document with it."""
    from tokenizers import processors
    hf = tok.to_hf()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", tok.bos_id)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "pad_token": "<|bos|>",
        "eos_token": "<|bos|>" if stage == "base" else "<|assistant_end|>",
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return hf.to_str(pretty=False).encode(), config


# ---- the export -----------------------------------------------------------------------------------------
def export_hf(folder, out, *, step=None, dtype="float32", force=False, remote_code=True, verify=True, stage=""):
    """Export the checkpoint in `folder` to the HF folder `out`. Returns a summary dict."""
    folder, out = Path(folder), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: pick another --hf folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty: pass --force to replace it, or pick a new folder")
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise UserError(f"{out} holds the checkpoint being exported: pick another --hf folder")
    if not (folder / "tokenizer").is_dir():
        raise UserError(f"{folder} has no tokenizer/ folder: a checkpoint is exported with the tokenizer it was "
                        f"trained with (copy that tokenizer folder to {folder / 'tokenizer'})")
    model, tok, meta = load_model(folder, step)
    config = model.config
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    gaps = nanochat_gaps(config, weights)
    if gaps and not remote_code:
        raise UserError(f"transformers' nanochat model cannot express this checkpoint's {', '.join(gaps)}: "
                        f"export without --no-remote-code (loads with trust_remote_code=True)")
    target = "picochat" if gaps else "nanochat"
    if target == "nanochat":
        hf_weights, hf_config = nanochat_weights(weights, config), nanochat_config(config, tok)
    else:
        hf_weights, hf_config = dict(weights), picochat_config(config, tok)
    hf_config["dtype"] = "bfloat16" if torch_dtype == torch.bfloat16 else "float32"
    stage = stage or folder.name
    tok_json, tok_config = tokenizer_files(tok, stage, config.sequence_len)

    with replacing_dir(out) as tmp:
        from safetensors.torch import save_file
        tensors = {k: v.to(torch_dtype).contiguous() for k, v in hf_weights.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config)
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        atomic_write_json(tmp / "generation_config.json", gen)
        atomic_write_bytes(tmp / "tokenizer.json", tok_json)
        atomic_write_json(tmp / "tokenizer_config.json", tok_config)
        if target == "picochat":
            shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), tmp / REMOTE_FILE)
        atomic_write_bytes(tmp / "README.md", model_card(folder, meta, describe(model), target, dtype).encode())
        err = None
        if verify:
            # the reference is picochat run on exactly the weights written (rounded to the export dtype)
            model.load_state_dict({k: v.to(torch_dtype).float() for k, v in weights.items()})
            err = check_logits(tmp, model, tok, trust_remote_code=target == "picochat")
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"out": str(out), "target": target, "gaps": gaps, "step": meta["step"], "dtype": dtype,
            "bytes": size, "max_rel_err": err, "stage": stage}


def check_logits(folder, model, tok, trust_remote_code, tol=1e-4):
    """Load the export with transformers and compare its logits with picochat's on a short prompt."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        print("note: transformers is not installed, so the export was not loaded back to check it")
        return None
    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                              dtype=torch.float32)
    # long enough to pass the shortest attention window, so windowed layers are checked too
    windows = [w for w in model.config.window_sizes() if w is not None]
    n = min(model.config.sequence_len, max(24, min(windows, default=0) + 16))
    ids = [tok.bos_id] + tok.encode("The quick brown fox jumps over the lazy dog, then rests.")
    ids = torch.tensor([(ids * n)[:n]])
    with torch.no_grad():
        ref = model(ids)
        got = hf(ids).logits.float()
    err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    if not err <= tol:
        raise UserError(f"check failed: transformers ({type(hf).__name__}) gives logits {err:.2e} (relative) away "
                        f"from picochat's; nothing was written (--no-verify writes it anyway; please report this)")
    return err


def model_card(folder, meta, description, target, dtype):
    load = ("AutoModelForCausalLM.from_pretrained(path)" if target == "nanochat"
            else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return (f"# picochat model\n\nExported by `picochat export` from `{folder}` (step {meta['step']}) on "
            f"{time.strftime('%Y-%m-%d')}.\n\n{description}\n\nWeights in {dtype}; transformers model type "
            f"`{target}`.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = {load}\ntokenizer = AutoTokenizer.from_pretrained(path)\n"
            f"ids = tokenizer.apply_chat_template([{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
            f"add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
            f"out = model.generate(**ids, max_new_tokens=64, do_sample=False)\n"
            f"print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))\n```\n")


# ---- CLI ------------------------------------------------------------------------------------------------
def add_parser(sub):
    import argparse
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face transformers model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, metavar="OUT", help="output folder (must be empty or absent, see --force)")
    p.add_argument("--run", default="", help="run name: exports from $PICOCHAT_HOME/runs/<run>/<stage> "
                                             "(default: the run trained most recently)")
    p.add_argument("--stage", default="", help="base, sft or rl (default: the last stage the run has trained)")
    p.add_argument("--checkpoint", default="", metavar="FOLDER",
                   help="a stage folder to export (overrides --run/--stage)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default="float32", help="weights in float32 (exact) or bfloat16 (half the size)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    p.add_argument("--no-remote-code", dest="remote_code", action="store_false",
                   help="refuse checkpoints that transformers' nanochat model cannot run, instead of shipping "
                        "picochat's modeling file (which needs trust_remote_code=True)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading the export back with transformers to compare logits with picochat's")
    p.set_defaults(func=run)


def run(args):
    folder, stage = resolve_checkpoint(args.run if args.checkpoint else pick_run(args.run), args.stage, args.checkpoint)
    t0 = time.time()
    s = export_hf(folder, args.hf, step=args.step, dtype=args.dtype, force=args.force, remote_code=args.remote_code,
                  verify=args.verify, stage=stage)
    how = ("transformers' nanochat model (no custom code)" if s["target"] == "nanochat" else
           f"picochat's modeling file for {', '.join(s['gaps'])} (load with trust_remote_code=True)")
    check = "not checked" if s["max_rel_err"] is None else f"logits match picochat's to {s['max_rel_err']:.1e}"
    print(f"exported {folder} step {s['step']} -> {s['out']} ({s['dtype']}, {s['bytes'] / 1e6:.1f} MB, "
          f"{time.time() - t0:.1f}s) as {how}; {check}")
    remote = s["target"] == "picochat"
    print(f"load it: AutoModelForCausalLM.from_pretrained({s['out']!r}{', trust_remote_code=True' if remote else ''}); "
          f"AutoTokenizer.from_pretrained({s['out']!r})")
    print(f"evaluate it: lm_eval --model hf --model_args pretrained={s['out']},add_bos_token=True"
          f"{',trust_remote_code=True' if remote else ''} --tasks arc_easy")
    return 0
