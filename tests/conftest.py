import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test writes under its own PICOCHAT_HOME, never the user's."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def webtext_tokenizer(tmp_path_factory, shared_data):
    """A 1K-vocab tokenizer trained once on the webtext training shard."""
    from picochat.tokenizer import Tokenizer
    import pyarrow.parquet as pq
    texts = pq.read_table(shared_data / "webtext" / "shards" / "shard_00000.parquet").column("text").to_pylist()
    tok = Tokenizer.train(iter(texts), 1024, max_chars=3_000_000)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return folder
