"""One step of a ``ddp_cnn.train --trace`` timeline, for ``python -m ddp_cnn.report --trace FILE``: the file read
back (one line naming it when unusable), the typical step chosen, and every rank's step drawn, its backward layer
by layer beside its gradient buckets' allreduces."""
from __future__ import annotations

import json
from pathlib import Path


def read_trace(path: Path) -> dict:
    """A ``ddp_cnn.train --trace`` file's spans by rank, {pid: [complete event]}; ValueError naming the file
    when it is unusable."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected the --trace file of a ddp_cnn.train run)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not JSON (a trace is one JSON document)") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list (not a Chrome trace-event file)")
    ranks: dict = {}
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "X":
            ranks.setdefault(e.get("pid"), []).append(e)
    if not steps_in(ranks):
        raise ValueError(f"{path}: no training step that every rank traced (was the run stopped before its "
                         "first step?)")
    return ranks


def _step_spans(events) -> dict:
    return {e["args"]["step"]: e for e in events if e.get("cat") == "step" and "step" in e.get("args", {})}


def steps_in(ranks: dict) -> list[int]:
    """The global steps that every rank's trace holds, in order."""
    held = [set(_step_spans(events)) for events in ranks.values()]
    return sorted(set.intersection(*held)) if held else []


def typical_step(ranks: dict) -> int:
    """The step of median length (the slowest rank's) among the later half of the traced steps: past
    the first steps' warm-up, and neither a fast nor a slow outlier."""
    steps = steps_in(ranks)
    late = steps[len(steps) // 2:]
    spans = [_step_spans(events) for events in ranks.values()]
    late.sort(key=lambda s: max(by_step[s]["dur"] for by_step in spans))
    return late[(len(late) - 1) // 2]


def _union(intervals) -> list:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _length(intervals) -> float:
    return sum(b - a for a, b in _union(intervals))


def _overlap(xs, ys) -> float:
    """Total length of the time covered by both interval sets."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in _union(xs) for c, d in _union(ys))


def step_view(events, step: int) -> dict:
    """One rank's step: its span, the spans inside it on the main lane, its buckets' allreduces, and
    how much of the allreduce time backward hid (times in microseconds)."""
    span = _step_spans(events)[step]
    t0, t1 = span["ts"], span["ts"] + span["dur"]
    inside = [e for e in events if t0 <= e["ts"] <= t1 and e is not span]
    buckets = sorted((e for e in inside if "bucket" in e.get("args", {})), key=lambda e: e["args"]["bucket"])
    main = [e for e in inside if "bucket" not in e.get("args", {})]
    flight = [(e["ts"], e["ts"] + e["dur"]) for e in buckets]
    backward = [(e["ts"], e["ts"] + e["dur"]) for e in main if e["name"] == "backward"]
    return {"span": span, "main": main, "buckets": buckets, "in_flight": _length(flight),
            "hidden": _overlap(flight, backward), "backward": _length(backward),
            "waited": sum(e["dur"] for e in main if e["name"] == "allreduce wait")}


TIMELINE_COLOURS = {"forward": "#9ecae1", "backward": ("#e6550d", "#fdae6b"), "queued": "#dadaeb",
                    "reducing": "#6a51a3", "wait": "#d62728", "optimizer": "#31a354"}


def timeline_figure(ranks: dict, plt, step: int | None = None):
    """One step of every rank as a Figure: a row of compute (forward, backward layer by layer, the wait
    for the allreduce, the optimizer) and a row per gradient bucket (queued behind the bucket before it,
    then reducing), on one time axis.  ``step`` None: :func:`typical_step`.  ValueError: no such step."""
    from matplotlib.patches import Patch
    held = steps_in(ranks)
    if step is None:
        step = typical_step(ranks)
    elif step not in held:
        raise ValueError(f"--step {step}: not in the trace, which holds steps {held[0]} to {held[-1]}")
    views = {pid: step_view(events, step) for pid, events in sorted(ranks.items())}
    origin = min(v["span"]["ts"] for v in views.values())
    end = max(v["span"]["ts"] + v["span"]["dur"] for v in views.values())
    width_ms = max((end - origin) / 1e3, 1e-3)
    rows = []  # (label, [(start ms, length ms, colour)], [(x ms, text)])
    for pid, v in views.items():
        bars, texts, shade = [], [], 0
        for e in sorted(v["main"], key=lambda e: e["ts"]):
            start, length = (e["ts"] - origin) / 1e3, e["dur"] / 1e3
            if e["name"] == "forward":
                bars.append((start, length, TIMELINE_COLOURS["forward"]))
            elif e.get("cat") == "backward" and e["name"] != "backward":  # one layer
                bars.append((start, length, TIMELINE_COLOURS["backward"][shade % 2]))
                shade += 1
                label = e["name"].removeprefix("backward ")
                if length / width_ms * 11 * 72 > 3.6 * len(label):  # fits at 6 pt on an 11-inch axis
                    texts.append((start + length / 2, label))
            elif e["name"] == "allreduce wait":
                bars.append((start, length, TIMELINE_COLOURS["wait"]))
            elif e["name"] == "optimizer":
                bars.append((start, length, TIMELINE_COLOURS["optimizer"]))
        rows.append((f"rank {pid}: compute", bars, texts))
        for e in v["buckets"]:
            start, length = (e["ts"] - origin) / 1e3, e["dur"] / 1e3
            queued = min(e["args"].get("queued_ms", 0.0), length)
            rows.append((f"rank {pid}: bucket {e['args']['bucket']} ({e['args'].get('bytes', 0) / 2**20:.2f} MB)",
                         [(start, queued, TIMELINE_COLOURS["queued"]),
                          (start + queued, length - queued, TIMELINE_COLOURS["reducing"])], []))
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.42 * len(rows)))
    for y, (_, bars, texts) in enumerate(rows):
        ax.broken_barh([(a, w) for a, w, _ in bars], (y - 0.38, 0.76), facecolors=[c for _, _, c in bars],
                       edgecolor="white", linewidth=0.3)
        for x, text in texts:
            ax.text(x, y, text, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, width_ms)
    ax.set_xlabel(f"time since step {step} began on the earliest rank (ms)")
    ax.grid(axis="x", alpha=0.3)
    n = len(views)
    flight = sum(v["in_flight"] for v in views.values()) / n / 1e3
    hidden = sum(v["hidden"] for v in views.values()) / n / 1e3
    waited = sum(v["waited"] for v in views.values()) / n / 1e3
    ax.set_title(f"Step {step}, {n} rank(s): backward and the gradient allreduce\n"
                 f"per rank (mean): allreduce in flight {flight:.1f} ms, {hidden:.1f} ms of it behind backward "
                 f"({100 * hidden / flight if flight else 0:.0f}%); waited for it {waited:.1f} ms", fontsize=10)
    legend = [("forward", TIMELINE_COLOURS["forward"]), ("backward, layer by layer", TIMELINE_COLOURS["backward"][0]),
              ("waiting for the allreduce", TIMELINE_COLOURS["wait"]), ("optimizer", TIMELINE_COLOURS["optimizer"]),
              ("bucket issued, queued", TIMELINE_COLOURS["queued"]), ("bucket reducing", TIMELINE_COLOURS["reducing"])]
    height = fig.get_size_inches()[1]
    fig.legend(handles=[Patch(facecolor=c, label=label) for label, c in legend], loc="lower center", ncol=3,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1))  # half an inch at the bottom for the legend
    return fig
