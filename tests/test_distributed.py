"""Data parallel training on the CPU (gloo), and the GPU fast paths that can be exercised without a GPU.

The torchrun runs go through `python -m torch.distributed.run ... -m picochat.launch -- <command>`, which is
what picochat.launch builds for the speedrun (the `--` keeps torchrun's parser off our --run)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat import fastpath, launch
from picochat.cli import main
from picochat.common import UserError, init_runtime
from picochat.model import GPT, GPTConfig
from picochat.optim import MuonAdamW, build_optimizer, layout

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth", "2", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "2048", "--log-every", "5", "--matrix-lr", "0.3", "--embedding-lr", "3",
        "--unembedding-lr", "0.1"]
STEPS = ["--num-iterations", "20", "--eval-every", "10", "--save-every", "10", "--keep", "3"]


def picochat(home, *args, nproc=1, timeout=300):
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = launch.torchrun_command(list(args), nproc)
    else:
        cmd = [sys.executable, "-m", "picochat", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def with_flag(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def records(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def curve(folder):
    return [(r["step"], "loss" if "loss" in r else "val_bpb", r.get("loss", r.get("val_bpb"))) for r in records(folder)]


def assert_same_curve(a, b, rtol=1e-5):
    ca, cb = curve(a), curve(b)
    assert [c[:2] for c in ca] == [c[:2] for c in cb]
    for (step, kind, x), (_, _, y) in zip(ca, cb):
        assert abs(x - y) <= rtol * abs(x), (step, kind, x, y)


def checkpoint_copy(src, dst, step):
    """A folder holding only checkpoint `step` of src, with the metrics up to it (as if killed right after)."""
    dst.mkdir(parents=True)
    for f in src.glob(f"*_{step:06d}*"):
        shutil.copy2(f, dst / f.name)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    keep = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in keep))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, webtext_tokenizer, data_root):
    """The same 20 steps twice: 2 ranks x 1 micro-batch, and 1 process x 2 accumulated micro-batches."""
    root = tmp_path_factory.mktemp("dist")
    home = root / "home"
    shutil.copytree(webtext_tokenizer, home / "runs" / "t" / "tokenizer")
    data = str(data_root / "webtext" / "shards")
    common = ["pretrain", "--run", "t", "--data", data, *TINY, *STEPS]
    two = picochat(home, *common, "--out", str(root / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = picochat(home, *common, "--out", str(root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    return dict(root=root, home=home, data=data, common=common, two=root / "two", one=root / "one", stdout2=two.stdout)


def test_two_ranks_equal_one_process_with_accumulation(runs):
    assert "x 2 ranks x 1 accumulation steps" in runs["stdout2"]
    assert len([r for r in records(runs["two"]) if "loss" in r]) == 20
    assert_same_curve(runs["one"], runs["two"])
    a, b = load_file(runs["one"] / "model_000020.safetensors"), load_file(runs["two"] / "model_000020.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # only rank 0 writes the logs, summary and meta; each rank writes its own optimizer and loader shard
    meta = json.loads((runs["two"] / "meta_000020.json").read_text())
    assert meta["world_size"] == 2 and meta["num_streams"] == 2
    assert {f"optim_000020_rank{r}.pt" for r in (0, 1)} <= set(meta["files"])
    assert len(meta["optim_shards"]) == 2  # what each rank's optimizer shard holds, so a resume reads only its own
    assert json.loads((runs["two"] / "summary.json").read_text())["world_size"] == 2


def test_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    out = checkpoint_copy(runs["two"], tmp_path / "resumed", 10)
    r = picochat(runs["home"], *runs["common"], "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming 2-rank checkpoint on 1 rank(s): data order continues exactly" in r.stdout
    assert_same_curve(out, runs["two"])


def test_one_process_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    out = checkpoint_copy(runs["one"], tmp_path / "resumed", 10)
    r = picochat(runs["home"], *runs["common"], "--out", str(out), "--resume", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_curve(out, runs["one"])


def test_other_micro_batch_restarts_the_data_with_a_warning(runs, tmp_path):
    out = checkpoint_copy(runs["one"], tmp_path / "resumed", 10)
    args = with_flag(with_flag(runs["common"], "--device-batch-size", "8"), "--num-iterations", "12")
    r = picochat(runs["home"], *args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the data order restarts" in r.stdout and "--device-batch-size 4" in r.stdout


@pytest.fixture(scope="module")
def sft_runs(runs):
    """SFT from the base model above, 4 steps: 2 ranks x 1 micro-batch against 1 process x 2."""
    convs = runs["root"] / "convs.jsonl"
    sums = [[{"role": "user", "content": f"What is {i} plus {i}?"},
             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}] for i in range(40)]
    convs.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in sums))
    common = ["sft", "--run", "t", "--base", str(runs["one"]), "--mixture", "full", "--data", str(convs),
              "--seq-len", "64", "--device-batch-size", "2", "--num-iterations", "4", "--eval-every", "0",
              "--save-every", "2", "--keep", "3"]
    root = runs["root"]
    two = picochat(runs["home"], *common, "--grad-accum", "1", "--out", str(root / "sft_two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = picochat(runs["home"], *common, "--grad-accum", "2", "--out", str(root / "sft_one"))
    assert one.returncode == 0, one.stderr[-3000:]
    return dict(common=common, two=root / "sft_two", one=root / "sft_one")


def losses(folder):
    return [(r["step"], r["loss"]) for r in records(folder) if "loss" in r]


def assert_same_losses(a, b, rtol=1e-5):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] and la
    assert all(abs(x - y) <= rtol * abs(x) for (_, x), (_, y) in zip(la, lb)), (la, lb)


def test_sft_two_ranks_equal_one_process_with_accumulation(sft_runs):
    assert len(losses(sft_runs["two"])) == 4
    assert_same_losses(sft_runs["one"], sft_runs["two"])


def test_sft_two_rank_checkpoint_resumes_in_one_process(runs, sft_runs, tmp_path):
    out = checkpoint_copy(sft_runs["two"], tmp_path / "resumed", 2)
    r = picochat(runs["home"], *sft_runs["common"], "--grad-accum", "2", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(out, sft_runs["two"])


def test_rl_two_ranks_equal_one_process(tmp_path, webtext_tokenizer):
    """Two RL steps (2 PPO epochs each) from a toy SFT model that earns reward about one time in
    ten, so the advantages are not all zero: 2 ranks x 2 problems equal 1 process x 4 problems."""
    from test_sft import toy_curriculum, TOY_SFT
    from picochat.tokenizer import Tokenizer
    home = tmp_path / "home"
    toy_curriculum(home, Tokenizer.load(webtext_tokenizer))
    r = picochat(home, *TOY_SFT)
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["rl", "--run", "t", "--num-steps", "2", "--prompts-per-step", "4", "--num-samples", "8",
              "--max-tokens", "8", "--eval-every", "0", "--final-eval-problems", "4", "--pass-k", "0",
              "--device-batch-size", "8", "--ppo-epochs", "2", "--init-lr-frac", "0.5"]
    two = picochat(home, *common, "--out", str(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = picochat(home, *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    ra = [r for r in records(tmp_path / "one") if "reward" in r]
    rb = [r for r in records(tmp_path / "two") if "reward" in r]
    assert len(ra) == len(rb) == 2
    assert all(r["trained_replies"] > 0 for r in ra), ra  # a real policy gradient, not all-zero advantages
    for a, b in zip(ra, rb):
        assert ((a["reward"], a["trained_replies"], a["sampled_tokens"])
                == (b["reward"], b["trained_replies"], b["sampled_tokens"]))
    a = load_file(tmp_path / "one" / "model_000002.safetensors")
    b = load_file(tmp_path / "two" / "model_000002.safetensors")
    base = load_file(next((home / "runs" / "t" / "sft").glob("model_*.safetensors")))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the update moved the weights
    # per tensor, the gap between the runs against how far the two steps moved the weights: fp32 sums in
    # another order (a lost or doubled rank's gradient would make it ~0.1-1), which Adam's normalised updates
    # carry into a few embedding entries at full size, so no elementwise bound
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-4 * (a[k] - base[k]).norm(), k


def one_error_line(r):
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def test_missing_rank_shard_fails_once_without_hanging(runs, tmp_path):
    out = checkpoint_copy(runs["two"], tmp_path / "broken", 20)
    (out / "optim_000020_rank1.pt").unlink()
    t0 = time.time()
    args = with_flag(runs["common"], "--num-iterations", "30")
    r = picochat(runs["home"], *args, "--out", str(out), "--resume", nproc=2, timeout=120)
    assert "optim_000020_rank1.pt is missing" in one_error_line(r)
    assert time.time() - t0 < 60


def test_batch_that_cannot_be_split_across_ranks(runs):
    t0 = time.time()
    args = with_flag(runs["common"], "--total-batch-size", "768")
    r = picochat(runs["home"], *args, "--out", str(runs["root"] / "bad"), nproc=2, timeout=120)
    assert "not a multiple of device batch x seq len x ranks = 4 x 64 x 2" in one_error_line(r)
    assert time.time() - t0 < 60


def test_gpu_flags_without_gpus(runs, monkeypatch, capsys):
    r = picochat(runs["home"], *runs["common"], "--device", "cuda", "--out", str(runs["root"] / "bad"), nproc=2,
                 timeout=120)
    assert "no CUDA GPU" in one_error_line(r)
    monkeypatch.setenv("PICOCHAT_HOME", str(runs["home"]))
    assert main([*runs["common"], "--fp8", "--out", str(runs["root"] / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --fp8 needs an NVIDIA GPU") and len(err.splitlines()) == 1


def test_more_processes_than_gpus_is_refused_before_joining(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(UserError, match="4 processes per node but only 2 GPUs are visible: "
                                        "lower --nproc_per_node to 2"):
        init_runtime("cuda")


# ---- the optimizer ------------------------------------------------------------------------------------------------
def test_layout_balances_the_update_cost_in_few_buckets():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(20, value_embeds=True))
    groups = model.param_groups()
    param_groups = [dict(kind="muon", params=groups["matrix"]),
                    dict(kind="adamw", params=[p for k, ps in groups.items() if k != "matrix" for p in ps])]
    kind = {p: g["kind"] for g in param_groups for p in g["params"]}
    for world in (2, 3, 8):
        buckets = layout(param_groups, world)
        # one bucket per Muon matrix size (3 at depth 20: d x d, 4d x d and d x 4d together, the gates) and one for
        # AdamW: 2 collectives each plus a flag all-reduce make the whole step, against 144 parameters
        assert len(buckets) == 4 and len(kind) == 144
        assert [(p, s, e, o) for b in buckets for p, _, s, e, o in b["pieces"]] == \
            [(p, s, e, o) for b in layout(param_groups, world) for p, _, s, e, o in b["pieces"]]  # deterministic
        covered, load = {}, [0] * world
        for b in buckets:
            for p, _, start, stop, off in b["pieces"]:
                rank = off // b["chunk"]
                assert (off + stop - start - 1) // b["chunk"] == rank  # a piece never straddles two ranks
                assert kind[p] == "adamw" or (start, stop) == (0, p.numel())  # Muon owners get whole matrices
                covered[p] = covered.get(p, 0) + stop - start
                load[rank] += (stop - start) * ((30 * min(p.shape) if kind[p] == "muon" else 0) + 4000)
            n = max(p.numel() for p, *_ in b["pieces"])
            assert world * b["chunk"] - sum(e - s for _, _, s, e, _ in b["pieces"]) < world * n  # padding < W pieces
        assert covered == {p: p.numel() for p in kind}  # every element exactly once (pieces do not overlap: above)
        assert max(load) / min(load) < 1.1, (world, load)


def grad_pattern(model, step, rank):
    """Gradients as ranks might have them: every 3rd parameter has none on any rank (as when no rank ran a
    backward pass: RL with no trainable reply), every 3rd + 1 only on rank 0, the rest on all ranks."""
    out = []
    for i, prm in enumerate(model.parameters()):
        gen = torch.Generator().manual_seed(100 * step + 10 * rank + i)
        has = (i % 3 == 2) or (i % 3 == 1 and rank == 0)
        out.append(torch.randn(prm.shape, generator=gen) if has and step != 1 else None)
    return out


COLLECTIVES = ("all_reduce", "reduce", "broadcast", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter",
               "all_gather_into_tensor", "all_gather_single", "all_gather", "all_to_all_single", "all_to_all", "send",
               "recv", "isend", "irecv", "scatter", "gather")


def count_collectives(calls):
    """Wrap torch.distributed's collectives: each call from outside torch.distributed appends its name to calls."""
    inside = []

    def wrap(name, f):
        def counted(*args, **kwargs):
            if not inside:
                calls.append(name)
            inside.append(name)
            try:
                return f(*args, **kwargs)
            finally:
                inside.pop()
        return counted
    for name in COLLECTIVES:
        if hasattr(torch.distributed, name):
            setattr(torch.distributed, name, wrap(name, getattr(torch.distributed, name)))


