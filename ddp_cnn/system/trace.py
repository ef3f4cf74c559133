"""A timeline of training (``--trace FILE``): where each rank's step time goes, as Chrome trace-event JSON.

One ``pid`` per rank.  In its lane ``main``: data wait (blocked on the
loader), step, forward and backward with one span per layer inside them,
the wait for the gradient allreduce, the optimizer, checkpoints and
evaluation.  Each gradient bucket's allreduce, from the moment backward
issues it to the moment the communicator completes it, gets a lane of its
own (``allreduce K``): the allreduces overlap backward and each other
(one is issued while the one before is still in flight), so they could not
nest in one lane, and a trace viewer drops spans that do not nest.  Open the
file in https://ui.perfetto.dev (or chrome://tracing); ``python -m
ddp_cnn.report --trace FILE`` draws one step of it as a picture.

Times are ``time.perf_counter()`` on each rank, put on one time base by each
rank's ``time.time()`` taken at its tracer's start: ranks of one host line
up exactly, ranks of several hosts to the accuracy of their clock sync.  On
a GPU the spans are host time (the step does not synchronise), so a layer's
span is the time to launch its kernels.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

MAX_EVENTS = 200_000  # per rank: ~5,000 steps of fmnist-cnn (~30 MB of JSON per rank)
_NULL = nullcontext()


class _Span:
    """What ``Tracer.span`` returns: records one complete event when the block ends (a class, not a
    generator-based context manager: it is entered ~40 times per step)."""
    __slots__ = ("tracer", "name", "cat", "lane", "args", "start")

    def __init__(self, tracer, name, cat, lane, args):
        self.tracer, self.name, self.cat, self.lane, self.args = tracer, name, cat, lane, args

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.tracer.add(self.name, self.cat, self.start, time.perf_counter(), self.lane, **self.args)


class Tracer:
    """Records this rank's spans; :meth:`write` (collective) puts every rank's in one file.

    Disabled, every method returns at once and :meth:`instrument` wraps
    nothing, so an untraced run pays one attribute test per span.  Past
    ``max_events`` spans a rank keeps no more: the file holds the start of
    the run, and says in ``otherData.dropped_events`` how many were left out.
    """

    def __init__(self, rank: int, enabled: bool = True, max_events: int = MAX_EVENTS):
        self.rank, self.enabled, self.max_events = rank, enabled, max_events
        self.events: list[tuple] = []  # (name, cat, lane, start, end, args or None), perf_counter seconds
        self.dropped = 0
        self.t0, self.wall0 = time.perf_counter(), time.time()  # this rank's origin, on both clocks

    def add(self, name: str, cat: str, start: float, end: float, lane: str = "main", **args) -> None:
        """One complete span from ``start`` to ``end`` (``time.perf_counter()`` values)."""
        if not self.enabled:
            return
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append((name, cat, lane, start, end, args or None))

    def span(self, name: str, cat: str, lane: str = "main", **args):
        """Context manager: the block, as a span (nested in any span open around it on the same lane)."""
        return _Span(self, name, cat, lane, args) if self.enabled else _NULL

    def iterate(self, iterable, name: str = "data wait", cat: str = "data"):
        """``iterable``'s items, with the time blocked on each ``next()`` as a span."""
        return self._timed(iter(iterable), name, cat) if self.enabled else iterable

    def _timed(self, it, name, cat):
        clock = time.perf_counter
        try:
            while True:
                start = clock()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.add(name, cat, start, clock())
                yield item
        finally:  # a loop left early: stop the loader's prefetching now, not when collected
            close = getattr(it, "close", None)
            if close is not None:
                close()

    # ---- layers ----------------------------------------------------------------
    def instrument(self, model) -> None:
        """Span each call of ``model``'s forward and backward, and of each layer's, by wrapping them as
        instance attributes (the classes stay as they are; :meth:`restore` removes the wrappers).
        Micro-batches (``--accumulate``) and evaluation get their spans as training steps do."""
        if not self.enabled:
            return
        self._wrap(model, "forward", "forward", "forward")
        self._wrap(model, "backward", "backward", "backward")
        for i, layer in enumerate(model.layers):
            self._wrap(layer, "forward", f"forward {layer.name}", "forward", layer=i)
            self._wrap(layer, "backward", f"backward {layer.name}", "backward", layer=i)

    def _wrap(self, obj, method: str, name: str, cat: str, **args) -> None:
        inner = getattr(obj, method)
        if getattr(inner, "traced", False):  # instrumented already
            return
        add, clock = self.add, time.perf_counter

        def traced(*a, **kw):
            start = clock()
            out = inner(*a, **kw)
            add(name, cat, start, clock(), **args)
            return out
        traced.traced = True
        setattr(obj, method, traced)

    @staticmethod
    def restore(model) -> None:
        """Remove :meth:`instrument`'s wrappers: the model's and its layers' own methods again."""
        for obj in [model, *model.layers]:
            for method in ("forward", "backward"):
                if getattr(obj.__dict__.get(method), "traced", False):
                    del obj.__dict__[method]

    # ---- the file ---------------------------------------------------------------
    def write(self, comm, path, meta: dict | None = None, log=None) -> Path | None:
        """Collective: every rank's spans to rank 0, which writes ``path`` atomically (a temporary file
        renamed into place).  Returns the path on rank 0, else None.  ``meta`` goes into ``otherData``;
        ``log`` (rank 0): a line saying where the trace went.  A file that cannot be written is a
        warning: the training it describes went well."""
        if not self.enabled:
            return None
        everyone = comm.gather_obj({"rank": self.rank, "t0": self.t0, "wall0": self.wall0,
                                    "events": self.events, "dropped": self.dropped})
        if everyone is None:
            return None
        doc = chrome_trace(everyone, {"max_events_per_rank": self.max_events, **(meta or {})})
        path = Path(path)
        say = log or (lambda line: None)
        from data_tools.atomic import AtomicOutput
        from data_tools.errors import DataError
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with AtomicOutput(path.parent) as out, open(out.temp(path.name), "w") as fh:
                json.dump(doc, fh, separators=(",", ":"))
        except (OSError, DataError) as exc:
            say(f"warning: --trace {path}: not written: {exc}")
            return None
        dropped = sum(r["dropped"] for r in everyone)
        say(f"trace: {path} ({sum(len(r['events']) for r in everyone):,} spans from {len(everyone)} rank(s)"
            + (f"; {dropped:,} past the limit of {self.max_events:,} per rank left out" if dropped else "")
            + "); open it in https://ui.perfetto.dev or draw a step with python -m ddp_cnn.report --trace")
        return path


