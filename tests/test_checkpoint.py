from picochat import demo
from picochat.checkpoint import training_notes


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
