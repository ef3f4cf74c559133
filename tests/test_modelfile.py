"""Networks from TOML files (``--model net.toml``): the same network as built in Python, one line per
mistake, training, resuming and reloading without the file."""
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddp_cnn.model import layers as L
from ddp_cnn.model import modelfile
from ddp_cnn.system.backend import get_backend
from ddp_cnn.inference import load_model_from_checkpoint
from ddp_cnn.model import Sequential, from_description
from ddp_cnn.cli.train import main as train_main
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]

# Every layer type, and every form an argument takes (an int or a pair, a padding name or numbers).
NET = """
[[layers]]
type = "Conv2D"
filters = 6
kernel_size = [3, 5]
padding = "same"
init = "glorot_uniform"

[[layers]]
type = "BatchNorm"
momentum = 0.2

[[layers]]
type = "LeakyReLU"
alpha = 0.1

[[layers]]
type = "MaxPool2D"
pool_size = 2

[[layers]]
type = "Conv2D"
filters = 8
kernel_size = 3
stride = 2
padding = [1, 0]
bias = false

[[layers]]
type = "PReLU"

[[layers]]
type = "AvgPool2D"
pool_size = [2, 1]
stride = 1
padding = [1, 0]

[[layers]]
type = "Pool2D"
pool_size = 2
mode = "min"

[[layers]]
type = "ELU"

[[layers]]
type = "Dropout"
rate = 0.3

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
units = 12
init = "he_uniform"

[[layers]]
type = "Tanh"

[[layers]]
type = "Dense"
units = 7
name = "logits"

[[layers]]
type = "Sigmoid"

[[layers]]
type = "Dense"
units = 10
init = "classifier"
"""


def by_hand():
    """NET, written with the Python API."""
    return [L.Conv2D(6, (3, 5), padding="same", init="glorot_uniform"), L.BatchNorm(momentum=0.2), L.LeakyReLU(0.1),
            L.MaxPool2D(2), L.Conv2D(8, 3, stride=2, padding=(1, 0), bias=False), L.PReLU(),
            L.AvgPool2D((2, 1), stride=1, padding=(1, 0)), L.Pool2D(2, mode="min"), L.ELU(), L.Dropout(0.3),
            L.Flatten(), L.Dense(12, init="he_uniform"), L.Tanh(), L.Dense(7, name="logits"), L.Sigmoid(),
            L.Dense(10, init="classifier")]


def write(tmp_path, text, name="net.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_model_file_is_the_network_built_in_python(tmp_path, dtype):
    backend = get_backend("cpu", dtype)
    from_file = modelfile.load(write(tmp_path, NET), (28, 28, 1), backend, seed=5, num_classes=10)
    python = Sequential(by_hand(), (28, 28, 1), backend, seed=5)
    assert from_file.name == "net" and from_file.param_names() == python.param_names()
    assert from_file.num_params == python.num_params > 0
    assert np.array_equal(from_file.params, python.params)  # the same numbers from the same seed
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(dtype)
    assert np.array_equal(from_file.forward(x, train=False), python.forward(x, train=False))
    assert np.array_equal(from_file.forward(x, train=True, step=3), python.forward(x, train=True, step=3))
    assert from_file.describe() == {**python.describe(), "name": "net"}
    assert not np.array_equal(modelfile.load(tmp_path / "net.toml", (28, 28, 1), backend, seed=6).params,
                              python.params)  # the seed matters, so the equality above says something


def test_its_description_rebuilds_it_without_the_file(tmp_path):
    model = modelfile.load(write(tmp_path, NET), (20, 24, 3), seed=2)
    (tmp_path / "net.toml").unlink()
    again = from_description(model.describe(), seed=2)
    assert again.describe() == model.describe() and again.input_shape == (20, 24, 3)
    assert np.array_equal(again.params, model.params)
    x = np.random.default_rng(1).standard_normal((3, 20, 24, 3)).astype(np.float32)
    assert np.array_equal(again.forward(x), model.forward(x))


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "models").glob("*.toml")))
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_the_example_model_files_build_for_gray_and_colour_images(example, shape):
    model = modelfile.load(REPO / "models" / example, shape, num_classes=10)
    assert model.output_shape == (10,) and model.input_shape == shape


