"""Experiment tracking, optional: the records a stage writes to its metrics.jsonl, mirrored to wandb or TensorBoard.

    add_log_to_arg(parser)                       # --log-to none|wandb|tensorboard, on pretrain, sft and rl
    mirror = tracker(args.log_to, out=out, run=args.run, stage="sft", config=vars_json(args), step=start, rank=rank)
    log = metrics_logger(out / "metrics.jsonl", start, rank, mirror=mirror)

metrics.jsonl stays the record of truth (the report and the plots read it); a tracker only sends a copy. Neither
library is a dependency: asking for one that is not installed stops the stage before it trains, with the pip
command. wandb works without an account under WANDB_MODE=offline (it writes to <stage folder>/wandb, for a later
`wandb sync`); TensorBoard needs none (`tensorboard --logdir <stage folder>/tensorboard`).

What holds: only rank 0 sends; each record's numbers go out under "<stage>/<key>" at the record's step (other
values, strings and lists, stay in metrics.jsonl only). A resumed run continues the same wandb run (its id is
<run>-<stage>) and drops TensorBoard's events at and past the step it resumes from, as metrics.jsonl does.
"""
import importlib.util
import math

from picochat.common import UserError

CHOICES = ("none", "wandb", "tensorboard")  # each one but none is also the name of its pip package


def add_log_to_arg(parser):
    parser.add_argument("--log-to", choices=CHOICES, default="none",
                        help="also send the metrics to wandb (WANDB_MODE=offline works without an account) or "
                             "TensorBoard (<stage folder>/tensorboard); metrics.jsonl is written either way")


def check_available(kind):
    """Raise UserError naming the pip command when `kind`'s library is not installed (call it before training)."""
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise UserError(f"--log-to {kind}: the {kind} package is not installed; pip install {kind}")


def _scalars(record, stage):
    return {f"{stage}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def tracker(kind, *, out, run, stage, config, step, rank):
    """A function that sends one metrics record (a dict with a "step") to `kind`, or None for "none" and on
    ranks other than 0. out is the stage's folder, step the step the run starts (or resumes) from."""
    check_available(kind)  # on every rank: none of them should start a run that rank 0 refuses
    if kind == "none" or rank != 0:
        return None
    if kind == "wandb":
        import wandb
        wb = wandb.init(project="picochat", name=f"{run}/{stage}", id=f"{run}-{stage}", resume="allow",
                        dir=str(out), config=config)

        def send(record):
            values = _scalars(record, stage)
            if values:
                wb.log(values, step=int(record.get("step", 0)))
        return send

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=step or None)
    writer.add_text(f"{stage}/config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(config.items())), step)

    def send(record):
        for key, value in _scalars(record, stage).items():
            writer.add_scalar(key, value, int(record.get("step", 0)))
        writer.flush()  # records come every few steps: a killed run keeps what it sent
    return send
