"""Checkpoints: safetensors weights + JSON metadata, plus per-rank optimizer and training state for resume.

A stage folder (e.g. runs/<run>/base) holds, per saved step:
  model_<step>.safetensors          fp32 weights (loadable by any safetensors reader)
  optim_<step>_rank<r>.pt           this rank's optimizer shard (tensors and numbers only)
  state_<step>_rank<r>.pt           this rank's loader state and RNG states
  meta_<step>.json                  config, step, tokenizer hash, world size, each file's size and sha256:
                                    written LAST, so a checkpoint exists only once all of its files are complete
a copy of the tokenizer in tokenizer/, so a checkpoint folder is self-contained, and .lock, which the run
writing the folder holds (see stage_lock). Loading checks each file
against its recorded sha256 before reading it (PICOCHAT_VERIFY_CHECKPOINTS=0 skips that; checkpoints saved
before hashes were recorded are checked by size only).
"""
import os
import json
import re
import fcntl
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch
import torch.distributed as dist
from safetensors.torch import save, load_file

from picochat.common import (UserError, atomic_write_bytes, atomic_write_json, atomic_write_stream, dist_info,
                             file_sha256, home_dir, print0)
from picochat.model import GPT, GPTConfig, config_to_dict
from picochat.tokenizer import Tokenizer, RANKS_FILE, META_FILE, HF_FILE

STAGES = ("base", "sft", "rl")  # the stage folders of a run, in training order: the last one trained is the default


class CheckpointMeta(TypedDict, total=False):
    """meta_<step>.json, as save_checkpoint writes it and read_meta returns it (other modules read these keys)."""
    step: int                   # always present, like config, world_size, files and sha256
    config: dict                # GPTConfig as a dict (model.config_to_dict); build_model reads it back
    world_size: int             # ranks that wrote the checkpoint: how many optim/state shards it has
    tokenizer_hash: str | None  # Tokenizer.hash of the tokenizer the model was trained with
    files: dict                 # {file name: size in bytes} of every file of the checkpoint
    sha256: dict                # {file name: hex digest}, checked on load (older checkpoints lack it)
    optim_shards: list          # which rank's optimizer shard holds which parameters (see load_rank_shards)
    stage: str                  # "base", "sft" or "rl": the stage that wrote it
    args: dict                  # that stage's flags (common.vars_json)
    val_bpb: float | None       # base: validation bits per byte at this step
    device_batch_size: int      # base: rows per micro-batch and micro-batches per step, to resume the data
    num_streams: int            #   order exactly
    val_loss: float | None      # sft: validation loss at this step
    base: str                   # sft: the checkpoint folder it started from
    source: str                 # rl: the checkpoint folder it started from
    accuracy: float | None      # rl: held-apart accuracy at the last eval
    imported_from: str          # import: where the weights came from


class StageSummary(TypedDict, total=False):
    """summary.json, the last file a pretrain, sft or rl run writes (its presence marks the stage done for
    speedrun; report reads the rest). Keys shared by the three stages come first, then each stage's own."""
    stage: str                      # "base", "sft" or "rl"
    step: int                       # the step the run ended at
    train_seconds: float            # training time, evals and checkpoints excluded (report's cost)
    device: str                     # e.g. "cuda:0" or "cpu", with world_size ranks
    world_size: int
    args: dict                      # the run's flags (common.vars_json)
    val_bpb: float | None           # base: validation bits per byte at the end
    num_params: int                 # base: parameters, and those the scaling rules count
    scaling_params: int
    tokens: int                     # base: tokens trained on, and the rate, MFU and FLOPs per token behind it
    tokens_per_sec: float | None
    mfu: float | None
    flops_per_token: float
    config: dict                    # base: GPTConfig as a dict
    device_batch_size: int          # base: rows per micro-batch, micro-batches per rank and step
    grad_accum: int
    peak_memory_mb: float | None    # base: CUDA only
    val_loss: float | None          # sft: validation loss and format compliance at the end, and before training
    format_compliance: float | None  # sft and rl
    base_format_compliance: float | None
    eval: dict                      # sft and rl: the last held-apart eval, and the one before training
    base_eval: dict                 # sft
    start_eval: dict                # rl
    mixture: dict                   # sft: {task: conversations}, and how rows were packed
    rows: int
    truncated: int
    row_fill: float
    task: str                       # rl: the task trained on, greedy accuracy at the end and at the start
    accuracy: float | None
    start_accuracy: float | None
    pass_k: int                     # rl: k of pass@k (0: off), pass@k at the end and at the start
    pass_at_k: float | None
    start_pass_at_k: float | None
    eval_problems: int | None       # rl: held-apart problems scored


