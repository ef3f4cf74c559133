"""python -m ddp_cnn.report: plots a person can read (titles, axis labels, integer epoch ticks, legends in
words), the run's wall time, records it does not know ignored; bad input exits 2."""
import json

import pytest

from ddp_cnn.report import confusion_figure, curve_figures, epochs_of, read_metrics, summary_markdown
from ddp_cnn.report import main as report_main
from ddp_cnn.train import main as train_main
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