def gloo_collectives(rank, world):
    """{what: works} for the collectives MuonAdamW uses, as it calls them, on this gloo group."""
    from picochat.optim import _collective
    ok = {}
    x = torch.arange(4 * world, dtype=torch.float32) + 10 * rank
    out = torch.empty(4)
    _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, x, op=torch.distributed.ReduceOp.SUM,
                                                                  async_op=True).wait()
    ok["reduce_scatter"] = torch.equal(out, world * torch.arange(4 * rank, 4 * rank + 4.0) + 10 * sum(range(world)))
    buf = torch.zeros(4 * world)
    buf[4 * rank:4 * rank + 4] = rank + 1
    _collective("all_gather_single", "all_gather_into_tensor")(buf, buf[4 * rank:4 * rank + 4], async_op=True).wait()
    ok["all_gather_in_place"] = torch.equal(buf, torch.arange(1.0, world + 1).repeat_interleave(4))
    send = (torch.arange(4 * world) + 100 * rank).to(torch.bfloat16)
    got = torch.empty(4 * world, dtype=torch.bfloat16)
    torch.distributed.all_to_all_single(got, send, async_op=True).wait()
    ok["all_to_all_bf16"] = torch.equal(got, torch.cat([torch.arange(4 * rank, 4 * rank + 4) + 100 * r
                                                        for r in range(world)]).to(torch.bfloat16))
    return ok