NO_TRACE = Tracer(0, enabled=False)


def _lane_order(lane: str):
    """main first, then the buckets' lanes in bucket order."""
    head, _, tail = lane.rpartition(" ")
    return (lane != "main", head, int(tail) if tail.isdigit() else 0, lane)


def chrome_trace(ranks: list[dict], other: dict) -> dict:
    """The trace-event document of every rank's records (as :meth:`Tracer.write` gathers them).

    Timestamps are microseconds since the earliest rank's origin; spans are
    complete events (``ph: X``), sorted per rank by start, outer before inner.
    """
    base = min(r["wall0"] for r in ranks)
    events = []
    for r in sorted(ranks, key=lambda r: r["rank"]):
        pid, shift = r["rank"], r["wall0"] - base - r["t0"]
        lanes = {lane: tid for tid, lane in enumerate(sorted({e[2] for e in r["events"]} | {"main"}, key=_lane_order))}
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"rank {pid}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
        for lane, tid in lanes.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        spans = []
        for name, cat, lane, start, end, args in r["events"]:
            ts, te = round((start + shift) * 1e6, 3), round((end + shift) * 1e6, 3)
            span = {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": round(te - ts, 3), "pid": pid,
                    "tid": lanes[lane]}
            if args:
                span["args"] = args
            spans.append(span)
        spans.sort(key=lambda e: (e["tid"], e["ts"], -e["dur"]))
        events += spans
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "ddp_cnn", "ranks": len(ranks),
                          "time_base": "microseconds since the first rank's tracer started (time.time() of each "
                                       "rank's origin: exact on one host, clock-sync accuracy across hosts)",
                          "dropped_events": [r["dropped"] for r in sorted(ranks, key=lambda r: r["rank"])],
                          **other}}
