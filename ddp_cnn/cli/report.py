"""``python -m ddp_cnn.report RUN_DIR``: plots and a Markdown summary of a training run.

Reads RUN_DIR/metrics.jsonl (written by ddp_cnn.train) and writes, into
RUN_DIR (or --out): loss.png, accuracy.png, throughput.png, confusion.png and
summary.md.  With ``--trace FILE`` (a ``ddp_cnn.train --trace`` timeline) it
also draws timeline.png: one step of every rank, its backward layer by layer
beside its gradient buckets' allreduces, which shows how much of the
communication backward hides (Horovod's timeline, as a picture).  Needs
matplotlib (the ``report`` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ddp_cnn.cli.timeline import read_trace, timeline_figure


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order; ValueError naming the file (and line) when unusable.

    Records of kinds this report does not know (and keys it does not know) are kept and ignored.
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected the metrics.jsonl of a ddp_cnn.train run)")
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_number}: not a JSON line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: not a JSON object")
            records.append(record)
    if not epochs_of(records):
        raise ValueError(f"{path}: no epoch records yet (the run has not finished an epoch)")
    return records


SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))  # key prefix, word for a person


def epochs_of(records) -> list[dict]:
    """The epoch records in epoch order, the last one of each epoch only.

    An epoch interrupted and resumed is logged twice (its partial record kept
    up to the checkpoint, then the resumed one): the later record stands.
    """
    last = {}
    for r in records:
        if r.get("kind") == "epoch" and isinstance(r.get("epoch"), int):
            last[r["epoch"]] = r
    return [last[e] for e in sorted(last)]


def number(record, key):
    """``record[key]`` as a float, or None when it is missing or not a number."""
    try:
        return float(record[key])
    except (KeyError, TypeError, ValueError):
        return None


def curve_figures(epochs, plt, run_name: str) -> dict:
    """{"loss", "accuracy", "throughput": Figure}, one point per epoch, epochs numbered from 1."""
    from matplotlib.ticker import MaxNLocator
    panels = (("loss", "Loss", "cross-entropy loss", [(f"{k}_loss", f"{w} loss") for k, w in SPLITS], 1.0),
              ("accuracy", "Accuracy", "accuracy (%)", [(f"{k}_acc", f"{w} accuracy") for k, w in SPLITS], 100.0),
              ("throughput", "Training throughput", "images per second (all ranks)",
               [("images_per_s", "training images/s")], 1.0))
    figures = {}
    for name, title, ylabel, series, scale in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            points = [(r["epoch"] + 1, number(r, key)) for r in epochs if number(r, key) is not None]
            if points:
                ax.plot([e for e, _ in points], [v * scale for _, v in points], marker="o", markersize=4,
                        label=label)
        ax.set_title(f"{title} per epoch: {run_name}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        # No epoch 1.5; min_n_ticks=1 keeps the integer rule when a single epoch leaves one integer in view.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        figures[name] = fig
    return figures


CONFUSION_KEYS = (("test_confusion", "test"), ("val_confusion", "validation"), ("confusion", None))


def last_confusion(records):
    """(square matrix, split in words, epoch index from 0 or None) from the newest record holding one; None if
    none does.  A record other than an epoch's (the final test) is of the epoch logged last before it: logs
    written before 2026-12-07 counted a test record's epoch from 1, the epoch records from 0."""
    for i in reversed(range(len(records))):
        r = records[i]
        for key, split in CONFUSION_KEYS:
            matrix = np.array(r.get(key, []))
            if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] > 0:
                if split is None:  # an epoch record's matrix is of the split it was scored on
                    split = "validation" if "val_acc" in r and "test_acc" not in r else "test"
                epoch = r.get("epoch")
                if r.get("kind") != "epoch" and isinstance(epoch, int):
                    epoch = next((e.get("epoch") for e in reversed(records[:i]) if e.get("kind") == "epoch"), None)
                return matrix, split, epoch
    return None


def confusion_figure(records, plt):
    """The newest confusion matrix as a Figure, or None when no record holds one."""
    found = last_confusion(records)
    if found is None:
        return None
    confusion, split, epoch = found
    start = next((r for r in records if r.get("kind") == "start"), {})
    names = start.get("class_names") or []
    names = names if len(names) == len(confusion) else [str(i) for i in range(len(confusion))]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix, {split} set" + (f", epoch {epoch + 1}" if isinstance(epoch, int) else ""))
    top = confusion.max() or 1
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def duration(seconds: float) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(int(minutes), 60)
    return f"{seconds:.1f} s" + (f" ({hours} h {m:02d} min)" if hours else f" ({m} min {s:02.0f} s)" if m else "")


def time_line(records, epochs) -> str:
    """The run's wall time when records carry a unix "time", else the sum of the epochs' own times."""
    times = [number(r, "time") for r in records if number(r, "time") is not None]
    if len(times) >= 2:
        return f"wall time (first to last record) {duration(max(times) - min(times))}"
    return f"training time (sum of epochs) {duration(sum(number(r, 'seconds') or 0.0 for r in epochs))}"


def cell(record, key, scale=1.0, digits=4) -> str:
    value = number(record, key)
    return "–" if value is None else f"{value * scale:.{digits}f}"


