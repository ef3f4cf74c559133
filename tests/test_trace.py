"""--trace: a Chrome trace-event timeline of every rank's steps.  The file parses, holds every rank, its spans
nest lane by lane, and on 2 ranks a bucket's allreduce is issued while backward still runs; a disabled
tracer does nothing; the report draws one step of it."""
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn import model as model_mod
from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.system.trace import NO_TRACE, Tracer, chrome_trace
from ddp_cnn.cli.train import main as train_main
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
ROUNDING = 0.002  # µs: timestamps are rounded to the nanosecond


def spans(doc):
    return [e for e in doc["traceEvents"] if e["ph"] == "X"]


def partial_overlaps(doc) -> list:
    """Pairs of spans on one (pid, tid) lane that overlap without one holding the other."""
    lanes = defaultdict(list)
    for e in spans(doc):
        lanes[e["pid"], e["tid"]].append(e)
    bad = []
    for lane in lanes.values():
        lane.sort(key=lambda e: (e["ts"], -e["dur"]))
        enclosing = []
        for e in lane:
            while enclosing and enclosing[-1]["ts"] + enclosing[-1]["dur"] <= e["ts"] + ROUNDING:
                enclosing.pop()
            if enclosing and e["ts"] + e["dur"] > enclosing[-1]["ts"] + enclosing[-1]["dur"] + ROUNDING:
                bad.append((enclosing[-1]["name"], e["name"]))
            enclosing.append(e)
    return bad


def inside(inner, outer) -> bool:
    return (outer["pid"] == inner["pid"] and outer["ts"] - ROUNDING <= inner["ts"]
            and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + ROUNDING)


def buckets_issued_during_backward(doc) -> int:
    """How many (rank, step, bucket) allreduces were issued while backward still had a layer to run on that
    rank: before the step's last layer backward began."""
    count = 0
    for step in (e for e in spans(doc) if e["cat"] == "step"):
        layers = [e for e in spans(doc) if e["cat"] == "backward" and "layer" in e.get("args", {}) and inside(e, step)]
        buckets = [e for e in spans(doc) if "bucket" in e.get("args", {}) and inside(e, step)]
        assert layers and buckets, step
        count += sum(b["ts"] < max(e["ts"] for e in layers) for b in buckets)
    return count


def test_the_nesting_check_finds_a_partial_overlap():
    def x(name, ts, dur, tid=0):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}
    nested = {"traceEvents": [x("step", 0, 10), x("forward", 1, 3), x("conv", 1, 2), x("backward", 4, 6)]}
    assert partial_overlaps(nested) == []
    crossing = {"traceEvents": nested["traceEvents"] + [x("late", 8, 5)]}
    assert partial_overlaps(crossing) == [("backward", "late")]
    assert partial_overlaps({"traceEvents": crossing["traceEvents"][:-1] + [x("late", 8, 5, tid=1)]}) == []


