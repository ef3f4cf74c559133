"""``python -m ddp_cnn.summary``: parameter counts checked against arithmetic done by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_cnn.cli import summary
from ddp_cnn.model.network import format_summary

REPO = Path(__file__).resolve().parents[1]


def conv(k, c_in, filters):  # weights k*k*c_in*filters + one bias per filter
    return k * k * c_in * filters + filters


def dense(fan_in, units):    # weights fan_in*units + one bias per unit
    return fan_in * units + units


def run(capsys, *args):
    code = summary.main(list(args))
    return code, capsys.readouterr().out.splitlines()


def totals(lines):
    (line,) = [l for l in lines if l.startswith("total")]
    params, mflop = line.split()[1:]
    return int(params.replace(",", "")), float(mflop)


def test_fmnist_cnn_has_1736714_parameters_and_about_40_mflop(capsys):
    code, lines = run(capsys, "--model", "fmnist-cnn")
    assert code == 0
    by_hand = (conv(3, 1, 32)            # 28x28x1  -> 26x26x32:         320
               + conv(3, 32, 64)         # 26x26x32 -> 24x24x64:      18,496
               + conv(3, 64, 128)        # pool -> 12x12x64 -> 10x10x128: 73,856
               + dense(5 * 5 * 128, 512)  # pool -> 5x5x128 = 3200 -> 512: 1,638,912
               + dense(512, 10))         # 5,130
    assert by_hand == 1_736_714
    assert f"{'total':<50}{'1,736,714':>12}{39.705:>10.3f}" in lines
    # forward FLOP = 2 x multiply-adds of convs and denses + one compare per pooled input
    mflop = (2 * (26 * 26 * 9 * 1 * 32 + 24 * 24 * 9 * 32 * 64 + 10 * 10 * 9 * 64 * 128 + 3200 * 512 + 512 * 10)
             + 12 * 12 * 64 * 4 + 5 * 5 * 128 * 4) / 1e6
    assert totals(lines) == (1_736_714, pytest.approx(mflop, abs=5e-4))
    assert lines[-1] == "input (28, 28, 1); forward+backward is about 3x the forward MFLOP"


def test_lenet_counts_by_hand(capsys):
    code, lines = run(capsys, "--model", "lenet")
    by_hand = (conv(5, 1, 6)            # 28x28x1 -> 28x28x6 ('same'):   156
               + conv(5, 6, 16)         # pool -> 14x14x6 -> 10x10x16: 2,416
               + dense(5 * 5 * 16, 120)  # pool -> 5x5x16 = 400 -> 120: 48,120
               + dense(120, 84)         # 10,164
               + dense(84, 10))         # 850
    assert code == 0 and by_hand == 61_706 and totals(lines)[0] == by_hand
    assert any(l.split()[:3] == ["conv2d_1", "Conv2D", "(10,"] and l.split()[-2] == "2,416" for l in lines)


def test_mlp_counts_by_hand(capsys):
    code, lines = run(capsys, "--model", "mlp")
    by_hand = dense(28 * 28, 128) + dense(128, 64) + dense(64, 10)  # 100,480 + 8,256 + 650
    assert code == 0 and by_hand == 109_386 and totals(lines)[0] == by_hand


def test_pool_flops_count_each_window_per_axis():
    """One compare (or add) per window cell: OH x OW x C x KH x KW, with a stride per axis."""
    from ddp_cnn.model import layers as L
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.model import Sequential
    model = Sequential([L.MaxPool2D((2, 3)), L.AvgPool2D((3, 2), stride=(1, 2), padding=(1, 0))], (6, 9, 4),
                       get_backend("cpu"))
    rows = model.summary_rows()
    # 6x9 -> 3x3 (stride = window); then 3x3 padded to 5x3 -> (5-3)/1+1 = 3 by (3-2)//2+1 = 1.
    assert [tuple(r[2]) for r in rows] == [(3, 3, 4), (3, 1, 4)]
    assert [r[4] * 1e6 for r in rows] == [pytest.approx(3 * 3 * 4 * 6), pytest.approx(3 * 1 * 4 * 6)]
    text = format_summary(model)
    assert "(3, 3, 4)" in text and "(3, 1, 4)" in text


def test_classes_and_input_shape_change_the_counts(capsys):
    code, lines = run(capsys, "--model", "mlp", "--classes", "3", "--input-shape", "8,8,1")
    assert code == 0 and totals(lines)[0] == dense(64, 128) + dense(128, 64) + dense(64, 3)


def test_unknown_model_exits_2_with_argparse_usage(capsys):
    with pytest.raises(SystemExit) as info:
        summary.main(["--model", "resnet-9000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet-9000'" in err and "fmnist-cnn" in err


@pytest.mark.parametrize("shape", ["28,x,1", "4,4,1"])  # not numbers; too small for lenet's convolutions
def test_bad_input_shape_exits_2_with_one_line(shape, capsys):
    assert summary.main(["--model", "lenet", "--input-shape", shape]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_runs_as_a_module():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ddp_cnn.summary", "--model", "lenet"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "61,706" in proc.stdout, proc.stderr


def test_fmnist_cnn_on_32x32x3_counts_by_hand(capsys):
    code, lines = run(capsys, "--model", "fmnist-cnn", "--input-shape", "32,32,3")
    by_hand = (conv(3, 3, 32)             # 32x32x3  -> 30x30x32
               + conv(3, 32, 64)          # -> 28x28x64
               + conv(3, 64, 128)         # pool -> 14x14x64 -> 12x12x128
               + dense(6 * 6 * 128, 512)  # pool -> 6x6x128 = 4608 -> 512
               + dense(512, 10))
    assert code == 0 and totals(lines)[0] == by_hand == 2_458_186


def test_a_named_model_on_too_small_images_exits_2_naming_it_and_the_shape(capsys):
    assert summary.main(["--model", "fmnist-cnn", "--input-shape", "10,10,1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: model 'fmnist-cnn' does not fit images of shape (10, 10, 1) (too small: each side "
                          "must be at least 12): ")


NET = """
[[layers]]
type = "Conv2D"
filters = 4
kernel_size = 3

