"""`picochat report`: the report card of a run, as markdown with plots plus a JSON twin for CI.

Reads what each stage left next to its checkpoint in $PICOCHAT_HOME/runs/<run>/<stage> (stage = base, sft,
rl): metrics.jsonl (one JSON object per line: step, loss, val_* ...), summary.json (train_seconds, device,
world_size and headline numbers), eval_base.json (bits per byte and CORE) and eval_chat.json (ChatCORE
tasks). Writes runs/<run>/report/report.md with PNG plots beside it and report.json with the headline
numbers. A stage that left nothing is reported as "not run".
"""
import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from picochat.checkpoint import STAGES
from picochat.common import UserError, home_dir, atomic_write_bytes, atomic_write_json, fmt, format_duration, pick_run

STAGE_TITLES = {"base": "Pretraining (base model)", "sft": "Supervised fine-tuning (chat model)",
                "rl": "Reinforcement learning"}
RL_TASKS = {"demo": "the demo's word problems", "gsm8k": "GSM8K"}  # rl --task, as the card names it
# metrics.jsonl keys that are bookkeeping, not curves
NOT_CURVES = {"step", "dt", "lr_mult", "lr", "tok_per_sec", "mfu", "epoch", "time", "tokens"}
NOT_CURVE_SUFFIXES = ("_seconds", "_tokens", "_problems", "_replies", "_rows")
MAX_PANELS = 6


# ---- gathering ----------------------------------------------------------------------------------------------
def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        print(f"warning: {path} is not valid JSON; ignored")
        return None