def test_ranks_are_put_on_one_time_base_by_their_wall_clocks():
    # Rank 1's tracer started 0.5 s after rank 0's, its perf_counter from another origin.
    ranks = [{"rank": 0, "t0": 100.0, "wall0": 1000.0, "events": [("a", "c", "main", 101.0, 101.25, None)],
              "dropped": 0},
             {"rank": 1, "t0": 5.0, "wall0": 1000.5, "events": [("b", "c", "main", 6.0, 6.5, {"k": 1})],
              "dropped": 3}]
    doc = chrome_trace(ranks, {"model": "m"})
    a, b = spans(doc)
    assert (a["pid"], a["ts"], a["dur"]) == (0, 1e6, 0.25e6)
    assert (b["pid"], b["ts"], b["dur"], b["args"]) == (1, 1.5e6, 0.5e6, {"k": 1})
    names = {(e["pid"], e["name"]): e["args"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert names[0, "process_name"] == {"name": "rank 0"} and names[1, "process_name"] == {"name": "rank 1"}
    assert doc["otherData"]["dropped_events"] == [0, 3] and doc["otherData"]["model"] == "m"
    assert doc["displayTimeUnit"] == "ms"


def test_each_layers_spans_nest_in_the_models_forward_and_backward_and_restore_removes_them():
    model = model_mod.build("lenet", seed=0)
    tracer = Tracer(0)
    tracer.instrument(model)
    tracer.instrument(model)  # twice: still one span per call
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)
    with tracer.span("step", "step", step=0):
        model.backward(model.forward(x, train=True))
    Tracer.restore(model)
    model.backward(model.forward(x, train=True))  # not recorded
    assert all("forward" not in vars(obj) and "backward" not in vars(obj) for obj in [model, *model.layers])
    doc = chrome_trace([{"rank": 0, "t0": tracer.t0, "wall0": tracer.wall0, "events": tracer.events,
                         "dropped": 0}], {})
    assert partial_overlaps(doc) == []
    names = [e["name"] for e in spans(doc)]
    assert len(names) == 3 + 2 * len(model.layers)
    outer = {e["name"]: e for e in spans(doc) if e["name"] in ("step", "forward", "backward")}
    for e in spans(doc):
        if e["cat"] in ("forward", "backward") and e["name"] not in outer:
            assert inside(e, outer[e["cat"]]) and "layer" in e["args"], e
    assert inside(outer["forward"], outer["step"]) and inside(outer["backward"], outer["step"])


def test_a_disabled_tracer_records_nothing_and_wraps_nothing():
    model = model_mod.build("lenet", seed=0)
    off = Tracer(0, enabled=False)
    off.instrument(model)
    assert all("forward" not in vars(obj) for obj in [model, *model.layers])
    batches = [1, 2]
    assert off.iterate(batches) is batches and NO_TRACE.span("a", "b") is off.span("c", "d")
    start = time.perf_counter()
    for _ in range(100_000):
        with off.span("step", "step"):
            pass
        off.add("x", "y", 0.0, 1.0)
    assert time.perf_counter() - start < 1.0  # ~0.05 s here: a few attribute tests per span
    assert off.events == [] and off.write(SingleComm(), "unused.json") is None


def test_past_max_events_spans_are_counted_and_left_out(tmp_path):
    tracer = Tracer(0, max_events=3)
    for i in range(5):
        tracer.add(f"s{i}", "c", float(i), i + 0.5)
    lines = []
    assert tracer.write(SingleComm(), tmp_path / "t.json", log=lines.append) == tmp_path / "t.json"
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [e["name"] for e in spans(doc)] == ["s0", "s1", "s2"]  # the start of the run is kept
    assert doc["otherData"]["dropped_events"] == [2] and doc["otherData"]["max_events_per_rank"] == 3
    assert "2 past the limit of 3 per rank left out" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left


def test_an_unwritable_trace_is_a_warning_not_a_failure(tmp_path):
    (tmp_path / "file").write_text("")
    lines = []
    assert Tracer(0).write(SingleComm(), tmp_path / "file" / "t.json", log=lines.append) is None
    assert lines[0].startswith("warning: --trace")


# ---- a real run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_trace(tmp_path_factory):
    """6 steps of lenet on 2 ranks under mpirun, buckets of 20 kB (3 buckets), a validation split, a checkpoint."""
    base = tmp_path_factory.mktemp("trace")
    data = make_synthetic_shards(base / "data", 2)
    trace = base / "run" / "trace.json"
    proc = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "2", sys.executable, "-m", "ddp_cnn.train",
                           "--data", str(data), "--model", "lenet", "--epochs", "1", "--max-steps", "6",
                           "--batch-size", "32", "--bucket-mb", "0.02", "--val-fraction", "0.1",
                           "--checkpoint-every", "3", "--run-dir", str(base / "run"), "--progress", "off",
                           "--trace", str(trace)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(f"trace: {trace}") == 1  # rank 0 alone says where
    return json.loads(trace.read_text())


def test_a_two_rank_trace_holds_every_rank_and_every_phase(two_rank_trace):
    doc = two_rank_trace
    assert {e["pid"] for e in spans(doc)} == {0, 1} and doc["otherData"]["ranks"] == 2
    for pid in (0, 1):
        mine = [e for e in spans(doc) if e["pid"] == pid]
        assert {e["cat"] for e in mine} == {"data", "step", "forward", "backward", "allreduce", "optimizer",
                                            "checkpoint", "evaluation"}
        assert sorted(e["args"]["step"] for e in mine if e["cat"] == "step") == list(range(6))
        lanes = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid}
        assert lanes == {0: "main", 1: "allreduce 0", 2: "allreduce 1", 3: "allreduce 2"}
        buckets = [e for e in mine if "bucket" in e.get("args", {})]
        assert len(buckets) == 6 * 3 and all(lanes[e["tid"]] == f"allreduce {e['args']['bucket']}" for e in buckets)
        sizes = {e["args"]["bucket"]: e["args"]["bytes"] for e in buckets}
        assert [sizes[k] for k in range(3)] == doc["otherData"]["bucket_bytes"]


