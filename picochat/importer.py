"""`picochat import SOURCE --run NAME [--stage base|sft]`: start from a released model instead of training one.

SOURCE is one of:
  a reference nanochat checkpoint folder   model_<step>.pt + meta_<step>.json, and its tokenizer.pkl beside it
                                           (or named with --tokenizer: a tokenizer.pkl or a picochat tokenizer folder)
  a transformers `nanochat` folder         config.json (NanoChatForCausalLM), model.safetensors, tokenizer.json
  a picochat export folder                 what `picochat export --hf` writes (either of its two targets)
  a Hugging Face hub repo id               owner/name, downloaded with huggingface_hub into its cache, then as above

The result is an ordinary checkpoint in runs/<run>/<stage> (weights, meta and tokenizer), so chat, serve,
evaluate, sft, rl and export work on it unchanged; runs/<run>/tokenizer gets the tokenizer too when the run has
none. What holds: every tensor of the source is mapped to one of picochat's or the import fails naming the ones
left over (and those missing); an architecture this module does not know (config keys, tensors, features
picochat does not compute) is refused, naming what it does not know, never guessed at; the tokenizer and the
weights must agree on the vocabulary; a pickled tokenizer is read by an unpickler that builds nothing but the
tiktoken Encoding's plain state (no code of the pickle's choosing runs). The checkpoint is written in a temporary
folder beside the stage folder, loaded back, then renamed into place: the run is complete or unchanged.
"""
import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat.common import UserError, home_dir
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_to_unicode


@dataclass
class Imported:
    config: GPTConfig
    weights: dict      # picochat state-dict names -> tensors
    tokenizer: Tokenizer
    step: int
    source: str        # what it was read from, in words


# ---- tokenizers -------------------------------------------------------------------------------------------------
class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state the pickle hands to __setstate__
    (name, pattern, ranks, special tokens) and runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise UserError(f"{self.path} asks to load {module}.{name}: a tokenizer.pkl may hold only a tiktoken "
                        f"Encoding, so it was not unpickled")


def read_pickled_tokenizer(path):
    """The picochat Tokenizer equal to the tiktoken Encoding pickled in path (the reference's tokenizer.pkl)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            up = _TokenizerUnpickler(f)
            up.path = path
            obj = up.load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}): truncated or not a pickled tokenizer") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict):
        raise UserError(f"{path} does not hold a tiktoken Encoding")
    ranks, pattern, specials = state.get("mergeable_ranks"), state.get("pat_str"), state.get("special_tokens")
    if (not isinstance(ranks, dict) or not isinstance(pattern, str) or not isinstance(specials, dict)
            or not all(isinstance(b, bytes) and type(r) is int for b, r in ranks.items())):
        raise UserError(f"{path}: the Encoding's state is not a tokenizer's (mergeable_ranks, pat_str, special_tokens)")
    return _tokenizer(ranks, pattern, specials, path)


def _tokenizer(ranks, pattern, specials, where):
    """Our Tokenizer for these ranks, pattern and special tokens: refused unless the special tokens are ours, at
    the ids ours take (right after the ranks, in our order), so every id means what it meant to the model."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise UserError(f"{where}: the token ranks are not 0..{n - 1}")
    want = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    if specials != want:
        raise UserError(f"{where}: its special tokens {sorted(specials, key=specials.get)} at ids "
                        f"{sorted(specials.values())} are not picochat's ({', '.join(SPECIAL_TOKENS)} at {n}..)")
    try:
        return Tokenizer(dict(ranks), pattern)
    except Exception as e:
        raise UserError(f"{where}: not a usable tokenizer ({e.__class__.__name__}: {e})") from None