def sharded_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    result = dict(gloo=gloo_collectives(rank, world))
    calls = []
    count_collectives(calls)
    for wire in (torch.float32, torch.bfloat16):
        model = tiny_model(value_embeds=True)
        opt = build_optimizer(model, weight_decay=0.1, wire_dtype=wire)
        counts = []
        for step in range(3):
            for prm, g in zip(model.parameters(), grad_pattern(model, step, rank)):
                prm.grad = g
            calls.clear()
            opt.step()
            counts.append(list(calls))
            model.zero_grad(set_to_none=True)
        result[str(wire)] = dict(params=[q.detach().clone() for q in model.parameters()], calls=counts,
                                 buckets=len(opt.buckets), state=sum(t.numel() for s in opt.state.values()
                                                                     for t in s.values() if torch.is_tensor(t)))
    if rank == 0:
        torch.save(result, out_path)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Three optimizer steps on two gloo ranks with different gradients (some missing), once with fp32 gradients
    on the wire and once with bf16; rank 0's parameters, collective calls per step and state size."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path_factory.mktemp("sharded") / "out.pt"
    mp.spawn(sharded_worker, args=(2, port, str(path)), nprocs=2, join=True)
    return torch.load(path)


def one_process_reference():
    """The three steps of sharded_worker in one process, on the mean of the two ranks' gradients."""
    model = tiny_model(value_embeds=True)
    opt = build_optimizer(model, weight_decay=0.1)
    for step in range(3):
        per_rank = [grad_pattern(model, step, r) for r in range(2)]
        for prm, gs in zip(model.parameters(), zip(*per_rank)):
            present = [g for g in gs if g is not None]
            prm.grad = sum(present) / 2 if present else None  # missing on a rank = zero there
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