def test_a_two_rank_traces_spans_nest_lane_by_lane(two_rank_trace):
    assert partial_overlaps(two_rank_trace) == []
    # and each layer's backward sits in its step's backward, each step's phases in the step
    doc = two_rank_trace
    for step in (e for e in spans(doc) if e["cat"] == "step"):
        held = [e for e in spans(doc) if e["tid"] == 0 and inside(e, step) and e is not step]
        assert {e["name"] for e in held} >= {"forward", "backward", "allreduce wait", "optimizer"}
        layers = [e for e in held if e["cat"] == "backward" and e["name"] != "backward"]
        assert len(layers) == len(model_mod.build("lenet").layers)


def test_on_two_ranks_buckets_are_issued_before_backward_ends(two_rank_trace):
    # 6 steps x 2 ranks; the dense layers fill 2 of the 3 buckets before the convolutions' backward runs
    assert buckets_issued_during_backward(two_rank_trace) == 6 * 2 * 2


def test_with_one_bucket_the_allreduce_starts_after_backward(tmp_path):
    """The check above can fail: --bucket-mb 0 issues the one allreduce after backward."""
    data = make_synthetic_shards(tmp_path / "data", 1)
    assert train_main(["--data", str(data), "--model", "lenet", "--comm", "single", "--device", "cpu",
                       "--max-steps", "3", "--batch-size", "16", "--bucket-mb", "0", "--eval-every", "0",
                       "--run-dir", str(tmp_path / "run"), "--progress", "off", "--trace", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert buckets_issued_during_backward(doc) == 0 and partial_overlaps(doc) == []


def test_a_stopped_run_writes_its_trace_too(tmp_path):
    from ddp_cnn.dist.faults import EXIT_PREEMPTED
    from ddp_cnn.run.trainer import Trainer
    data = make_synthetic_shards(tmp_path / "data", 1)
    trainer = Trainer(model_mod.build("lenet"), comm=SingleComm(), data=str(data), run_dir=str(tmp_path / "run"),
                      epochs=1, batch_size=100, progress="off", trace=str(tmp_path / "t.json"))
    step = trainer.opt.step

    def signal_at_step_2(lr=None):  # as SIGTERM would, during step 2
        if trainer.global_step == 2:
            trainer.stop.signum = 15
        step(lr)
    trainer.opt.step = signal_at_step_2
    assert trainer.fit() == EXIT_PREEMPTED
    doc = json.loads((tmp_path / "t.json").read_text())
    # step 2's flag had gone out: the ranks agree on stopping in step 3's allreduce, and stop after it
    assert [e["args"]["step"] for e in spans(doc) if e["cat"] == "step"] == [0, 1, 2, 3]
    assert [e["name"] for e in spans(doc) if e["cat"] == "checkpoint"] == ["checkpoint"]
    assert all("forward" not in vars(layer) for layer in trainer.model.layers)  # the wrappers are gone


def test_the_report_draws_a_step_of_the_two_rank_trace(two_rank_trace, tmp_path):
    pytest.importorskip("matplotlib")
    from ddp_cnn.cli.report import main as report_main
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(two_rank_trace))
    assert report_main(["--trace", str(trace), "--step", "4"]) == 0
    blob = (tmp_path / "timeline.png").read_bytes()
    assert blob.startswith(b"\x89PNG") and len(blob) > 20_000
