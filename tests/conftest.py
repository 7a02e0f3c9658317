import tempfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test writes under its own PICOCHAT_HOME, never the user's."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): with tiny
    models on a shared 2-core machine, OpenMP barriers across 2 threads cost ~20x the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_root():
    """Small slices of the real data sets, in ../shared/data's layout (tests/fixtures/data, see its PROVENANCE.md):
    what the default suite reads, so that it runs on a fresh clone."""
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data():
    """The full data sets beside the checkout, for the few tests about them (marked `shared`, which CI runs)."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the full data sets at {SHARED} (absent on a fresh clone; CI has them)")
    return SHARED


@pytest.fixture(scope="session")
def webtext_tokenizer(tmp_path_factory, data_root):
    """A 1K-vocab tokenizer trained once on the fixture prose's training shard."""
    from picochat.tokenizer import Tokenizer
    import pyarrow.parquet as pq
    texts = pq.read_table(data_root / "webtext" / "shards" / "shard_00000.parquet").column("text").to_pylist()
    tok = Tokenizer.train(iter(texts), 1024, max_chars=3_000_000)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return folder


@pytest.fixture(scope="session")
def tok(webtext_tokenizer):
    from picochat.tokenizer import Tokenizer
    return Tokenizer.load(webtext_tokenizer)


@pytest.fixture(scope="session")
def demo_setup(tmp_path_factory, tok):
    """A small demo curriculum (built once) and the tokenizer to pair it with."""
    from picochat import demo
    root = tmp_path_factory.mktemp("sftdemo")
    demo.generate(root / "demo", seed=0, scale=0.02)
    return root, tok


def pytest_itemcollected(item):
    """Tests that read the full data sets get the `shared` mark: `pytest -m shared` runs just them."""
    if "shared_data" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.shared)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: start the smoke run only when a test needs it
def pytest_collection_modifyitems(config, items):
    """The end-to-end speedrun (test_speedrun.py) runs for minutes on one core: start it now, in the background,
    so that it runs beside the other tests, and move the tests that read it to the end."""
    e2e = [item for item in items if "smoke_run" in getattr(item, "fixturenames", ())]
    if e2e and not config.option.collectonly:
        items[:] = [item for item in items if item not in e2e] + e2e
        config.smoke_module = e2e[0].module
        config.smoke_module.start_in_background(Path(tempfile.mkdtemp(prefix="picochat-smoke-")))


def pytest_sessionfinish(session):
    module = getattr(session.config, "smoke_module", None)
    if module is not None:
        module.stop_background(keep_files=session.testsfailed > 0)
