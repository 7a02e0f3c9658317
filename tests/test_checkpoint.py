import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat import checkpoint, demo
from picochat.cli import main
from picochat.common import UserError
from picochat.checkpoint import training_notes
from picochat.model import GPT, GPTConfig
from picochat.optim import build_optimizer


def test_training_notes_say_what_the_model_knows():
    """A demo model announces its curriculum and the demo's prompts; other models their data and general prompts."""
    for meta in ({"stage": "base", "args": {"data": "/home/u/.cache/picochat/data/demo/pretrain"}},
                 {"stage": "sft", "args": {"mixture": "demo"}}, {"stage": "rl", "args": {"task": "demo"}}):
        assert training_notes(meta) == {"trained_on": demo.ABOUT, "examples": list(demo.EXAMPLES)}
    base = training_notes({"stage": "base", "args": {"data": "/data/my-shards"}})
    assert "/data/my-shards" in base["trained_on"] and "does not follow a chat format" in base["trained_on"]
    rl = training_notes({"stage": "rl", "args": {"task": "gsm8k"}})
    assert "RL on gsm8k" in rl["trained_on"] and rl["examples"]
    assert training_notes({})["trained_on"]  # an old checkpoint without args still gets a line
    # sft --data: the user's files are named; alone (--data-only), the mixture flag's default is no claim
    mixed = training_notes({"stage": "sft", "args": {"mixture": "full", "data": ["/x/mine.jsonl"]}})
    assert mixed["trained_on"] == "pretraining text, then the full chat mixture and your conversations (mine.jsonl)"
    alone = training_notes({"stage": "sft", "args": {"mixture": "demo", "data": ["/x/a.jsonl", "b.jsonl"],
                                                     "data_only": True}})
    assert alone["trained_on"] == "whatever its base model learned, then SFT on your conversations (a.jsonl, b.jsonl)"


def tiny_model():
    return GPT(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16, head_dim=32)).init_weights(seed=0)


def save_step(folder, step, model=None, keep=0):
    model = model or tiny_model()
    checkpoint.save_checkpoint(folder, step, model, build_optimizer(model), rank_state={"rng": torch.get_rng_state()},
                               meta={"stage": "base"}, keep=keep)


def test_pruning_a_step_leaves_steps_whose_number_starts_with_it(tmp_path):
    """Pruning step 123456 deletes its files only: step 1234567's names start with the same digits."""
    for step in (123456, 1234567):
        save_step(tmp_path, step)
    longer = {f.name for f in checkpoint.step_files(tmp_path, 1234567)}
    assert longer == {"meta_1234567.json", "model_1234567.safetensors", "optim_1234567_rank0.pt",
                      "state_1234567_rank0.pt"}
    save_step(tmp_path, 2000000, keep=2)
    assert checkpoint.list_steps(tmp_path) == [1234567, 2000000]
    assert not list(tmp_path.glob("*_123456[._]*"))
    assert longer <= {f.name for f in tmp_path.iterdir()}
    assert checkpoint.read_meta(tmp_path, 1234567)["step"] == 1234567


def flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def save_with_tokenizer(folder, step=3):
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.train(iter(["hello world, the quick brown fox"] * 20), 300)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=16, head_dim=32)).init_weights(seed=0)
    checkpoint.save_checkpoint(folder, step, model, build_optimizer(model), rank_state={"rng": torch.get_rng_state()},
                               meta={"stage": "base"}, tokenizer=tok)
    return model