def _read_jsonl(path):
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            print(f"warning: {path} line {n} is not valid JSON; skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def gather(run_dir):
    """{stage: {"summary", "metrics", "eval_base", "eval_chat", "ran"}} for base, sft and rl."""
    out = {}
    for stage in STAGES:
        d = Path(run_dir) / stage
        info = {"summary": _read_json(d / "summary.json"), "metrics": _read_jsonl(d / "metrics.jsonl"),
                "eval_base": _read_json(d / "eval_base.json"), "eval_chat": _read_json(d / "eval_chat.json")}
        info["ran"] = any(v for v in info.values())
        out[stage] = info
    return out


def hardware():
    """What this machine has: CPU model and cores, GPUs (name and count), memory."""
    hw = {"cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "gpu": None, "gpu_count": 0}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        hw["memory_gb"] = round(pages * size / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            hw["gpu_count"] = torch.cuda.device_count()
            hw["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return hw


def versions():
    import torch
    import picochat
    return {"python": platform.python_version(), "torch": torch.__version__, "picochat": picochat.__version__}


def git_commit():
    """The commit of the picochat source tree, with '-dirty' if it has changes; None outside a git checkout."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def stage_cost(summary, price):
    """(gpus, hours, dollars or None, note) from a stage summary: GPU count x hours x $/GPU-hour."""
    if not summary or not isinstance(summary.get("train_seconds"), (int, float)):
        return None, None, None, "wall time unknown"
    hours = summary["train_seconds"] / 3600
    device = str(summary.get("device", ""))
    if not device.startswith("cuda"):
        return 0, hours, None, f"on {(device or 'cpu').upper()}: no GPU cost"
    gpus = int(summary.get("num_gpus") or summary.get("world_size") or 1)
    return gpus, hours, gpus * hours * price, f"{gpus} GPU x {hours:.2f} h x ${price:.2f}"


# ---- plots --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(metrics, key):
    pts = [(r["step"], r[key]) for r in metrics
           if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
           and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_keys(metrics):
    """Keys to plot: training loss, validation metrics (val_*), and everything else numeric (reward, ...)."""
    keys = []
    for r in metrics:
        for k, v in r.items():
            if (k not in NOT_CURVES and not k.endswith(NOT_CURVE_SUFFIXES) and k not in keys
                    and isinstance(v, (int, float)) and not isinstance(v, bool)):
                keys.append(k)
    train = [k for k in keys if k == "loss"]
    val = [k for k in keys if k.startswith("val_")]
    other = [k for k in keys if k not in train and k not in val]
    return train, val, other


def plot_curves(stage, metrics, path):
    """One figure per stage: training loss (raw and smoothed), validation metrics together (same scale), then
    one panel per other metric (reward, accuracies, ...)."""
    train, val, other = curve_keys(metrics)
    panels = [(t, ks) for t, ks in (("training loss", train), ("validation", val)) if ks]
    panels = (panels + [(k, [k]) for k in other])[:MAX_PANELS]
    if not panels:
        return False
    plt = _plt()
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, ks) in zip(axes.flat, panels):
        for k in ks:
            x, y = _series(metrics, k)
            if k == "loss" and len(y) > 10:
                ax.plot(x, y, alpha=0.3, color="C0", label="loss")
                smooth, s = [], y[0]
                for v in y:
                    s = 0.9 * s + 0.1 * v
                    smooth.append(s)
                ax.plot(x, smooth, color="C0", label="loss (EMA 0.9)")
            else:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=k)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def _save_fig(fig, path):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def plot_core(tasks, label, path):
    """Centered accuracy per CORE task, horizontal bars."""
    if not tasks:
        return False
    plt = _plt()
    names = list(tasks)
    vals = [tasks[n]["centered"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    ax.barh(names, vals, color=["C2" if v >= 0 else "C3" for v in vals])
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("centered accuracy")
    ax.set_title(f"{label} per task")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def plot_chat(evals, path):
    """Accuracy per chat task, grouped by stage, with each task's chance level."""
    tasks = []
    for ev in evals.values():
        for t in ev["tasks"]:
            if t not in tasks:
                tasks.append(t)
    if not tasks:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) + 2), 3.8))
    width = 0.8 / len(evals)
    for j, (stage, ev) in enumerate(evals.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i, t in enumerate(tasks) if t in ev["tasks"]]
        ys = [ev["tasks"][t]["accuracy"] for t in tasks if t in ev["tasks"]]
        ax.bar(xs, ys, width, label=stage)
    for i, t in enumerate(tasks):
        base = next((ev["tasks"][t].get("baseline", 0) for ev in evals.values() if t in ev["tasks"]), 0)
        if base:
            ax.hlines(base, i - 0.45, i + 0.45, colors="gray", linestyles="dashed")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("chat evals (dashed: chance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


# ---- the card -----------------------------------------------------------------------------------------------
def _headline(stage, info):
    """The numbers CI asserts on, per stage."""
    s, eb, ec = info["summary"] or {}, info["eval_base"] or {}, info["eval_chat"] or {}
    h = {"status": "done" if info["summary"] else ("partial" if info["ran"] else "not run")}
    for k in ("step", "num_params", "tokens", "train_seconds", "tokens_per_sec", "device", "world_size"):
        if k in s:
            h[k] = s[k]
    for k, v in s.items():  # a stage's own headline metrics (val_bpb, val_loss, reward, accuracy, ...)
        if k not in h and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("flops_per_token",):
            h[k] = v
    if "val_bpb" in eb:
        h["val_bpb"] = eb["val_bpb"]
    first_bpb = next((r["val_bpb"] for r in info["metrics"] if "val_bpb" in r), None)
    if first_bpb is not None:  # before any training: "bpb fell" is start_val_bpb > val_bpb
        h["start_val_bpb"] = first_bpb
    if "core" in eb:
        h.update(core=eb["core"], core_label=eb.get("core_label", "CORE"),
                 core_tasks_scored=eb.get("core_num_scored"), core_tasks_total=eb.get("core_num_tasks"))
    if ec.get("tasks"):
        h.update(chatcore=ec.get("chatcore"), chatcore_label=ec.get("chatcore_label", "ChatCORE"),
                 chat={t: r["accuracy"] for t, r in ec["tasks"].items()})
    if not info["metrics"] and not s and h["status"] != "not run":
        h["note"] = "no metrics.jsonl or summary.json"
    return h


def _summary_section(report, stages, *, price):
    """The summary table: each stage's headline and cost go into report["stages"], the totals into report."""
    total_s, total_cost, any_gpu = 0.0, 0.0, False
    rows = []
    for stage in STAGES:
        info = stages[stage]
        h = _headline(stage, info)
        gpus, hours, cost, note = stage_cost(info["summary"], price)
        h.update(gpus=gpus, hours=hours, cost_usd=cost, cost_note=note)
        report["stages"][stage] = h
        if hours is not None:
            total_s += hours * 3600
        if cost is not None:
            total_cost += cost
            any_gpu = True
        if h["status"] == "not run":
            rows.append(f"| {stage} | not run | - | - | - | - |")
            continue
        key = ("core_label", "core") if "core" in h else ("chatcore_label", "chatcore") if "chatcore" in h else None
        headline = f"{h[key[0]]} {fmt(h[key[1]])}" if key else "-"
        bpb = f"bpb {fmt(h['val_bpb'])}" if "val_bpb" in h else ""
        numbers = ", ".join(x for x in (bpb, headline) if x and x != "-") or "-"
        rows.append(f"| {stage} | {h['status']} | {fmt(h.get('step'))} | "
                    f"{format_duration(hours * 3600) if hours is not None else '-'} | "
                    f"{'$%.2f' % cost if cost is not None else note} | {numbers} |")
    report["total_train_seconds"] = total_s
    report["total_cost_usd"] = total_cost if any_gpu else None
    return ["## Summary", "", "| stage | status | steps | wall time | cost | headline |", "|---|---|---|---|---|---|",
            *rows, "",
            f"Total training wall time {format_duration(total_s)}; " +
            (f"estimated cost ${total_cost:.2f} at ${price:.2f} per GPU-hour (GPU count x hours x price)."
             if any_gpu else "trained on CPU: no GPU cost."), ""]


def _setting_sections(report, run_dir):
    """The speedrun's stage times, the machine and versions, the tokenizer (what report has on them)."""
    md = []
    stage_times = _read_json(run_dir / "speedrun.json")  # wall time of every speedrun stage, evals included
    if isinstance(stage_times, dict) and stage_times:
        report["speedrun_seconds"] = stage_times
        md += ["## Speedrun stages", "", "| stage | wall time |", "|---|---|",
               *[f"| {k} | {format_duration(v)} |" for k, v in stage_times.items()],
               f"| **total** | {format_duration(sum(stage_times.values()))} |", ""]

    hw, ver, commit = report["hardware"], report["versions"], report["git_commit"]
    gpu = f"{hw['gpu_count']} x {hw['gpu']}" if hw["gpu_count"] else "none"
    md += ["## Environment", "", "| | |", "|---|---|",
           f"| CPU | {hw['cpu']} ({hw['cpu_cores']} cores) |", f"| GPU | {gpu} |",
           f"| memory | {hw.get('memory_gb', '?')} GB |",
           f"| python / torch / picochat | {ver['python']} / {ver['torch']} / {ver['picochat']} |",
           f"| git commit | {commit or 'not a git checkout'} |", ""]

    from picochat.tokenizer import META_FILE
    tok_meta = _read_json(run_dir / "tokenizer" / META_FILE)
    if isinstance(tok_meta, dict) and "vocab_size" in tok_meta:
        md += ["## Tokenizer", "", f"Vocabulary {tok_meta['vocab_size']:,} tokens (`{run_dir / 'tokenizer'}`).", ""]
        report["tokenizer"] = {"vocab_size": tok_meta["vocab_size"]}
    return md


def _stage_section(stage, info, h, *, out):
    """One stage's section: its facts, its curves and its eval tables (plots written into out)."""
    s = info["summary"] or {}
    task = s.get("task")
    md = [f"## {STAGE_TITLES[stage]}" + (f" ({RL_TASKS.get(task, task)})" if stage == "rl" and task else ""), ""]
    if h["status"] == "not run":
        return md + ["not run", ""]
    facts = [("status", h["status"]),
             ("device", f"{s['device']} x {s.get('world_size', 1)}" if "device" in s else "not recorded"),
             ("wall time", format_duration(h["hours"] * 3600) if h["hours"] is not None else "unknown"),
             ("cost", f"${h['cost_usd']:.2f} ({h['cost_note']})" if h["cost_usd"] is not None else h["cost_note"])]
    for k, v in h.items():
        if k in ("status", "device", "world_size", "gpus", "hours", "cost_usd", "cost_note", "chat",
                 "train_seconds", "core_label", "chatcore_label", "core_tasks_scored", "core_tasks_total"):
            continue
        if k == "core":
            facts.append((h["core_label"], fmt(v)))
        elif k == "chatcore":
            facts.append((h["chatcore_label"], fmt(v)))
        else:
            facts.append((k, fmt(v)))
    md += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    if info["metrics"] and plot_curves(stage, info["metrics"], out / f"curves_{stage}.png"):
        md += [f"![{stage} curves](curves_{stage}.png)", ""]
    elif not info["metrics"]:
        md += ["no metrics.jsonl: no curves", ""]
    eb = info["eval_base"] or {}
    if eb.get("core_tasks"):
        if plot_core(eb["core_tasks"], eb.get("core_label", "CORE"), out / f"core_{stage}.png"):
            md += [f"![{eb.get('core_label', 'CORE')} per task](core_{stage}.png)", ""]
        md += ["| CORE task | type | shots | items | accuracy | centered |", "|---|---|---|---|---|---|"]
        md += [f"| {t} | {r['type']} | {r['num_fewshot']} | {r['total']:,} | {r['accuracy']:.4f} | "
               f"{r['centered']:+.4f} |" for t, r in eb["core_tasks"].items()]
        if eb.get("core_missing"):
            md += ["", f"Skipped (data missing): {', '.join(eb['core_missing'])}."]
        md += [""]
    ec = info["eval_chat"] or {}
    if ec.get("tasks"):
        md += ["| chat task | problems | accuracy | pass@1 | centered |", "|---|---|---|---|---|"]
        md += [f"| {t} | {r['total']:,} | {r['accuracy']:.4f} | {r.get('pass@1', r['accuracy']):.4f} | "
               f"{r['centered']:+.4f} |" for t, r in ec["tasks"].items()]
        md += [""]
    return md


def _chat_evals_section(chat_evals, *, out):
    """The chat evals of every stage side by side ({stage: eval_chat.json}), with their plot; [] without any."""
    if not chat_evals:
        return []
    md = ["## Chat evals", ""]
    if plot_chat(chat_evals, out / "chat_evals.png"):
        md += ["![chat evals per stage](chat_evals.png)", ""]
    md += ["| task | " + " | ".join(chat_evals) + " |", "|---|" + "---|" * len(chat_evals)]
    names = list(dict.fromkeys(t for ev in chat_evals.values() for t in ev["tasks"]))
    for t in names:
        md.append(f"| {t} | " + " | ".join(fmt(ev["tasks"][t]["accuracy"]) if t in ev["tasks"] else "-"
                                          for ev in chat_evals.values()) + " |")
    md.append("| **ChatCORE** | " + " | ".join(fmt(ev.get("chatcore")) for ev in chat_evals.values()) + " |")
    return md + [""]


def build_report(run, price=2.5, run_dir=None, out_dir=None):
    """Write report.md, report.json and the PNGs. Returns (md_path, json_path, report dict)."""
    run_dir = Path(run_dir) if run_dir else home_dir() / "runs" / run
    if not run_dir.is_dir():
        raise UserError(f"no run folder {run_dir}: train something first (`picochat speedrun` or `picochat pretrain`)")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    stages = gather(run_dir)
    report = {"run": run, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "price_per_gpu_hour": price,
              "hardware": hardware(), "versions": versions(), "git_commit": git_commit(), "stages": {}}
    md = [f"# picochat report card: run `{run}`", "",
          f"Generated {report['generated']} from `{run_dir}`.", ""]
    md += _summary_section(report, stages, price=price)
    md += _setting_sections(report, run_dir)
    chat_evals = {}  # the stages that ran with chat evals
    for stage in STAGES:
        info, h = stages[stage], report["stages"][stage]
        md += _stage_section(stage, info, h, out=out)
        if h["status"] != "not run" and (info["eval_chat"] or {}).get("tasks"):
            chat_evals[stage] = info["eval_chat"]
    md += _chat_evals_section(chat_evals, out=out)

    md_path, json_path = out / "report.md", out / "report.json"
    atomic_write_bytes(md_path, "\n".join(md).encode())
    atomic_write_json(json_path, report)
    return md_path, json_path, report


def add_parser(sub):
    p = sub.add_parser("report", help="write the report card of a run (markdown + plots + JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="run name: reads $PICOCHAT_HOME/runs/<run> "
                                             "(default: the run trained most recently)")
    p.add_argument("--price", type=float, default=2.5, help="$ per GPU-hour for the cost estimate")
    p.add_argument("--out", default="", help="output folder (default runs/<run>/report)")
    p.set_defaults(func=report_cli)


def report_cli(args):
    if args.price < 0:
        raise UserError(f"--price must be >= 0, got {args.price}")
    md_path, json_path, report = build_report(pick_run(args.run), args.price, out_dir=args.out or None)
    for stage, h in report["stages"].items():
        bits = [f"{stage}: {h['status']}"]
        for k in ("val_bpb", "core", "chatcore"):
            if h.get(k) is not None:
                bits.append(f"{h.get(k + '_label', k)} {h[k]:.4f}")
        print(" | ".join(bits))
    print(f"report card: {md_path} (numbers in {json_path.name})")
    return 0