LOCK_FILE = ".lock"


@contextmanager
def stage_lock(folder):
    """Hold folder for one training run, so that a second run writing there stops at once instead of mixing its
    checkpoints with this one's. Rank 0 holds it (the other ranks write there only in step with rank 0). The
    operating system drops the lock when the process dies, so a killed run resumes with no cleanup. Raises
    UserError naming the folder, and the holder's pid, when another process holds it."""
    if dist_info()[1] != 0:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:  # appending: opening it must not erase the holder's pid
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            holder = f"process {pid}" if pid.isdigit() else "another process"
            raise UserError(f"{folder} is in use by another run ({holder} holds {folder / LOCK_FILE}): wait for it "
                            f"to finish or stop it, or write to another --out") from None
        except OSError as e:  # a filesystem without locks (some network mounts): train unguarded rather than not
            print0(f"warning: cannot lock {folder / LOCK_FILE} ({e}): nothing stops another run from writing there")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # the next run that finds the folder busy must not name this finished process


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(folder, step, model, optimizer=None, *, rank_state=None, meta: CheckpointMeta | None = None,
                    tokenizer=None, keep=2):
    """Every rank calls this. Rank 0 writes the weights and the meta; each rank writes its own shards."""
    folder = Path(folder)
    _, rank, _, world = dist_info()
    folder.mkdir(parents=True, exist_ok=True)
    sha256 = {}  # of the files this rank writes, hashed as they are written (not read back)
    if optimizer is not None:
        name = f"optim_{step:06d}_rank{rank}.pt"
        sha256[name] = atomic_write_stream(folder / name, lambda f: torch.save(optimizer.shard_state(), f))
    if rank_state is not None:
        name = f"state_{step:06d}_rank{rank}.pt"
        sha256[name] = atomic_write_stream(folder / name, lambda f: torch.save(rank_state, f))
    if rank == 0:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        name = f"model_{step:06d}.safetensors"
        # serialized in memory (safetensors writes a path, not a stream), so the hash comes from the bytes in hand
        sha256[name] = atomic_write_bytes(folder / name, save(weights))
        if tokenizer is not None:
            tokenizer.save(folder / "tokenizer")
    sha256 = _gather(sha256)  # also a barrier: all shards are on disk before the meta declares the checkpoint complete
    if rank == 0:
        files = [f"model_{step:06d}.safetensors"]
        files += [f"optim_{step:06d}_rank{r}.pt" for r in range(world)] if optimizer is not None else []
        files += [f"state_{step:06d}_rank{r}.pt" for r in range(world)] if rank_state is not None else []
        full = dict(meta or {}, step=step, config=config_to_dict(model.config), world_size=world,
                    tokenizer_hash=tokenizer.hash if tokenizer is not None else (meta or {}).get("tokenizer_hash"),
                    files={f: (folder / f).stat().st_size for f in files}, sha256={f: sha256[f] for f in files})
        if optimizer is not None:
            full["optim_shards"] = optimizer.shard_index()  # which rank's shard holds what: see load_rank_shards
        atomic_write_json(folder / f"meta_{step:06d}.json", full)
        for old in list_steps(folder)[:-keep] if keep else []:
            prune(folder, old)
    _barrier()


def step_files(folder, step):
    """The files of one step's checkpoint in folder (its meta first), matched by exact name: step 123456's are
    not step 1234567's."""
    pattern = re.compile(rf"(meta_{step:06d}\.json|model_{step:06d}\.safetensors|(optim|state)_{step:06d}_rank\d+\.pt)")
    return sorted((f for f in Path(folder).iterdir() if pattern.fullmatch(f.name)),
                  key=lambda f: not f.name.startswith("meta_"))