def test_gloo_runs_the_collectives_the_optimizer_uses(sharded):
    assert sharded["gloo"] == {"reduce_scatter": True, "all_gather_in_place": True, "all_to_all_bf16": True}


def test_sharded_optimizer_matches_one_process(sharded):
    """Two gloo ranks with different gradients (some missing) against one process with their mean."""
    model, opt = one_process_reference()
    for (name, prm), q in zip(model.named_parameters(), sharded[str(torch.float32)]["params"]):
        assert torch.allclose(prm.detach(), q, rtol=1e-6, atol=1e-7), name
    # ZeRO-1: each rank keeps about half of the state
    total = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert 0.4 * total < sharded[str(torch.float32)]["state"] < 0.6 * total


SAME = {"reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
        "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather"}  # torch 2.13's names, older ones


def test_collectives_per_step_are_few(sharded):
    """A flag all-reduce, then a reduce-scatter and an all-gather per bucket (not per parameter): step 1 has no
    gradient anywhere, so its buckets are not gathered. bf16 goes by all-to-all instead of reduce-scatter."""
    n_params = len(list(tiny_model(value_embeds=True).parameters()))
    for wire, scatter in ((torch.float32, "reduce_scatter"), (torch.bfloat16, "all_to_all_single")):
        res = sharded[str(wire)]
        nb = res["buckets"]
        assert nb == 4 and n_params == 18  # per parameter: 2 x 18 + 1 collectives
        for step, calls in enumerate(res["calls"]):
            gathered = [] if step == 1 else ["all_gather"] * nb
            assert [SAME.get(c, c) for c in calls] == ["all_reduce"] + [scatter] * nb + gathered, (wire, step, calls)