def epoch_table(epochs) -> list[str]:
    """A Markdown table, one row per epoch; a column pair for each split any epoch was scored on."""
    splits = [(k, w) for k, w in SPLITS if any(f"{k}_acc" in r or f"{k}_loss" in r for r in epochs)]
    head = ["epoch"] + [f"{w} {q}" for _, w in splits for q in ("loss", "acc")] + ["img/s", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in epochs:
        row = [f"{r['epoch'] + 1}" + ("" if r.get("complete", True) else " (partial)")]
        row += [c for k, _ in splits for c in (cell(r, f"{k}_loss"), cell(r, f"{k}_acc", 100, 2))]
        row += [cell(r, "images_per_s", digits=0), cell(r, "seconds", digits=1)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary_markdown(records, run_dir: Path) -> str:
    epochs = epochs_of(records)
    start = next((r for r in records if r.get("kind") == "start"), {})
    last = epochs[-1]
    lines = [f"# Run {run_dir}", ""]
    if start:
        params = number(start, "params")
        lines += [f"- model `{start.get('model')}`, {start.get('world_size')} rank(s) on {start.get('device')}, "
                  f"global batch {start.get('global_batch')}"
                  + (f", {int(params):,} parameters" if params is not None else ""), ""]
    final = [f"{word} acc {cell(last, f'{k}_acc', 100, 2)}% (loss {cell(last, f'{k}_loss')})"
             for k, word in SPLITS if f"{k}_acc" in last]
    lines.append(f"- epochs logged: {len(epochs)}; {time_line(records, epochs)}")
    if final:
        lines.append(f"- final (epoch {last['epoch'] + 1}): " + ", ".join(final))
    scored_apart = next((r for r in reversed(records) if r.get("kind") != "epoch" and "test_acc" in r), None)
    if scored_apart is not None:  # the test set scored once, outside the epochs
        lines.append(f"- test set ({scored_apart.get('kind')} record): acc {cell(scored_apart, 'test_acc', 100, 2)}% "
                     f"(loss {cell(scored_apart, 'test_loss')})")
    for k, word in SPLITS[1:]:
        scored = [r for r in epochs if number(r, f"{k}_acc") is not None]
        if scored:
            best = max(scored, key=lambda r: number(r, f"{k}_acc"))
            lines.append(f"- best {word} accuracy {number(best, f'{k}_acc') * 100:.2f}% at epoch {best['epoch'] + 1}")
    seconds = sum(number(r, "seconds") or 0.0 for r in epochs)
    exposed = sum(number(r, "comm_exposed_seconds") or 0.0 for r in epochs)
    rates = [number(r, "images_per_s") for r in epochs if number(r, "images_per_s") is not None]
    # One process communicates nothing (older one-process logs still hold a figure for it: not shown).
    communicated = start.get("world_size") != 1 and any("comm_exposed_seconds" in r for r in epochs)
    lines.append(f"- throughput: median {np.median(rates) if rates else float('nan'):.0f} images/s"
                 + (f"; communication not hidden by backward: {exposed / max(seconds, 1e-9) * 100:.1f}% of the time"
                    if communicated else ""))
    lines += [""] + epoch_table(epochs)
    lines += ["", "![loss](loss.png) ![accuracy](accuracy.png) ![throughput](throughput.png)"]
    if last_confusion(records) is not None:  # main draws it then
        lines += ["", "![confusion matrix](confusion.png)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m ddp_cnn.report",
                                description="Plots (loss, accuracy, images/s, confusion matrix) and a Markdown "
                                            "summary of a ddp_cnn.train run, and/or one step of its --trace "
                                            "timeline (timeline.png).")
    p.add_argument("run_dir", type=Path, nargs="?", default=None,
                   help="the --run-dir of a training run (holds metrics.jsonl)")
    p.add_argument("--metrics", type=Path, default=None, help="metrics file (default: RUN_DIR/metrics.jsonl)")
    p.add_argument("--trace", type=Path, default=None, metavar="FILE",
                   help="the --trace file of a run: draw timeline.png, one step of every rank (backward layer by "
                        "layer, each gradient bucket's allreduce from issue to completion)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="with --trace: the global step to draw (default: the median-length step of the later "
                        "half of the trace)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the files (default: RUN_DIR, else the trace file's folder)")
    args = p.parse_args(argv)
    if args.run_dir is None and args.trace is None:
        p.error("give RUN_DIR, --trace FILE, or both")
    if args.step is not None and args.trace is None:
        p.error("--step: only with --trace")
    try:
        records = read_metrics(args.metrics or args.run_dir / "metrics.jsonl") if args.run_dir else None
        trace = read_trace(args.trace) if args.trace else None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figures = {}
        if records is not None:
            figures = curve_figures(epochs_of(records), plt, args.run_dir.resolve().name)
            figures["confusion"] = confusion_figure(records, plt)
        if trace is not None:
            figures["timeline"] = timeline_figure(trace, plt, args.step)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: matplotlib is needed: pip install 'ddp_cnn[report]'", file=sys.stderr)
        return 2
    out = args.out or args.run_dir or args.trace.parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            written.append(f"{name}.png")
    if records is not None:
        summary = summary_markdown(records, args.run_dir)
        if trace is not None:
            summary += "\n![one step of every rank: backward and the gradient allreduce](timeline.png)\n"
        (out / "summary.md").write_text(summary)
        written.append("summary.md")
    print(f"wrote {', '.join(written)} in {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
