"""python -m ddp_cnn.report: plots a person can read (titles, axis labels, integer epoch ticks, legends in
words), the run's wall time, records it does not know ignored; bad input exits 2."""
import json

import pytest

from ddp_cnn.cli.report import confusion_figure, curve_figures, epochs_of, read_metrics, summary_markdown
from ddp_cnn.cli.report import main as report_main
from ddp_cnn.cli.train import main as train_main
from helpers import make_synthetic_shards

pytest.importorskip("matplotlib")


@pytest.fixture
def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    yield plt
    plt.close("all")


def epoch(e, seconds=10.0, **scores):
    return {"kind": "epoch", "epoch": e, "step": 10 * (e + 1), "complete": True, "train_loss": 1.0 / (e + 1),
            "train_acc": 0.5 + e / 20, "images_per_s": 6000.0, "seconds": seconds,
            "comm_exposed_seconds": 1.0, **scores}


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tomorrows_run(time=True):
    """What the trainer may soon write: typed config, a "time" on every record, a validation split scored each
    epoch, a resume record (an interrupted epoch 2 logged twice), the test set scored once at the end."""
    records = [
        {"kind": "start", "step": 0, "model": "lenet", "params": 61706, "world_size": 2, "device": "cpu",
         "global_batch": 128, "class_names": ["a", "b", "c"], "config": {"lr": 0.001, "ema": False}},
        epoch(0, val_loss=0.9, val_acc=0.6), epoch(1, val_loss=0.7, val_acc=0.7),
        {**epoch(2, seconds=4.0), "complete": False},
        {"kind": "resume", "step": 25, "from": "ckpt-00000025.h5"},
        epoch(2, val_loss=0.8, val_acc=0.65),
        {"kind": "checkpoint", "step": 30, "path": "ckpt-00000030.h5"},
        {"kind": "test", "step": 30, "test_loss": 0.75, "test_acc": 0.66,
         "test_confusion": [[5, 1, 0], [0, 6, 1], [1, 0, 7]]},
    ]
    if time:
        for i, r in enumerate(records):
            r["time"] = 1_800_000_000.0 + 25 * i  # 7 gaps of 25 s: 175 s from the first record to the last
    return records


def test_each_curve_has_a_title_axis_labels_integer_epoch_ticks_and_a_legend_in_words(tmp_path, plt):
    records = read_metrics(write_metrics(tmp_path / "metrics.jsonl", tomorrows_run()))
    figures = curve_figures(epochs_of(records), plt, "lenet")
    assert set(figures) == {"loss", "accuracy", "throughput"}
    expected = {"loss": ("Loss", "cross-entropy loss", ["train loss", "validation loss"]),
                "accuracy": ("Accuracy", "accuracy (%)", ["train accuracy", "validation accuracy"]),
                "throughput": ("throughput", "images per second (all ranks)", None)}
    for name, fig in figures.items():
        title, ylabel, legend = expected[name]
        ax = fig.axes[0]
        fig.canvas.draw()
        assert title in ax.get_title() and "lenet" in ax.get_title(), name
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == ylabel, name
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(t == int(t) for t in ticks), (name, ticks)
        assert (ax.get_legend() is None) if legend is None else \
            [t.get_text() for t in ax.get_legend().get_texts()] == legend, name
        # one point per epoch, the resumed epoch 3 once, epochs counted from 1
        assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3], name


def test_a_single_epoch_still_gets_one_integer_tick(tmp_path, plt):
    records = read_metrics(write_metrics(tmp_path / "metrics.jsonl", [epoch(0, test_loss=0.5, test_acc=0.8)]))
    for name, fig in curve_figures(epochs_of(records), plt, "one").items():
        ax = fig.axes[0]
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1], name


def test_the_confusion_matrix_is_titled_with_its_split_and_labelled_with_class_names(tmp_path, plt):
    fig = confusion_figure(tomorrows_run(), plt)
    ax = fig.axes[0]
    assert ax.get_title() == "Confusion matrix, test set"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    today = [epoch(0, test_loss=0.5, test_acc=0.8, confusion=[[1, 0], [0, 1]])]  # what the trainer writes now
    assert confusion_figure(today, plt).axes[0].get_title() == "Confusion matrix, test set, epoch 1"
    assert confusion_figure([epoch(0)], plt) is None


def test_the_summary_gives_the_runs_wall_time_not_the_sum_of_epoch_times(tmp_path):
    summary = summary_markdown(tomorrows_run(time=True), tmp_path)
    assert "wall time (first to last record) 175.0 s (2 min 55 s)" in summary
    assert "sum of epochs" not in summary


def test_without_timestamps_the_summary_says_it_gives_the_sum_of_epoch_times(tmp_path):
    summary = summary_markdown(tomorrows_run(time=False), tmp_path)
    assert "training time (sum of epochs) 30.0 s" in summary  # 3 epochs of 10 s, the partial record replaced
    assert "wall time" not in summary


def test_the_summary_reads_validation_and_a_test_record_and_shows_missing_values_as_dashes(tmp_path):
    summary = summary_markdown(tomorrows_run(), tmp_path)
    assert "model `lenet`, 2 rank(s) on cpu, global batch 128, 61,706 parameters" in summary
    assert "best validation accuracy 70.00% at epoch 2" in summary
    assert "test set (test record): acc 66.00% (loss 0.7500)" in summary
    assert "| epoch | train loss | train acc | validation loss | validation acc | img/s | seconds |" in summary
    assert summary.count("\n| 3 |") == 1  # the interrupted epoch once, as resumed
    bare = summary_markdown([epoch(0), epoch(1, val_acc=0.5)], tmp_path)
    assert "| 1 | 1.0000 | 50.00 | – | – | 6000 | 10.0 |" in bare