def test_bf16_gradients_on_the_wire_agree_with_fp32(sharded):
    """bf16 rounds each rank's gradient (relative error <= 2^-9) and the owner adds them in fp32. After 3 steps,
    per tensor, the gap to the fp32 run against how far the steps moved it: within 1% for Muon matrices (measured
    <= 0.5%), 5% for AdamW (measured <= 2%: Adam normalizes each element, so where the ranks' gradients nearly
    cancel, the rounding can flip the sign of that element's step). A lost rank's gradient would be ~50%."""
    fp32, bf16 = sharded[str(torch.float32)]["params"], sharded[str(torch.bfloat16)]["params"]
    model = tiny_model(value_embeds=True)
    muon = set(model.param_groups()["matrix"])
    assert any(not torch.equal(a, b) for a, b in zip(fp32, bf16))  # bf16 really went on the wire
    for (name, p0), a, b in zip(model.named_parameters(), fp32, bf16):
        moved = (a - p0.detach()).norm()
        assert (a - b).norm() <= (1e-2 if p0 in muon else 5e-2) * moved, (name, ((a - b).norm() / moved).item())


def test_each_rank_reads_only_the_optimizer_shards_it_needs(tmp_path, monkeypatch):
    """Shards saved by 1, 2 or 3 ranks, loaded by 1 to 4: each rank reads the shards holding its part and gets
    exactly the saved state; with the same rank count, only its own shard; without an index (older
    checkpoints), all of them. Ranks are simulated in one process: the layout needs no process group."""
    from picochat import checkpoint

    def optimizer(rank, world):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: world > 1)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
        return build_optimizer(model)

    def expected(i, p, key, start, stop):  # a value per (parameter, element, state) that any rank can check
        return torch.arange(start, stop, dtype=torch.float32) * 1e-3 + i + (0.5 if key == "exp_avg_sq" else 0)

    def span(v, start, stop):  # a value per element of the parameter, or (NorMuon's) per row or column
        return (start, stop) if v.numel() == stop - start else (0, v.numel())

    model = tiny_model(value_embeds=True)
    params = optimizer(0, 1).all_params  # the optimizer's global order: its groups', not the model's
    index = {p: i for i, p in enumerate(params)}
    read, real_load = [], checkpoint.load_torch
    monkeypatch.setattr(checkpoint, "load_torch", lambda path: read.append(path.name) or real_load(path))
    for saved_world in (1, 2, 3):
        folder = tmp_path / f"w{saved_world}"
        folder.mkdir()
        for r in range(saved_world):
            opt = optimizer(r, saved_world)
            opt.init_state()
            for p, (start, stop) in opt.mine.items():
                i = index[p]
                for key, v in opt.state[p].items():
                    if torch.is_tensor(v):
                        v.copy_(expected(i, p, key, *span(v, start, stop)).view(v.shape))
                    else:
                        opt.state[p][key] = i
            torch.save(opt.shard_state(), folder / f"optim_000005_rank{r}.pt")
        meta = dict(step=5, world_size=saved_world, optim_shards=opt.shard_index())
        for world in (1, 2, 3, 4):
            for rank in range(world):
                read.clear()
                opt = optimizer(rank, world)
                checkpoint.load_rank_shards(folder, meta, opt)
                # the shards that hold any of this rank's elements, from their contents rather than the index
                holding = {r for r in range(saved_world)
                           if any(params[i] in opt.mine and e.get("range", (0, 1 << 62))[0] < opt.mine[params[i]][1]
                                  and opt.mine[params[i]][0] < e.get("range", (0, 1 << 62))[1]
                                  for i, e in real_load(folder / f"optim_000005_rank{r}.pt")["state"].items())}
                assert read == [f"optim_000005_rank{r}.pt" for r in sorted(holding)], (saved_world, world, rank)
                if world == saved_world:
                    assert read == [f"optim_000005_rank{rank}.pt"]
                assert set(opt.state) == set(opt.mine)
                for p, (start, stop) in opt.mine.items():
                    i = index[p]
                    for key, v in opt.state[p].items():
                        if torch.is_tensor(v):
                            assert torch.equal(v.reshape(-1), expected(i, p, key, *span(v, start, stop))), (i, key)
                        else:
                            assert v == i
                read.clear()
                checkpoint.load_rank_shards(folder, dict(meta, optim_shards=None), optimizer(rank, world))
                assert len(read) == saved_world
    # a shard from before the buckets: whole tensors shaped like the parameter, no range; re-cut all the same
    opt = optimizer(1, 2)
    p, (start, stop) = next((p, r) for p, r in opt.mine.items() if r[0] > 0)  # an AdamW parameter split in two
    i = index[p]
    old = {"state": {i: {"step": 7, "exp_avg": torch.arange(p.numel(), dtype=torch.float32).view(p.shape),
                         "exp_avg_sq": torch.ones(p.shape)}}, "groups": opt.shard_state()["groups"]}
    opt.load_shards([old])
    assert opt.state[p]["step"] == 7
    assert torch.equal(opt.state[p]["exp_avg"], torch.arange(start, stop, dtype=torch.float32))
    assert opt.state[p]["exp_avg_sq"].shape == (stop - start,)