def test_small_cnn_counts_by_hand():
    """models/small-cnn.toml on 28x28x1: conv 3x3x1x16 + 16, conv 3x3x16x32 + 32, dense 7*7*32 -> 10."""
    model = modelfile.load(REPO / "models" / "small-cnn.toml", (28, 28, 1))
    assert model.num_params == (9 * 16 + 16) + (9 * 16 * 32 + 32) + (7 * 7 * 32 * 10 + 10) == 20_490


# ---- mistakes: one line naming the file and the layer's position, exit 2 ---------------------------

DENSE = '[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\n'
TYPES = ", ".join(sorted(modelfile.TYPES))


def test_a_file_may_name_every_layer_of_the_python_api():
    api = set(L.__all__) - {"Layer", "ParamSpec", "SoftmaxCrossEntropy"}  # the loss is not a layer of the model
    assert api <= set(modelfile.TYPES) and {"Conv2D", "MaxPool2D", "Dense", "BatchNorm", "ReLU"} <= api


@pytest.mark.parametrize("text,message", [
    (DENSE + "unit = 10\n", "layer 2 (Dense): unknown argument 'unit'; expected one of units, bias, init, name"),
    (DENSE + "bias = true\n", "layer 2 (Dense): missing argument 'units'"),
    ('[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dens"\nunits = 10\n',
     f"layer 2: unknown type 'Dens'; expected one of {TYPES}"),
    ('[[layers]]\nunits = 10\n', f"layer 1: no type; expected one of {TYPES}"),
    ("layers = [1]\n", "layer 1: expected a table with a type, got 1"),
    ("layers = [{ type = [1] }]\n", f"layer 1: unknown type [1]; expected one of {TYPES}"),
    ("", "no layers; expected one [[layers]] table per layer, each with a type"),
    ('name = "x"\n' + DENSE + "units = 10\n", "unknown key 'name'; a model file holds only [[layers]] tables"),
    (DENSE + 'units = "10"\n', "layer 2 (Dense): units must be an integer or \"classes\" (one per class of the data), got '10'"),
    (DENSE + "units = 10.5\n", "layer 2 (Dense): units must be an integer or \"classes\" (one per class of the data), got 10.5"),
    (DENSE + "units = 10\nbias = 1\n", "layer 2 (Dense): bias must be true or false, got 1"),
    (DENSE + "units = 0\n", "layer 2 (Dense): units must be >= 1, got 0"),
    (DENSE + 'units = 10\ninit = "gaussian"\n', "layer 2 (Dense): unknown initialiser 'gaussian'; expected one "
     "of ['classifier', 'glorot_normal', 'glorot_uniform', 'he_normal', 'he_uniform', 'ones', 'xavier_normal', "
     "'xavier_uniform', 'zeros']"),
    ('[[layers]]\ntype = "Dropout"\nrate = 1.5\n' + DENSE + "units = 10\n",
     "layer 1 (Dropout): rate must be in [0, 1), got 1.5"),
    ('[[layers]]\ntype = "BatchNorm"\nmomentum = "fast"\n', "layer 1 (BatchNorm): momentum must be a number, "
     "got 'fast'"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = 4\nkernel_size = [3, 3, 3]\n',
     "layer 1 (Conv2D): kernel_size: expected an int or a pair of ints, got [3, 3, 3]"),
    ('[[layers]]\ntype = "MaxPool2D"\npool_size = "2"\n',
     "layer 1 (MaxPool2D): pool_size: expected an int or a pair of ints, got '2'"),
    # shapes that do not fit the data's 28x28x1 images
    ('[[layers]]\ntype = "Conv2D"\nfilters = 4\npadding = "full"\n',
     "layer 1 (Conv2D): padding: expected 'valid', 'same', an int >= 0 or a pair of them, got 'full' "
     "(for inputs of shape (28, 28, 1))"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = 4\n[[layers]]\ntype = "Dense"\nunits = 10\n',
     "layer 2 (Dense): expects flat (features,) input, got (26, 26, 4); put a Flatten before it "
     "(for inputs of shape (28, 28, 1))"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = 4\nkernel_size = 29\n',
     "layer 1 (Conv2D): a 29x29 kernel does not fit input (28, 28, 1) (for inputs of shape (28, 28, 1))"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = 10\n',
     "the last layer, layer 1 (Conv2D), gives outputs of shape (26, 26, 10); a classifier ends in one logit "
     "per class (Flatten or GlobalAvgPool2D, then Dense)"),
    (DENSE + "units = 7\n", "the last layer, layer 2 (Dense), gives 7 outputs, the data has 10 classes"),
])
def test_each_mistake_exits_2_with_one_line_naming_the_layer(text, message, data, tmp_path, capsys):
    path = write(tmp_path, text)
    code, err = train(["--model", path, "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 2 and err == [f"error: {path}: {message}"]
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_missing_or_broken_file_exits_2_with_one_line(data, tmp_path, capsys):
    code, err = train(["--model", tmp_path / "none.toml", "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 2 and err == [f"error: --model {tmp_path / 'none.toml'}: no such file"]
    path = write(tmp_path, '[[layers]\ntype = "Flatten"\n')
    code, err = train(["--model", path, "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --model {path}: not a readable TOML file (")


@pytest.mark.parametrize("flag", [["--width", "32"], ["--batchnorm"], ["--no-dropout"], ["--activation", "elu"],
                                  ["--dropout-rate", "0.1"]])
def test_model_flags_are_refused_for_a_model_file(flag, data, tmp_path, capsys):
    path = write(tmp_path, DENSE + "units = 10\n")
    code, err = train(["--model", path, *flag, "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 2 and err == [f"error: {flag[0]}: only for the named architectures; --model {path} brings "
                                 "its own layers"]


# ---- training, resuming, reloading ----------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("modelfile") / "data", 1)


def train(argv, data, capsys):
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--progress", "off",
              "--batch-size", 32]
    try:
        code = train_main([str(a) for a in common + argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def final_params(run_dir):
    with h5py.File(sorted((Path(run_dir) / "checkpoints").glob("ckpt-*.h5"))[-1], "r") as f:
        return f["params"][...]


def test_a_model_file_trains_and_resumes_without_the_file_exactly(data, tmp_path, capsys):
    """Stop after 2 steps, delete the file, resume with neither it nor --model: the same parameters after
    5 steps as a run that never stopped."""
    path = write(tmp_path, NET)
    assert train(["--model", path, "--max-steps", 5, "--run-dir", tmp_path / "straight"], data, capsys)[0] == 0
    assert train(["--model", path, "--max-steps", 2, "--run-dir", tmp_path / "resumed"], data, capsys)[0] == 0
    path.unlink()
    code, err = train(["--resume", "latest", "--max-steps", 5, "--run-dir", tmp_path / "resumed"], data, capsys)
    assert code == 0, err
    assert np.array_equal(final_params(tmp_path / "resumed"), final_params(tmp_path / "straight"))
    with h5py.File(tmp_path / "resumed" / "checkpoints" / "ckpt-00000005.h5", "r") as f:
        assert '"name": "net"' in f.attrs["model"]


def test_a_model_files_checkpoint_evaluates_predicts_and_exports_without_it(data, tmp_path, capsys):
    path = write(tmp_path, NET)
    assert train(["--model", path, "--max-steps", 2, "--run-dir", tmp_path / "run"], data, capsys)[0] == 0
    built = modelfile.load(path, (28, 28, 1), seed=0)
    path.unlink()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("ckpt-*.h5")
    model, meta = load_model_from_checkpoint(ckpt)
    assert model.describe() == built.describe() and np.array_equal(model.params, final_params(tmp_path / "run"))
    from ddp_cnn.cli.evaluate import main as evaluate_main
    from ddp_cnn.cli.export import main as export_main
    assert evaluate_main(["--checkpoint", str(ckpt), "--data", str(data)]) == 0
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "net.npz")]) == 0
    np.save(tmp_path / "batch.npy", np.zeros((2, 28, 28), np.uint8))
    from ddp_cnn.cli.predict import main as predict_main
    assert predict_main(["--checkpoint", str(tmp_path / "net.npz"), str(tmp_path / "batch.npy")]) == 0


def test_a_resume_with_another_model_file_is_refused(data, tmp_path, capsys):
    path = write(tmp_path, DENSE + "units = 10\n")
    assert train(["--model", path, "--max-steps", 1, "--run-dir", tmp_path / "run"], data, capsys)[0] == 0
    other = write(tmp_path, DENSE + "units = 10\nbias = false\n", "other.toml")
    code, err = train(["--model", other, "--resume", "latest", "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 2 and len(err) == 1 and "holds a net model that differs from --model other" in err[0]
    code, err = train(["--model", path, "--resume", "latest", "--max-steps", 2, "--run-dir", tmp_path / "run"],
                      data, capsys)
    assert code == 0, err  # the same file resumes


def test_a_resume_without_model_takes_a_named_models_checkpoint(data, tmp_path, capsys):
    run = ["--run-dir", tmp_path / "run"]
    assert train(["--model", "mlp", "--no-dropout", "--max-steps", 1] + run, data, capsys)[0] == 0
    code, err = train(["--resume", "latest", "--max-steps", 2] + run, data, capsys)
    assert code == 0, err
    model, _ = load_model_from_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.h5")
    assert model.name == "mlp" and model.describe()["arch_kwargs"] == {"dropout": False}
    code, err = train(["--resume", "latest", "--no-dropout", "--max-steps", 3] + run, data, capsys)
    assert code == 2 and err == ["error: --no-dropout: only for the named architectures; --resume without "
                                 "--model (the checkpoint's model) brings its own layers"]


def test_without_model_or_resume_the_model_is_lenet(data, tmp_path, capsys):
    from ddp_cnn.cli.train import parse_args
    assert parse_args([]).model == "lenet" and parse_args(["--resume", "latest"]).model is None
    code, err = train(["--resume", "auto", "--max-steps", 1, "--run-dir", tmp_path / "run"], data, capsys)
    assert code == 0, err  # no checkpoint yet: a new run of the default model
    assert load_model_from_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000001.h5")[0].name == "lenet"


def test_a_named_model_trains_on_other_image_sizes_and_refuses_too_small_ones(tmp_path_factory, tmp_path, capsys):
    """lenet adapts its flatten size to 20x20 images; 8x8 ones are refused with one line."""
    root = tmp_path_factory.mktemp("sizes")
    for size in (20, 8):
        make_synthetic_shards(root / f"data{size}", 1, size=size)
    code, err = train(["--model", "lenet", "--max-steps", 2, "--run-dir", tmp_path / "a"], root / "data20", capsys)
    assert code == 0, err
    assert load_model_from_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-00000002.h5")[0].input_shape == (20, 20, 1)
    code, err = train(["--model", "lenet", "--run-dir", tmp_path / "b"], root / "data8", capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: model 'lenet' does not fit images of shape (8, 8, 1) (too small: each side "
                             "must be at least 12): ")


def test_units_classes_gives_one_logit_per_class_of_the_data(tmp_path):
    path = write(tmp_path, """
        [[layers]]
        type = "Flatten"
        [[layers]]
        type = "Dense"
        units = "classes"
        """)
    assert modelfile.load(path, (4, 4, 3), num_classes=3).output_shape == (3,)
    assert modelfile.load(path, (4, 4, 3)).output_shape == (10,)  # no data: summary's default
    assert modelfile.load(path, (4, 4, 3), num_classes=3).describe()["layers"][1]["units"] == 3
    bad = write(tmp_path, '[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\nunits = "class"\n', "bad.toml")
    with pytest.raises(ValueError, match=r"bad.toml: layer 2 \(Dense\): units must be an integer or "
                                         r"\"classes\" \(one per class of the data\), got 'class'"):
        modelfile.load(bad, (4, 4, 3), num_classes=3)