def test_report_writes_plots_and_summary(tmp_path):
    data = make_synthetic_shards(tmp_path / "data", 1)
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--run-dir", str(run), "--comm", "single", "--device", "cpu",
                       "--model", "mlp", "--epochs", "2", "--batch-size", "64", "--progress", "off",
                       "--val-fraction", "0.2"]) == 0
    assert report_main([str(run)]) == 0
    for name in ("loss.png", "accuracy.png", "throughput.png", "confusion.png"):
        blob = (run / name).read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5000, name
    summary = (run / "summary.md").read_text()
    assert "model `mlp`, 1 rank(s) on cpu" in summary
    assert summary.count("\n| 1 |") == 1 and "\n| 2 |" in summary  # one row per epoch
    # Epochs are scored on validation (the best one named); the test set once, at the end.
    assert "best validation accuracy" in summary and "test set (test record): acc" in summary
    assert "wall time (first to last record)" in summary  # the trainer stamps every record with its time


def test_report_on_a_missing_or_broken_metrics_file_exits_2(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\nnot json\n')
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\n[1, 2]\n')
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON object" in capsys.readouterr().err


# ---- --trace: one step's timeline ------------------------------------------------------------------

def write_trace(path, steps=4, slow_step=3):
    """Two ranks; each step 10 ms (step `slow_step`: 20 ms): forward 0-3 ms, backward 4-8 (layer b 4-6, then
    layer a 6-8), bucket 0 issued at 6 (queued 1 ms) done at 9, bucket 1 issued at 8 done at 9.5, the wait
    8-9.5, the optimizer 9.5-10.  Backward hides 2 of the 3.5 ms the allreduce is in flight."""
    from ddp_cnn.system.trace import chrome_trace
    ranks = []
    for rank in (0, 1):
        events = []
        for s in range(steps):
            t, ms = 0.1 * s, 1e-3
            length = 20 if s == slow_step else 10
            events += [("step", "step", "main", t, t + length * ms, {"step": s}),
                       ("forward", "forward", "main", t, t + 3 * ms, None),
                       ("backward", "backward", "main", t + 4 * ms, t + 8 * ms, None),
                       ("backward b", "backward", "main", t + 4 * ms, t + 6 * ms, {"layer": 1}),
                       ("backward a", "backward", "main", t + 6 * ms, t + 8 * ms, {"layer": 0}),
                       ("allreduce bucket 0", "allreduce", "allreduce 0", t + 6 * ms, t + 9 * ms,
                        {"bucket": 0, "bytes": 2**20, "queued_ms": 1.0}),
                       ("allreduce bucket 1", "allreduce", "allreduce 1", t + 8 * ms, t + 9.5 * ms,
                        {"bucket": 1, "bytes": 2**19}),
                       ("allreduce wait", "allreduce", "main", t + 8 * ms, t + 9.5 * ms, None),
                       ("optimizer", "optimizer", "main", t + 9.5 * ms, t + 10 * ms, None)]
        ranks.append({"rank": rank, "t0": 0.0, "wall0": 1000.0, "events": events, "dropped": 0})
    path.write_text(json.dumps(chrome_trace(ranks, {})))
    return path


def test_the_timeline_shows_a_typical_step_with_the_allreduce_hidden_behind_backward(tmp_path, plt):
    from ddp_cnn.cli.timeline import read_trace, timeline_figure
    trace = read_trace(write_trace(tmp_path / "trace.json"))
    ax = timeline_figure(trace, plt).axes[0]  # later half: steps 2 and 3; step 3 is slow
    assert ax.get_title().startswith("Step 2, 2 rank(s): backward and the gradient allreduce")
    assert "allreduce in flight 3.5 ms, 2.0 ms of it behind backward (57%); waited for it 1.5 ms" in ax.get_title()
    assert ax.get_xlabel() == "time since step 2 began on the earliest rank (ms)"
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "rank 0: compute", "rank 0: bucket 0 (1.00 MB)", "rank 0: bucket 1 (0.50 MB)",
        "rank 1: compute", "rank 1: bucket 0 (1.00 MB)", "rank 1: bucket 1 (0.50 MB)"]
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert legend == ["forward", "backward, layer by layer", "waiting for the allreduce", "optimizer",
                      "bucket issued, queued", "bucket reducing"]
    assert {t.get_text() for t in ax.texts} == {"a", "b"}  # the layers' names on their backward bars
    assert timeline_figure(trace, plt, step=3).axes[0].get_title().startswith("Step 3,")


def test_report_draws_the_timeline_beside_the_run_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.jsonl", tomorrows_run())
    assert report_main([str(run), "--trace", str(write_trace(tmp_path / "trace.json"))]) == 0
    assert (run / "timeline.png").read_bytes().startswith(b"\x89PNG")
    assert "(timeline.png)" in (run / "summary.md").read_text()
    assert report_main(["--trace", str(tmp_path / "trace.json"), "--out", str(tmp_path / "pictures")]) == 0
    assert [p.name for p in (tmp_path / "pictures").iterdir()] == ["timeline.png"]  # a trace alone: no summary


def test_a_bad_trace_or_step_exits_2_with_one_line(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.json")
    assert report_main(["--trace", str(trace), "--step", "7", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --step 7: not in the trace, which holds steps 0 to 3"
    assert not (tmp_path / "out").exists()  # nothing written
    (tmp_path / "bad.json").write_text("{not json")
    assert report_main(["--trace", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not JSON" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text('{"traceEvents": []}')
    assert report_main(["--trace", str(tmp_path / "empty.json")]) == 2
    assert "empty.json: no training step that every rank traced" in capsys.readouterr().err
    for argv in ([], ["--step", "1", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            report_main(argv)
        assert exc.value.code == 2
