"""python -m ddp_cnn.report: plots and a summary from a real (tiny) run; bad input exits 2."""
import pytest

from ddp_cnn.report import main as report_main
from ddp_cnn.train import main as train_main
from helpers import make_synthetic_shards

pytest.importorskip("matplotlib")


def test_report_writes_plots_and_summary(tmp_path):
    data = make_synthetic_shards(tmp_path / "data", 1)
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--run-dir", str(run), "--comm", "single", "--device", "cpu",
                       "--model", "mlp", "--epochs", "2", "--batch-size", "64", "--progress", "off"]) == 0
    assert report_main([str(run)]) == 0
    for name in ("loss.png", "accuracy.png", "throughput.png", "confusion.png"):
        blob = (run / name).read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5000, name
    summary = (run / "summary.md").read_text()
    assert "model `mlp`, 1 rank(s) on cpu" in summary
    assert summary.count("\n| 1 |") == 1 and "\n| 2 |" in summary  # one row per epoch
    assert "best test accuracy" in summary


def test_report_on_a_missing_or_broken_metrics_file_exits_2(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\nnot json\n')
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