def test_meta_records_the_sha256_of_every_file(tmp_path):
    """The hashes are taken while writing; they match the files on disk."""
    save_step(tmp_path, 5)
    meta = checkpoint.read_meta(tmp_path)
    assert set(meta["sha256"]) == set(meta["files"]) == {"model_000005.safetensors", "optim_000005_rank0.pt",
                                                          "state_000005_rank0.pt"}
    for name, digest in meta["sha256"].items():
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_a_flipped_byte_is_named_on_load(tmp_path):
    """One flipped bit in the weights (same size, still a valid file) is caught before the model is built; in an
    optimizer or state shard, before it is read. The error names the file, says corrupt, and gives both hashes."""
    save_with_tokenizer(tmp_path)
    meta = checkpoint.read_meta(tmp_path)
    weights = tmp_path / "model_000003.safetensors"
    good = weights.read_bytes()
    flip_byte(weights)
    with pytest.raises(UserError) as e:
        checkpoint.load_model(tmp_path)
    msg = str(e.value)
    assert str(weights) in msg and "corrupt" in msg and meta["sha256"][weights.name] in msg
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in msg
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_start(tmp_path, tmp_path / "tokenizer", torch.device("cpu"))
    weights.write_bytes(good)
    model, _, _ = checkpoint.load_model(tmp_path)
    for name in ("optim_000003_rank0.pt", "state_000003_rank0.pt"):
        shard = tmp_path / name
        good = shard.read_bytes()
        flip_byte(shard, len(good) // 2)
        with pytest.raises(UserError, match=f"{name} is corrupt"):
            checkpoint.load_rank_shards(tmp_path, meta, build_optimizer(model))
        shard.write_bytes(good)
    assert checkpoint.load_rank_shards(tmp_path, meta, build_optimizer(model))["rng"].numel() > 0


def test_verification_can_be_skipped(tmp_path, monkeypatch):
    """PICOCHAT_VERIFY_CHECKPOINTS=0 loads a checkpoint without hashing it (a flipped weight bit then loads)."""
    save_with_tokenizer(tmp_path)
    flip_byte(tmp_path / "model_000003.safetensors")
    monkeypatch.setenv("PICOCHAT_VERIFY_CHECKPOINTS", "0")
    checkpoint.load_model(tmp_path)


def test_checkpoints_saved_without_hashes_still_load(tmp_path):
    """A meta from before hashes were recorded (sizes only) loads as before; its sizes are still checked."""
    model = save_with_tokenizer(tmp_path)
    meta_path = tmp_path / "meta_000003.json"
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    loaded, _, old_meta = checkpoint.load_model(tmp_path)
    assert "sha256" not in old_meta
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert checkpoint.load_rank_shards(tmp_path, old_meta, build_optimizer(model)) is not None
    with open(tmp_path / "state_000003_rank0.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="truncated or changed"):
        checkpoint.read_meta(tmp_path)


def hold_lock(folder, pid):
    """Hold folder's lock through a file descriptor of our own, as another run would, naming pid as the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / checkpoint.LOCK_FILE, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(f"{pid}\n")
    f.flush()
    return f


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rl"])
def test_a_second_run_on_a_folder_stops_at_once(tmp_path, capsys, stage):
    """While one run holds a stage folder, another training run on it stops before doing anything, with one line
    naming the folder and the pid holding it. (SFT reads and checks its data first, writing nothing before.)"""
    folder = tmp_path / "busy"
    held = hold_lock(folder, 424242)
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    try:
        assert main([stage, "--run", "t", "--out", str(folder)] +
                    (["--data", str(data), "--data-only"] if stage == "sft" else [])) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"{folder} is in use by another run" in err and "424242" in err
    assert os.listdir(folder) == [checkpoint.LOCK_FILE]  # nothing was written


def test_the_lock_is_held_for_the_run_and_released_when_it_ends(tmp_path):
    with checkpoint.stage_lock(tmp_path):
        with pytest.raises(UserError, match=f"process {os.getpid()} holds"):
            with checkpoint.stage_lock(tmp_path):
                pass
    with checkpoint.stage_lock(tmp_path):  # free again once the run is over
        pass
    with pytest.raises(RuntimeError):
        with checkpoint.stage_lock(tmp_path):
            raise RuntimeError("the run failed")
    with checkpoint.stage_lock(tmp_path):  # a failed run lets go too
        pass


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    """The operating system drops the lock of a process that dies (here by SIGKILL, with no chance to clean up):
    the next run takes the folder with no manual cleanup."""
    code = ("import sys; from picochat import checkpoint\n"
            "with checkpoint.stage_lock(sys.argv[1]):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(checkpoint.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=f"process {proc.pid} holds"):
            with checkpoint.stage_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with checkpoint.stage_lock(tmp_path):
        assert (tmp_path / checkpoint.LOCK_FILE).read_text() == f"{os.getpid()}\n"