def read_hf_tokenizer(path):
    """The picochat Tokenizer equal to a byte-level BPE tokenizer.json (as picochat and the reference write them)."""
    path = Path(path)
    try:
        tj = json.loads(path.read_text())
        model = tj["model"]
        splits = [p for p in tj["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
        pattern = splits[0]["pattern"]["Regex"]
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UserError(f"{path} is not a byte-level BPE tokenizer.json with a Split pre-tokenizer (truncated, "
                        f"or a kind this import does not know)") from None
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: model type {model.get('type')!r}, expected a byte-level BPE")
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(char_byte[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in added}
    except KeyError:
        raise UserError(f"{path}: a vocabulary entry is not in the byte-level alphabet") from None
    return _tokenizer(ranks, pattern, added, path)


def read_tokenizer(path):
    """--tokenizer: a tokenizer.pkl, a tokenizer.json, or a folder holding a picochat tokenizer or either file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "tokenizer.tiktoken").exists():
            return Tokenizer.load(path)
        for name, read in (("tokenizer.pkl", read_pickled_tokenizer), ("tokenizer.json", read_hf_tokenizer)):
            if (path / name).exists():
                return read(path / name)
        raise UserError(f"--tokenizer {path}: no tokenizer.tiktoken, tokenizer.pkl or tokenizer.json in it")
    if not path.exists():
        raise UserError(f"--tokenizer {path}: no such file or folder")
    return read_hf_tokenizer(path) if path.suffix == ".json" else read_pickled_tokenizer(path)


# ---- weights ----------------------------------------------------------------------------------------------------
def fit_weights(config, weights, source):
    """weights (picochat names) checked against GPT(config): the same names and shapes, or a UserError naming
    what is left over, missing or misshapen. Vocab-sized tensors padded past the vocabulary are cropped."""
    with torch.device("meta"):
        want = GPT(config).state_dict()
    out = {}
    for k, v in weights.items():
        if k in want and v.ndim == 2 and want[k].shape[0] == config.vocab_size and v.shape[0] > config.vocab_size \
                and v.shape[1:] == want[k].shape[1:]:
            v = v[:config.vocab_size]  # rows of padding ids no token has; their logits were cropped
        out[k] = v
    left, missing = sorted(set(out) - set(want)), sorted(set(want) - set(out))
    if left:
        raise UserError(f"{source}: {len(left)} tensors have no place in picochat's model ({', '.join(left[:6])}): "
                        f"an architecture this import does not know")
    if missing:
        raise UserError(f"{source}: tensors missing for this architecture: {', '.join(missing[:6])}")
    bad = [f"{k} {tuple(out[k].shape)} (expected {tuple(want[k].shape)})"
           for k in want if out[k].shape != want[k].shape]
    if bad:
        raise UserError(f"{source}: shapes do not match the config: {', '.join(bad[:4])}")
    return {k: v.float().contiguous() for k, v in out.items()}


def check_vocab(config, tok, source):
    if tok.vocab_size != config.vocab_size:
        raise UserError(f"{source}: the tokenizer has {tok.vocab_size} tokens but the weights {config.vocab_size}: "
                        f"not this model's tokenizer")


# ---- a reference nanochat checkpoint --------------------------------------------------------------------------
REFERENCE_CONFIG_KEYS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}
# the tensors beyond the blocks, embedding and head in the reference's July 2026 model
JUL2026_EXTRA = {"resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda"}


def read_reference(folder, step=None, tokenizer=""):
    folder = Path(folder)
    steps = sorted(int(m.group(1)) for f in folder.glob("model_*.pt")
                   if (m := re.fullmatch(r"model_(\d+)\.pt", f.name)))
    if not steps:
        raise UserError(f"{folder}: no model_<step>.pt in it")
    step = steps[-1] if step is None else step
    model_path, meta_path = folder / f"model_{step:06d}.pt", folder / f"meta_{step:06d}.json"
    if not model_path.exists():
        raise UserError(f"{folder}: no model_{step:06d}.pt (have steps {steps})")
    try:
        meta = json.loads(meta_path.read_text())
        mc = dict(meta["model_config"])
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing: the reference writes it beside model_{step:06d}.pt") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path} is truncated or not a reference meta file (no model_config)") from None
    unknown = sorted(set(mc) - REFERENCE_CONFIG_KEYS)
    if unknown:
        raise UserError(f"{meta_path}: model_config keys this import does not know: {', '.join(unknown)} "
                        f"(an architecture picochat does not compute)")
    try:
        sd = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {model_path} ({e.__class__.__name__}): truncated or not a state dict") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{model_path} does not hold a state dict of tensors")
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}  # saved from a compiled model
    if tokenizer:
        tok = read_tokenizer(tokenizer)
    elif (folder / "tokenizer.pkl").exists():
        tok = read_pickled_tokenizer(folder / "tokenizer.pkl")
    else:
        raise UserError(f"{folder} has no tokenizer.pkl: name the model's tokenizer with --tokenizer (its "
                        f"tokenizer.pkl, e.g. from $NANOCHAT_BASE_DIR/tokenizer/, or a picochat tokenizer folder)")
    try:
        seq, n_embd, n_head = int(mc["sequence_len"]), int(mc["n_embd"]), int(mc["n_head"])
        base = dict(sequence_len=seq, vocab_size=int(mc["vocab_size"]), n_layer=int(mc["n_layer"]), n_head=n_head,
                    n_kv_head=int(mc.get("n_kv_head", n_head)), n_embd=n_embd)
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{meta_path}: model_config lacks sequence_len, vocab_size, n_layer, n_head or "
                        f"n_embd") from None
    if n_head < 1 or n_embd % n_head or base["n_kv_head"] < 1 or n_head % base["n_kv_head"]:
        raise UserError(f"{meta_path}: n_embd {n_embd}, n_head {n_head}, n_kv_head {base['n_kv_head']} do not fit")
    extra = {k for k in sd if not k.startswith(("transformer.", "lm_head."))}
    ves = {k for k in extra if k.startswith("value_embeds.")}
    if extra - ves == JUL2026_EXTRA and ves:
        # the reference from about July 2026: smear, backout, gated value embeddings (3 sigmoid over 12 channels,
        # read from the tensors), QK scaled by 1.2, short windows a quarter of the context rounded up to 128
        # tokens (FlashAttention's left window: that many before the current token)
        short = -(-seq // 4 // 128) * 128
        gates = [v for k, v in sd.items() if k.endswith("attn.ve_gate.weight")]
        config = GPTConfig(**base, window_pattern=mc.get("window_pattern", "L"), value_embeds=True, resid_scalars=True,
                           smear=True, backout=True, ve_gate_channels=gates[0].shape[1] if gates else 12,
                           ve_gate_scale=3.0, qk_scale=1.2, short_window=short + 1, rope_base=100_000.0)
        kind = "nanochat (Jul 2026 architecture)"
    elif not extra:
        # the reference of Oct-Nov 2025 (the released d20/d32): rotary base 10,000 with tables kept in bf16
        if mc.get("window_pattern", "L").upper().strip("L"):
            raise UserError(f"{meta_path}: window_pattern {mc['window_pattern']!r} on a model without the later "
                            f"tensors: an architecture this import does not know")
        config = GPTConfig(**base, window_pattern="L", value_embeds=False, resid_scalars=False,
                           rope_base=10_000.0, rope_bf16=True)
        kind = "nanochat (Oct 2025 architecture)"
    else:
        raise UserError(f"{model_path}: tensors {', '.join(sorted(extra)[:6])} match no reference architecture "
                        f"this import knows (Oct 2025: none of them; Jul 2026: {', '.join(sorted(JUL2026_EXTRA))} "
                        f"and value_embeds.*)")
    config.window_sizes()  # a bad window_pattern fails here, by name
    weights = {re.sub(r"^transformer\.h\.", "blocks.", re.sub(r"^transformer\.wte\.", "wte.", k)): v
               for k, v in sd.items()}
    weights = fit_weights(config, weights, model_path)
    check_vocab(config, tok, folder)
    return Imported(config, weights, tok, step, f"{kind} checkpoint {model_path}")


# ---- a transformers folder: the built-in `nanochat` model type, or picochat's own export -------------------------
# keys every transformers config may carry, whatever the model: none of them changes what the model computes
HF_GENERIC_KEYS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
                   "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "_name_or_path", "return_dict",
                   "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type",
                   "chunk_size_feed_forward", "is_encoder_decoder", "auto_map", "tie_word_embeddings"}
NANOCHAT_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "hidden_act", "attention_bias", "attention_dropout",
                 "rms_norm_eps", "rope_parameters", "rope_theta", "final_logit_softcapping", "head_dim"}
PICOCHAT_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "max_position_embeddings", "rope_base", "softcap", "window_sizes", "value_embed_layers",
                 "ve_gate_channels", "ve_gate_scale", "resid_scalars", "rope_bf16", "smear", "backout_layer",
                 "qk_scale"}
NANOCHAT_NAMES = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                  "self_attn.o_proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _hf_config_nanochat(cfg, where):
    """GPTConfig for transformers' NanoChatConfig, or a UserError naming what picochat does not compute."""
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10_000.0)}
    problems = []
    if cfg.get("intermediate_size", 4 * C) != 4 * C:
        problems.append(f"intermediate_size {cfg['intermediate_size']} (picochat's MLP is 4 x hidden_size)")
    if cfg.get("hidden_act", "relu2") != "relu2":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (picochat's is relu2)")
    if cfg.get("attention_bias"):
        problems.append("attention_bias")
    if cfg.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings")
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        problems.append(f"rope_parameters {rope}")
    if cfg.get("head_dim") not in (None, C // H):
        problems.append(f"head_dim {cfg['head_dim']} (picochat's is hidden_size / heads)")
    if cfg.get("final_logit_softcapping") is None:
        problems.append("no final_logit_softcapping")
    if problems:
        raise UserError(f"{where}: a model picochat does not compute: {'; '.join(problems)}")
    # rms_norm_eps: picochat normalizes with the fp32 epsilon; the difference is far below fp32 logit noise
    return GPTConfig(sequence_len=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                     n_layer=cfg["num_hidden_layers"], n_head=H, n_kv_head=cfg.get("num_key_value_heads", H),
                     n_embd=C, window_pattern="L", value_embeds=False, resid_scalars=False,
                     rope_base=float(rope.get("rope_theta", 10_000.0)), softcap=float(cfg["final_logit_softcapping"]))


def _hf_config_picochat(cfg, where):
    """GPTConfig for the config.json `picochat export --hf` writes for its own modeling file."""
    n, seq = cfg["num_hidden_layers"], cfg["max_position_embeddings"]
    windows = cfg.get("window_sizes") or [None] * n
    shorts = {w for w in windows if w is not None} - {max(1, seq // 4)}  # the default width is no option
    if len(windows) != n or len(shorts) > 1 or windows[-1] is not None:
        raise UserError(f"{where}: window_sizes {windows} are not a picochat window pattern")
    config = GPTConfig(sequence_len=seq, vocab_size=cfg["vocab_size"], n_layer=n,
                       n_head=cfg["num_attention_heads"], n_kv_head=cfg["num_key_value_heads"],
                       n_embd=cfg["hidden_size"], window_pattern="".join("L" if w is None else "S" for w in windows),
                       short_window=shorts.pop() if shorts else 0, value_embeds=bool(cfg.get("value_embed_layers")),
                       ve_gate_channels=cfg.get("ve_gate_channels", 32), resid_scalars=cfg.get("resid_scalars", True),
                       rope_base=float(cfg["rope_base"]), softcap=float(cfg["softcap"]),
                       rope_bf16=bool(cfg.get("rope_bf16", False)),
                       # absent from exports written before picochat's modeling file computed them
                       ve_gate_scale=float(cfg.get("ve_gate_scale", 2.0)), smear=bool(cfg.get("smear", False)),
                       backout=cfg.get("backout_layer") is not None, qk_scale=float(cfg.get("qk_scale", 1.0)))
    if [i for i in range(n) if config.has_value_embed(i)] != list(cfg.get("value_embed_layers") or []):
        raise UserError(f"{where}: value_embed_layers {cfg['value_embed_layers']} are not picochat's layout")
    if config.backout and cfg["backout_layer"] != config.backout_layer:
        raise UserError(f"{where}: backout_layer {cfg['backout_layer']} is not picochat's (the middle layer, "
                        f"{config.backout_layer})")
    return config


def read_transformers(folder):
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        kind = cfg["model_type"]
    except FileNotFoundError:
        raise UserError(f"{folder}: no config.json") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'config.json'} is truncated or has no model_type") from None
    known = {"nanochat": NANOCHAT_KEYS, "picochat": PICOCHAT_KEYS}.get(kind)
    if known is None:
        raise UserError(f"{folder}: model_type {kind!r}; picochat imports nanochat and picochat models")
    unknown = sorted(set(cfg) - known - HF_GENERIC_KEYS)
    if unknown:
        raise UserError(f"{folder / 'config.json'}: keys this import does not know: {', '.join(unknown)} "
                        f"(an architecture picochat does not compute)")
    try:
        config = (_hf_config_nanochat if kind == "nanochat" else _hf_config_picochat)(cfg, folder / "config.json")
        config.window_sizes()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: missing or bad field {e}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (model.safetensors)")
    from safetensors.torch import load_file
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:
            raise UserError(f"cannot read {f} ({e.__class__.__name__}): truncated or not safetensors") from None
    if kind == "nanochat":
        def rename(k):
            if k == "model.embed_tokens.weight":
                return "wte.weight"
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k)
            if m and m.group(2) in NANOCHAT_NAMES:
                return f"blocks.{m.group(1)}.{NANOCHAT_NAMES[m.group(2)]}.weight"
            return k
        sd = {rename(k): v for k, v in sd.items()}
    weights = fit_weights(config, sd, folder)
    tok = read_hf_tokenizer(folder / "tokenizer.json")
    check_vocab(config, tok, folder)
    return Imported(config, weights, tok, 0, f"transformers {kind} model {folder}")


# ---- the import -------------------------------------------------------------------------------------------------
HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "model_*.pt", "meta_*.json", "tokenizer.pkl"]


def download(repo_id):
    """A hub repo's model files, through huggingface_hub's cache: the local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id} is not a folder here, and downloading it needs huggingface_hub "
                        f"(pip install huggingface_hub), or download it yourself and pass the folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not download {repo_id} from the Hugging Face hub ({e.__class__.__name__}: "
                        f"{first[:160]}): check the name and the network, or pass a local folder") from None


def read_source(source, step=None, tokenizer=""):
    """An Imported from any SOURCE (see the module docstring)."""
    path = Path(source).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        path = download(source)
    if path.is_dir():
        if any(path.glob("model_*.pt")):
            return read_reference(path, step, tokenizer)
        if (path / "config.json").exists():
            return read_transformers(path)
        raise UserError(f"{path}: neither a reference checkpoint (model_<step>.pt) nor a transformers folder "
                        f"(config.json)")
    if path.exists():
        raise UserError(f"{path} is a file: name the folder that holds the checkpoint")
    raise UserError(f"{source}: no such folder")


def write_import(imp: Imported, run, stage="base", force=False):
    """Write imp as runs/<run>/<stage>, atomically. Returns the stage folder."""
    if stage not in ("base", "sft"):
        raise UserError(f"--stage must be base or sft, got {stage!r}")
    run_dir = home_dir() / "runs" / run
    target = run_dir / stage
    run_tok = run_dir / "tokenizer"
    if run_tok.is_dir() and Tokenizer.load(run_tok).hash != imp.tokenizer.hash:
        raise UserError(f"run {run!r} already has another tokenizer ({run_tok}): import into a new --run")
    if target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} already holds a checkpoint: pass --force to replace it, or pick another --run")
    from picochat.checkpoint import load_model, save_checkpoint
    model = GPT(imp.config)
    model.init_weights()  # the rotary buffers; every parameter is then overwritten
    model.load_state_dict(imp.weights, strict=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{stage}.", suffix=".import"))
    try:
        save_checkpoint(tmp, imp.step, model, tokenizer=imp.tokenizer,
                        meta={"stage": stage, "imported_from": imp.source})
        load_model(tmp)  # what chat/sft will do: it must work before the run sees it
        if not run_tok.is_dir():
            imp.tokenizer.save(tmp / "run_tokenizer")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{stage}.", suffix=".replaced"))
            target.rename(old / stage)
        (tmp / "run_tokenizer").exists() and (tmp / "run_tokenizer").rename(run_tok)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def add_parser(sub):
    p = sub.add_parser("import", help="start a run from released weights (reference nanochat, transformers, hub)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("source", help="a checkpoint folder, a transformers folder, or a hub repo id (owner/name)")
    p.add_argument("--run", required=True, help="the run to create (runs/<run>/<stage>)")
    p.add_argument("--stage", default="base", choices=("base", "sft"),
                   help="base for a pretrained model, sft for a chat model (default base)")
    p.add_argument("--step", type=int, default=None,
                   help="which model_<step>.pt of a reference folder (default latest)")
    p.add_argument("--tokenizer", default="", help="the tokenizer when the source has none beside it: a tokenizer.pkl, "
                                                   "tokenizer.json or picochat tokenizer folder")
    p.add_argument("--force", action="store_true", help="replace the stage's existing checkpoint")
    p.set_defaults(func=run)


def run(args):
    imp = read_source(args.source, args.step, args.tokenizer)
    folder = write_import(imp, args.run, args.stage, args.force)
    c = imp.config
    print(f"imported {imp.source}\n  -> {folder} (step {imp.step}): depth {c.n_layer}, width {c.n_embd}, "
          f"vocab {c.vocab_size}, context {c.sequence_len}")
    print(f"try: picochat chat --run {args.run} --stage {args.stage}")
