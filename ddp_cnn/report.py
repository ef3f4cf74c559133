"""``python -m ddp_cnn.report RUN_DIR``: plots and a Markdown summary of a training run.

Reads RUN_DIR/metrics.jsonl (written by ddp_cnn.train) and writes, into
RUN_DIR (or --out): loss.png, accuracy.png, throughput.png, confusion.png and
summary.md.  Needs matplotlib (the ``report`` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected the metrics.jsonl of a ddp_cnn.train run)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    if not any(r.get("kind") == "epoch" for r in records):
        raise ValueError(f"{path}: no epoch records yet (the run has not finished an epoch)")
    return records


def epochs_of(records) -> list[dict]:
    return [r for r in records if r.get("kind") == "epoch"]


def plot_curves(epochs, out: Path, plt) -> list[str]:
    x = [r["epoch"] + 1 for r in epochs]
    written = []
    for name, keys, label in (("loss", ("train_loss", "test_loss"), "cross-entropy"),
                              ("accuracy", ("train_acc", "test_acc"), "accuracy (%)"),
                              ("throughput", ("images_per_s",), "images/s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(xi, r[key]) for xi, r in zip(x, epochs) if key in r]
            if points:
                scale = 100.0 if name == "accuracy" else 1.0
                ax.plot([p[0] for p in points], [p[1] * scale for p in points], marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"{name}.png")
    return written


def plot_confusion(confusion: np.ndarray, class_names, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = confusion.max() or 1
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(records, run_dir: Path) -> str:
    epochs = epochs_of(records)
    start = next((r for r in records if r.get("kind") == "start"), {})
    tested = [r for r in epochs if "test_acc" in r]
    best = max(tested, key=lambda r: r["test_acc"]) if tested else None
    last = epochs[-1]
    lines = [f"# Run {run_dir}", ""]
    if start:
        lines += [f"- model `{start.get('model')}`, {start.get('world_size')} rank(s) on {start.get('device')}, "
                  f"global batch {start.get('global_batch')}, {start.get('params', 0):,} parameters", ""]
    lines += [f"- epochs logged: {len(epochs)}; total wall time {sum(r['seconds'] for r in epochs):.1f} s",
              f"- final: train acc {last['train_acc'] * 100:.2f}%"
              + (f", test acc {last['test_acc'] * 100:.2f}% (loss {last['test_loss']:.4f})" if "test_acc" in last else ""),
              ]
    if best:
        lines.append(f"- best test accuracy {best['test_acc'] * 100:.2f}% at epoch {best['epoch'] + 1}")
    rates = [r["images_per_s"] for r in epochs]
    comm = sum(r.get("comm_exposed_seconds", 0) for r in epochs) / max(sum(r["seconds"] for r in epochs), 1e-9)
    lines += [f"- throughput: median {np.median(rates):.0f} images/s; communication not hidden by backward: "
              f"{comm * 100:.1f}% of the time", "",
              "| epoch | train loss | train acc | test loss | test acc | img/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in epochs:
        lines.append(f"| {r['epoch'] + 1} | {r['train_loss']:.4f} | {r['train_acc'] * 100:.2f} | "
                     f"{r.get('test_loss', float('nan')):.4f} | {r.get('test_acc', float('nan')) * 100:.2f} | "
                     f"{r['images_per_s']:.0f} |")
    lines += ["", "![loss](loss.png) ![accuracy](accuracy.png) ![throughput](throughput.png)",
              "", "![confusion matrix](confusion.png)" if tested else ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_cnn.report",
                                description="Plots (loss, accuracy, images/s, confusion matrix) and a Markdown "
                                            "summary of a ddp_cnn.train run.")
    p.add_argument("run_dir", type=Path, help="the --run-dir of a training run (holds metrics.jsonl)")
    p.add_argument("--metrics", type=Path, default=None, help="metrics file (default: RUN_DIR/metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="where to write the files (default: RUN_DIR)")
    args = p.parse_args(argv)
    try:
        records = read_metrics(args.metrics or args.run_dir / "metrics.jsonl")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: matplotlib is needed: pip install 'ddp_cnn[report]'", file=sys.stderr)
        return 2
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    epochs = epochs_of(records)
    written = plot_curves(epochs, out, plt)
    tested = [r for r in epochs if "confusion" in r]
    if tested:
        start = next((r for r in records if r.get("kind") == "start"), {})
        confusion = np.array(tested[-1]["confusion"])
        names = start.get("class_names") or [str(i) for i in range(len(confusion))]
        plot_confusion(confusion, names, out / "confusion.png", plt)
        written.append("confusion.png")
    (out / "summary.md").write_text(summary_markdown(records, args.run_dir))
    written.append("summary.md")
    print(f"wrote {', '.join(written)} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