def prune(folder, step):
    """Delete one step's checkpoint: its meta first, so that an interrupted prune leaves no meta naming a missing
    file."""
    for f in step_files(folder, step):
        f.unlink()


def _gather(sha256):
    """Every rank's {file: sha256}, merged (each rank hashed the files it wrote)."""
    if not dist.is_initialized():
        return sha256
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sha256)
    return {name: h for d in every for name, h in d.items()}


def list_steps(folder):
    folder = Path(folder)
    steps = [int(m.group(1)) for f in folder.glob("meta_*.json") if (m := re.fullmatch(r"meta_(\d+)\.json", f.name))]
    return sorted(steps)


def latest_step(folder):
    steps = list_steps(folder)
    return steps[-1] if steps else None


def latest_stage(run_dir):
    """(folder, stage) of the most trained stage of run_dir that has a checkpoint (rl, else sft, else base);
    None when it has none."""
    run_dir = Path(run_dir)
    for s in reversed(STAGES):
        if latest_step(run_dir / s) is not None:
            return run_dir / s, s
    return None


def resolve_checkpoint(run, stage=None, checkpoint=""):
    """(folder, stage name) of the checkpoint to load for --run/--stage/--checkpoint: the folder checkpoint names
    (its stage: stage if given, else its folder name when that is a stage, else "checkpoint"); else
    runs/<run>/<stage>, which must hold a checkpoint; else the run's most trained stage. Raises UserError when
    there is nothing to load."""
    if checkpoint:
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise UserError(f"--checkpoint {checkpoint}: no such folder")
        return folder, stage or (folder.name if folder.name in STAGES else "checkpoint")
    runs = home_dir() / "runs" / run
    if stage:
        if stage not in STAGES:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
        folder = runs / stage
        if latest_step(folder) is None:
            raise UserError(f"run {run!r} has no {stage} checkpoint in {folder}: train that stage first "
                            f"(or pick another --stage)")
        return folder, stage
    found = latest_stage(runs)
    if found is None:
        raise UserError(f"run {run!r} has no checkpoint in {runs} (looked in {', '.join(STAGES)}): train one first "
                        f"(`picochat speedrun`), or name another --run or a --checkpoint folder")
    return found


def read_meta(folder, step=None) -> CheckpointMeta:
    """The meta of a complete checkpoint (latest by default), after checking every file it lists."""
    folder = Path(folder)
    step = latest_step(folder) if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {folder}: train this stage first")
    path = folder / f"meta_{step:06d}.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no checkpoint for step {step} in {folder} (have: {list_steps(folder)})") from None
    except ValueError:
        raise UserError(f"{path} is corrupt (not valid JSON): "
                        "delete it to fall back to an earlier checkpoint") from None
    for name, size in meta["files"].items():
        f = folder / name
        if not f.exists():
            raise UserError(f"checkpoint step {step} in {folder} is incomplete: {name} is missing")
        if f.stat().st_size != size:
            raise UserError(f"checkpoint file {f} is truncated or changed ({f.stat().st_size} bytes, expected {size}): "
                            f"delete meta_{step:06d}.json to fall back to an earlier checkpoint")
    return meta


VERIFY_ENV = "PICOCHAT_VERIFY_CHECKPOINTS"


def verify_file(folder, meta, name):
    """Check folder/name against the sha256 its checkpoint's meta recorded (read_meta has checked its size);
    a UserError names a corrupt file. A no-op for a checkpoint saved before hashes were recorded, and with
    PICOCHAT_VERIFY_CHECKPOINTS=0 (hashing reads every byte of a file once more)."""
    expected = (meta.get("sha256") or {}).get(name)
    if expected is None or os.environ.get(VERIFY_ENV, "1") == "0":
        return
    path = Path(folder) / name
    got = file_sha256(path)
    if got != expected:
        raise UserError(f"checkpoint file {path} is corrupt: its sha256 is {got}, the meta recorded {expected}; "
                        f"delete meta_{meta['step']:06d}.json to fall back to an earlier checkpoint "
                        f"(or load it anyway with {VERIFY_ENV}=0)")