def test_compiled_muon_update_matches_eager():
    def make():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(16, 32, generator=gen)) for _ in range(3)]
    a, b = make(), make()
    eager = MuonAdamW([dict(kind="muon", params=a, lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5)])
    compiled = MuonAdamW([dict(kind="muon", params=b, lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5)]).compile()
    for step in range(4):
        gen = torch.Generator().manual_seed(step + 1)
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        for opt in (eager, compiled):  # a schedule changes lr every step: the compiled graph must follow
            opt.param_groups[0]["lr"] = 0.05 * (1 - step / 8)
            opt.step()
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[0], make()[0])


# ---- fast paths ---------------------------------------------------------------------------------------------------
def tiny_model(**kw):
    model = GPT(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, head_dim=32, **kw)).init_weights(seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    ref = tiny_model(window_pattern="SL", value_embeds=True)
    ref(x, y).backward()
    model = fastpath.checkpoint_blocks(tiny_model(window_pattern="SL", value_embeds=True))
    assert list(model.state_dict()) == list(ref.state_dict())
    model(x, y).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
    with torch.no_grad():  # inference (no grad) runs the blocks as they are
        assert torch.equal(model(x), ref(x))


def test_auto_device_batch_size_on_cpu():
    model = tiny_model()
    opt = build_optimizer(model)
    on_cpu = dict(rows_per_rank=48, device=torch.device("cpu"), autocast=None)
    B, how = fastpath.find_device_batch_size(model, opt, 32, **on_cpu)
    assert B == 24 and "no probe" in how  # the largest divisor of 48 rows up to 32
    assert fastpath.find_device_batch_size(model, opt, 32, **on_cpu, prefer=6)[0] == 6
    assert fastpath.find_device_batch_size(model, opt, 32, **on_cpu, prefer=5)[0] == 24


def test_fast_attention_falls_back_to_sdpa_on_cpu():
    assert fastpath.use_fast_attention(torch.device("cpu")) == "sdpa"
    assert fastpath.flash_attention_3(torch.device("cpu")) is None
    with pytest.raises(UserError, match="--fp8 needs an NVIDIA GPU"):
        fastpath.enable_fp8(tiny_model(), torch.device("cpu"))


def test_attention_hook_can_be_swapped(monkeypatch):
    from picochat import model as model_module
    if not hasattr(model_module, "attention"):
        pytest.skip("model.py has no attention() hook yet (see fastpath.use_fast_attention)")
    model = tiny_model(window_pattern="SL")
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        ref = model(x)
    seen, original = [], model_module.attention

    def spy(q, k, v, window):
        seen.append(window)
        return original(q, k, v, window)
    monkeypatch.setattr(model_module, "attention", spy)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert seen == [8, None]  # both layers went through the hook, the short window included


# ---- launching ----------------------------------------------------------------------------------------------------
def test_torchrun_command_lines():
    cmd = launch.torchrun_command(["pretrain", "--run", "x"], 8)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone", "-m", "picochat.launch",
                       "--", "pretrain", "--run", "x"]
    cmd = launch.torchrun_command(["sft"], 8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--rdzv_endpoint=10.0.0.1:29500" in cmd
    assert "--standalone" not in cmd
    with pytest.raises(ValueError):
        launch.torchrun_command(["sft"], 8, nnodes=2)


def test_relaunch_only_with_several_gpus(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    for var in ("RANK", "WORLD_SIZE", "PICOCHAT_NO_TORCHRUN"):
        monkeypatch.delenv(var, raising=False)
    launch.maybe_relaunch_with_torchrun(["speedrun"])  # no GPU here: nothing happens
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    launch.maybe_relaunch_with_torchrun(["speedrun", "--run", "x"])
    assert calls and "--nproc_per_node=4" in calls[0] and calls[0][-4:] == ["--", "speedrun", "--run", "x"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    launch.maybe_relaunch_with_torchrun(["speedrun"])  # already a torchrun worker
    assert len(calls) == 1


def test_launch_main_drops_the_separator(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--", "pretrain", "--help"])
    assert e.value.code == 0 and "--device-batch-size" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PICOCHAT_SLOW_TESTS"), reason="compiles a model on the CPU: ~2 min; "
                    "set PICOCHAT_SLOW_TESTS=1")
def test_compiled_pretraining_tracks_eager(runs, tmp_path):
    args = with_flag(with_flag(with_flag(runs["common"], "--depth", "1"), "--num-iterations", "6"), "--eval-every", "0")
    eager = picochat(runs["home"], *args, "--out", str(tmp_path / "eager"))
    compiled = picochat(runs["home"], *args, "--compile", "--out", str(tmp_path / "compiled"), timeout=900)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    assert_same_curve(tmp_path / "eager", tmp_path / "compiled", rtol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PICOCHAT_SLOW_TESTS"), reason="traces small models with torch.compile on the "
                    "CPU: ~20 s idle, a minute on a busy machine; set PICOCHAT_SLOW_TESTS=1")
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]  # stdout: one JSON line per section, nothing else
    sections = ["environment", "agreement", "micro", "d20_step", "decode", "validation", "d12_step", "sharded_opt"]
    assert [ln["section"] for ln in lines] == sections
    assert all(ln["ok"] and ln["s"] >= 0 for ln in lines), lines
    by = {ln["section"]: ln for ln in lines}
    assert by["environment"]["fa3"] == "not installed" and by["micro"]["fa3_window"] == "not installed"
    agr = by["agreement"]
    assert agr["fp32"]["loss_rel"] == 0.0 and agr["fp32"]["grad_rel"] == 0.0 and agr["failed"] == []
    assert agr["bf16"]["grad_rel"] < agr["bars"]["bf16"]["grad_rel"]
    for step in ("d20_step", "d12_step"):
        assert by[step]["tok_s"] > 0 and by[step]["compile"] and by[step]["flags_from"] == "picochat/speedrun.py"
    assert by["decode"]["eager_b16"]["tok_s"] > 0 and by["validation"]["dynamo_frames"] == 0
    assert (tmp_path / "gpu_check.jsonl").read_text().splitlines() == r.stdout.splitlines()
    assert (tmp_path / "gpu_check.md").read_text().count("| yes |") == len(sections) - 1  # sharded_opt: skipped