[[layers]]
type = "ReLU"

[[layers]]
type = "MaxPool2D"

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
units = 3
"""


def test_a_model_file_counts_by_hand(tmp_path, capsys):
    path = tmp_path / "net.toml"
    path.write_text(NET)
    code, lines = run(capsys, "--model", str(path), "--input-shape", "10,10,2")
    # 10x10x2 -> 8x8x4 -> pool 4x4x4 = 64 -> 3
    assert code == 0 and totals(lines)[0] == conv(3, 2, 4) + dense(4 * 4 * 4, 3) == 271
    assert [l.split()[:2] for l in lines[2:7]] == [["conv2d", "Conv2D"], ["relu", "ReLU"], ["maxpool2d", "Pool2D"],
                                                  ["flatten", "Flatten"], ["dense", "Dense"]]
    assert lines[-1].startswith("input (10, 10, 2);")
    assert run(capsys, "--model", str(path), "--input-shape", "10,10,2", "--classes", "3")[0] == 0


@pytest.mark.parametrize("argv,message", [
    (["--classes", "10"], "error: {path}: the last layer, layer 5 (Dense), gives 3 outputs, the data has 10 classes"),
    (["--input-shape", "3,3,1"], "error: {path}: layer 3 (MaxPool2D): a 2x2 window does not fit input (1, 1, 4) "
                                 "(for inputs of shape (3, 3, 1))"),
])
def test_a_model_file_that_does_not_fit_exits_2_with_one_line(argv, message, tmp_path, capsys):
    path = tmp_path / "net.toml"
    path.write_text(NET)
    assert summary.main(["--model", str(path), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [message.format(path=path)]


def test_the_example_model_files_print(capsys):
    for path in sorted((REPO / "models").glob("*.toml")):
        code, lines = run(capsys, "--model", str(path), "--input-shape", "32,32,3")
        assert code == 0 and totals(lines)[0] > 0, path