def load_weights(folder, step):
    path = Path(folder) / f"model_{step:06d}.safetensors"
    try:
        return load_file(str(path))
    except Exception as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}: {e}): the checkpoint is corrupt") from None


def load_torch(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}): "
                        "the checkpoint is corrupt or truncated") from None


def build_model(meta: CheckpointMeta, weights, device):
    config = GPTConfig(**meta["config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffers
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def load_model(folder, step=None, device="cpu"):
    """(model, tokenizer, meta) from a stage folder, ready for inference."""
    folder = Path(folder)
    meta = read_meta(folder, step)
    tokenizer = Tokenizer.load(folder / "tokenizer")
    if meta.get("tokenizer_hash") and tokenizer.hash != meta["tokenizer_hash"]:
        raise UserError(f"the tokenizer in {folder / 'tokenizer'} is not the one this checkpoint was trained with")
    verify_file(folder, meta, f"model_{meta['step']:06d}.safetensors")
    model = build_model(meta, load_weights(folder, meta["step"]), torch.device(device))
    return model.eval(), tokenizer, meta


def load_start(folder, tokenizer_dir, device, what="base"):
    """(model, tokenizer, meta) of the latest checkpoint in folder, refusing one trained with a tokenizer other
    than the run's."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta_file = folder / f"meta_{meta['step']:06d}.json"
    run_tokenizer = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else folder / "tokenizer"
    tokenizer = Tokenizer.load(run_tokenizer)
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise UserError(f"{meta_file}: this {what} checkpoint was trained with another tokenizer "
                        f"({meta.get('tokenizer_hash')}) than {tokenizer_dir or folder / 'tokenizer'} "
                        f"({tokenizer.hash}); use the run's own tokenizer, or train the {what} model with this one")
    verify_file(folder, meta, f"model_{meta['step']:06d}.safetensors")
    model = build_model(meta, load_weights(folder, meta["step"]), device)
    return model, tokenizer, meta


def load_rank_shards(folder, meta, optimizer=None):
    """Restore optimizer shards (re-sharded for any rank count) and return this rank's saved state, or None
    when the rank count changed (the loader position then cannot be restored exactly). Each rank reads only
    the optimizer shards that hold state for what it owns (meta["optim_shards"]: the saving run's
    MuonAdamW.shard_index()); all of them for checkpoints saved without that index."""
    folder, step = Path(folder), meta["step"]
    _, rank, _, world = dist_info()
    if optimizer is not None:
        saved = meta.get("optim_shards")
        ranks = optimizer.shards_to_read(saved) if saved is not None else range(meta["world_size"])
        names = [f"optim_{step:06d}_rank{r}.pt" for r in ranks]
        for name in names:
            verify_file(folder, meta, name)
        try:
            optimizer.load_shards([load_torch(folder / name) for name in names])
        except ValueError as e:
            raise UserError(f"cannot restore the optimizer from step {step} in {folder}: {e}") from None
    state_path = folder / f"state_{step:06d}_rank{rank}.pt"
    if meta["world_size"] != world or not state_path.exists():
        return None
    verify_file(folder, meta, state_path.name)
    return load_torch(state_path)


def resume_finetune(folder, meta, stage, optimizer):
    """Restore a fine-tuning stage (sft, rl) cut off in folder: its optimizer shard and RNG state. Returns the step
    to go on from."""
    if meta.get("stage") != stage:
        raise UserError(f"{folder} holds a {meta.get('stage')} checkpoint, not an {stage.upper()} one: "
                        f"pick another --out")
    state = load_rank_shards(folder, meta, optimizer)
    if state is not None:
        torch.set_rng_state(state["rng"])
    print0(f"resumed from step {meta['step']} in {folder}")
    return meta["step"]


def copy_tokenizer(src_folder, dst_folder):
    dst = Path(dst_folder) / "tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    for name in (RANKS_FILE, META_FILE, HF_FILE):
        shutil.copy2(Path(src_folder) / name, dst / name)


# prompts that show a chat model trained on the full mixture (conversations, GSM8K, multiple choice) at work
GENERAL_EXAMPLES = ("What is the capital of France?", "Tom has 5 apples and buys 3 more. How many apples does he have?",
                    "Why is the sky blue?")


def training_notes(meta):
    """{"trained_on": one line, "examples": prompts worth trying} for a stage's checkpoint meta: the demo
    curriculum's own description for a model trained on it, the data folder and mixture otherwise."""
    from picochat import demo
    args = meta.get("args") or {}
    stage = meta.get("stage", "base")
    own = ", ".join(Path(p).name for p in args.get("data") or []) if stage == "sft" else ""  # sft --data
    if own and args.get("data_only"):  # the base may be imported: all that is known is what SFT added
        return {"trained_on": f"whatever its base model learned, then SFT on your conversations ({own})",
                "examples": list(GENERAL_EXAMPLES)}
    if args.get("mixture") == "demo" or args.get("task") == "demo" or "/data/demo/" in str(args.get("data", "")):
        return {"trained_on": demo.ABOUT, "examples": list(demo.EXAMPLES)}
    if stage == "base":
        return {"trained_on": f"plain text from {args.get('data') or 'the pretraining shards'} (a base model "
                              f"continues text; it does not follow a chat format)",
                "examples": ["The capital of France is", "Once upon a time"]}
    mixture = f"the {args.get('mixture', 'SFT')} chat mixture" + (f" and your conversations ({own})" if own else "")
    then = {"sft": mixture,
            "rl": f"chat fine-tuning and RL on {args.get('task', 'word problems')}"}
    return {"trained_on": f"pretraining text, then {then.get(stage, stage)}", "examples": list(GENERAL_EXAMPLES)}


# ---- loading a model to talk to (chat, serve) --------------------------------------------------------------
# --dtype: what the engine decodes with (None: decode.inference_dtype, the device's own choice)
ENGINE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--run", default="",
                   help="run name under $PICOCHAT_HOME/runs (default: the run trained most recently)")
    g.add_argument("--stage", choices=STAGES[::-1], default=None,  # most trained first, as the default picks
                   help="which checkpoint of the run (default: the latest stage that has one: rl, else sft, else base)")
    g.add_argument("--checkpoint", default="", help="a stage folder to load instead of --run/--stage")
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    g.add_argument("--device", default="", help="cpu, cuda or mps (default: the best available)")
    g.add_argument("--dtype", choices=list(ENGINE_DTYPES), default="auto",
                   help="weights for decoding: auto = bfloat16 on GPUs, float32 on CPUs; int8 (CPUs only): int8 "
                        "matrices with a scale per output channel, a quarter of float32's bytes to read per token")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start)")
    g.add_argument("--no-tool", action="store_true", help="do not run the model's calculator tool calls")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default; 1 is often fastest on a busy machine)")


def load_chat_model(args):
    """(model, tokenizer, info) for chat and serve. info["dtype"] is what to give Engine(dtype=...) for --dtype
    (auto: None); the model's weights are in the dtype the engine computes in (bf16 on GPUs unless --dtype says
    otherwise), so that no second full-precision copy stays in memory."""
    from picochat.common import autodetect_device, pick_run
    from picochat.decode import inference_dtype
    from picochat.model import describe
    run = "" if args.checkpoint else pick_run(args.run)
    folder, stage = resolve_checkpoint(run, args.stage, args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device())
    model, tokenizer, meta = load_model(folder, args.step, device)
    engine_dtype = ENGINE_DTYPES[args.dtype]
    dtype = inference_dtype(device) if engine_dtype in (None, torch.int8) else engine_dtype
    if dtype != torch.float32:
        model.to(dtype=dtype)
    weights = ", int8 weights" if engine_dtype == torch.int8 else ""
    info = {"run": run or folder.parent.name, "stage": stage, "folder": str(folder), "step": meta["step"],
            "description": f"{stage} model from {folder} (step {meta['step']}): {describe(model)}{weights}",
            "dtype": engine_dtype, **training_notes(meta)}
    return model, tokenizer, info
