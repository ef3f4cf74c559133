"""python -m ddp_cnn.evaluate: a checkpoint, an exported .npz or a run folder; bad input is one line and exit 2;
a reader that leaves early (`| head -1`) is no error."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_cnn.run.checkpoint import list_checkpoints
from ddp_cnn.cli.evaluate import main as evaluate_main
from ddp_cnn.cli.export import main as export_main
from ddp_cnn.cli.train import main as train_main
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch mlp run keeping both checkpoints, its data, and an export of its newest checkpoint."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = make_synthetic_shards(tmp / "data", 1)
    run_dir = tmp / "run"
    assert train_main(["--data", str(data), "--run-dir", str(run_dir), "--comm", "single", "--device", "cpu",
                       "--model", "mlp", "--epochs", "2", "--batch-size", "64", "--keep", "0",
                       "--progress", "off"]) == 0
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) == 2
    assert export_main(["--checkpoint", str(checkpoints[-1]), "--out", str(tmp / "model.npz")]) == 0
    return {"data": data, "dir": run_dir, "checkpoints": checkpoints, "npz": tmp / "model.npz"}


def evaluate(checkpoint, data, capsys):
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", str(data)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_folder_or_its_checkpoints_folder_means_its_newest_checkpoint(run, capsys):
    _, oldest, _ = evaluate(run["checkpoints"][0], run["data"], capsys)
    code, newest, err = evaluate(run["checkpoints"][-1], run["data"], capsys)
    assert code == 0, err
    assert newest.startswith("test accuracy ") and newest != oldest  # the two checkpoints are told apart
    for folder in (run["dir"], run["dir"] / "checkpoints"):
        code, out, err = evaluate(folder, run["data"], capsys)
        assert code == 0, err
        assert out == newest, folder


def test_an_exported_npz_scores_as_its_checkpoint(run, capsys):
    _, from_h5, _ = evaluate(run["checkpoints"][-1], run["data"], capsys)
    code, from_npz, err = evaluate(run["npz"], run["data"], capsys)
    assert code == 0, err
    assert from_npz == from_h5


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing.h5: no such file"),
    ("empty folder", "no checkpoint (ckpt-*.h5) in"),
    ("not a model", "neither a checkpoint"),
    ("no data", "test.h5"),
])
def test_bad_input_is_one_error_line_and_exit_2(run, tmp_path, capsys, case, expected):
    checkpoint, data = run["checkpoints"][-1], run["data"]
    if case == "missing":
        checkpoint = tmp_path / "missing.h5"
    elif case == "empty folder":
        checkpoint = tmp_path / "empty"
        checkpoint.mkdir()
    elif case == "not a model":
        checkpoint = tmp_path / "notes.txt"
        checkpoint.write_text("hello\n")
    else:
        data = tmp_path
    code, out, err = evaluate(checkpoint, data, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def command(run) -> list[str]:
    return [sys.executable, "-m", "ddp_cnn.evaluate", "--checkpoint", str(run["dir"]), "--data", str(run["data"])]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_piped_into_head_prints_the_first_line_and_no_traceback(run):
    shell = " ".join(f"'{a}'" for a in command(run)) + " | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("test accuracy ") and done.stdout.count("\n") == 1
    assert done.stderr == ""


def test_a_pipe_closed_before_any_output_is_no_error(run):
    # The reader is gone before evaluate writes a byte: every write meets a closed pipe.
    proc = subprocess.Popen(command(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and err == ""
