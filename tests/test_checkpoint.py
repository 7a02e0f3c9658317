import torch

from picochat import checkpoint, demo
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
