"""Starting picochat on every GPU of a machine: the torchrun command line, and a re-launch helper.

    maybe_relaunch_with_torchrun(argv)   called first thing by a command that wants all GPUs (the speedrun):
                                         with 2+ GPUs visible and not yet under torchrun, it replaces this
                                         process by `torchrun --standalone --nproc_per_node=N` running the
                                         same picochat command; otherwise it returns and the caller goes on.
    torchrun_command(argv, nproc)        that command line, e.g. to run one stage as a subprocess.

The command line is `python -m torch.distributed.run ... -m picochat.launch -- <argv>`:
  - `python -m torch.distributed.run` is torchrun from this very interpreter (no PATH surprises);
  - `--standalone` starts a private rendezvous on localhost with a free port (single node only);
  - `-m picochat.launch` runs this module (its __main__ below), which hands argv to the picochat CLI;
  - `--` stops torchrun's own parser: without it torchrun reads our `--run NAME` as an abbreviation of
    its `--run-path` and exits with "ambiguous option"; some Python versions pass the `--` through to the
    script, so __main__ drops it.
Set PICOCHAT_NO_TORCHRUN=1 to stay in one process whatever the GPU count.
"""
import os
import sys

import torch


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(argv, nproc, nnodes=1, node_rank=0, rdzv_endpoint=""):
    """The torchrun command line running `picochat <argv>` on nproc processes per node. One node: a
    standalone rendezvous. Several: all nodes run the same line with their own node_rank and the same
    rdzv_endpoint (host:port of node 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint (host:port of node 0)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv_endpoint}", "--rdzv_id=picochat"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "picochat.launch", "--", *argv]


def maybe_relaunch_with_torchrun(argv=None):
    """exec torchrun with one process per visible CUDA GPU when there are 2+ and we are not a torchrun
    worker already (nor told not to); returns, doing nothing, in every other case."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if under_torchrun() or os.environ.get("PICOCHAT_NO_TORCHRUN"):
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return
    cmd = torchrun_command(argv, n)
    print(f"{n} GPUs: relaunching under torchrun: {' '.join(cmd)}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from picochat.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
