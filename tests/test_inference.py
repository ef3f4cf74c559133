"""Using a trained model: predict on the user's files, export to .npz and load it back with NumPy alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_tools import datasets
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.cli import export, predict
from ddp_cnn import inference
from ddp_cnn.model import layers as L
from ddp_cnn.system.backend import get_backend
from ddp_cnn.data.pixels import normalize as loader_normalize
from ddp_cnn.model import Sequential
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
FMNIST_TEST = Path(datasets.DEBIAN_FASHION_MNIST) / "t10k-images-idx3-ubyte.gz"
FMNIST_NAMES = list(datasets.FASHION_MNIST.class_names)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ---- fixtures: a checkpoint written by the trainer, and one with BatchNorm -----------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A lenet checkpoint from 30 steps of ddp_cnn.train on the synthetic set (about 1 s)."""
    from ddp_cnn.cli.train import main as train_main
    root = tmp_path_factory.mktemp("trained")
    data = make_synthetic_shards(root / "data", 1)
    code = train_main(["--data", str(data), "--model", "lenet", "--comm", "single", "--device", "cpu",
                       "--eval-every", "0", "--max-steps", "30", "--batch-size", "32", "--progress", "off",
                       "--run-dir", str(root / "run")])
    assert code == 0
    return ckpt.list_checkpoints(root / "run" / "checkpoints")[-1]


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A hand-built model with BatchNorm (non-trivial running statistics) and Fashion-MNIST class names,
    saved with the meta keys train.py writes."""
    model = Sequential([L.Conv2D(4, 3), L.BatchNorm(), L.LeakyReLU(0.1), L.MaxPool2D(2), L.Flatten(),
                        L.Dropout(0.5), L.Dense(16), L.BatchNorm(), L.PReLU(), L.Dense(10)], (28, 28, 1), seed=3)
    rng = np.random.default_rng(3)
    model.params[...] = rng.standard_normal(model.num_params).astype(np.float32) * 0.3
    for buf in model.named_buffers().values():
        buf[...] = rng.uniform(0.5, 1.5, buf.shape)
    meta = {"model": model.describe(), "class_names": FMNIST_NAMES, "mean": 0.2860, "std": 0.3530,
            "epoch": 1, "step_in_epoch": 0, "global_step": 7, "seed": 3, "world_size": 1}
    buffers = {k: np.asarray(v) for k, v in model.named_buffers().items()}
    return ckpt.save(tmp_path_factory.mktemp("bn"), 7, np.asarray(model.params), {}, buffers, meta)


@pytest.fixture(scope="module")
def fmnist_images():
    if not FMNIST_TEST.is_file():
        pytest.skip(f"{FMNIST_TEST} missing: apt-get install dataset-fashion-mnist")
    from data_tools.idx import read_idx
    return read_idx(FMNIST_TEST).array[:8]


def run_predict(capsys, *args):
    """(exit code, parsed JSON results, stderr lines) of predict.main in this process."""
    code = predict.main([*map(str, args), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err.splitlines()


def reference_probs(checkpoint, pixels):
    """What the model gives for pixels normalised as the data loader does, bypassing predict's file reading."""
    model, meta = inference.load_model_from_checkpoint(checkpoint)
    x = inference.normalize(pixels, meta["mean"], meta["std"], model.backend.dtype)
    return inference.probabilities(model.predict(x))


def band_images(n, seed=0):
    """Light bands on a dark background, like the synthetic training set."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(rng.integers(0, 10, n)):
        images[i, 2 * c + 3:2 * c + 6, 4:24] = 220
    return images


# ---- predict: what goes in is what the model sees during evaluation -----------------------

def test_png_of_a_test_image_gets_the_models_output_on_the_normalised_array(trained, fmnist_images, tmp_path,
                                                                              capsys):
    Image = pytest.importorskip("PIL.Image")
    files = []
    for i, img in enumerate(fmnist_images):
        files.append(tmp_path / f"test{i}.png")
        Image.fromarray(img).save(files[-1])
    code, results, err = run_predict(capsys, "--checkpoint", trained, *files)
    assert code == 0 and err == []
    expected = reference_probs(trained, fmnist_images)
    assert [r["file"] for r in results] == list(map(str, files))
    for r, p in zip(results, expected):
        assert not r["inverted"]  # black border: auto leaves Fashion-MNIST alone
        assert r["top"][0]["index"] == int(np.argmax(p))
        # float32: predict batches the files its own way, so the reference agrees to float32's rounding only
        assert [t["probability"] for t in r["top"]] == pytest.approx(sorted(p, reverse=True)[:3], rel=1e-4, abs=1e-6)


def test_npy_single_batch_channel_and_float_inputs(trained, tmp_path, capsys):
    images = band_images(3)
    np.save(tmp_path / "one.npy", images[0])
    np.save(tmp_path / "batch.npy", images)
    np.save(tmp_path / "batch1.npy", images[:1])
    np.save(tmp_path / "channel.npy", images[:2, :, :, None])
    np.save(tmp_path / "float.npy", images.astype(np.float32) / 255)
    names = ["one", "batch", "batch1", "channel", "float"]
    code, results, err = run_predict(capsys, "--checkpoint", trained, *(tmp_path / f"{n}.npy" for n in names))
    assert code == 0 and err == []
    assert [(Path(r["file"]).stem, r["item"]) for r in results] == [
        ("one", None), ("batch", 0), ("batch", 1), ("batch", 2), ("batch1", 0), ("channel", 0), ("channel", 1),
        ("float", 0), ("float", 1), ("float", 2)]
    expected = reference_probs(trained, images)
    rows = [0, 0, 1, 2, 0, 0, 1, 0, 1, 2]
    for r, row in zip(results, rows):
        assert [t["index"] for t in r["top"]] == list(np.argsort(-expected[row], kind="stable")[:3])
        # float32 results depend on how rows are batched (a GEMM over 1 row vs 3 sums in another order), and the
        # float rows also on the rounding of /255 before vs after the cast: float32's tolerance for both.
        assert [t["probability"] for t in r["top"]] == pytest.approx(sorted(expected[row])[::-1][:3], rel=1e-4,
                                                                     abs=1e-6)


def test_top3_is_sorted_distinct_and_sums_to_at_most_one(trained, tmp_path, capsys):
    np.save(tmp_path / "b.npy", band_images(20, seed=1))
    code, results, _ = run_predict(capsys, "--checkpoint", trained, tmp_path / "b.npy")
    assert code == 0 and len(results) == 20
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and len({t["index"] for t in r["top"]}) == 3
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-12
    code, results, _ = run_predict(capsys, "--checkpoint", trained, "--top", "50", tmp_path / "b.npy")
    assert len(results[0]["top"]) == 10 and sum(t["probability"] for t in results[0]["top"]) == pytest.approx(1)


def test_text_output_uses_the_class_names_of_the_checkpoint(bn_checkpoint, tmp_path, capsys):
    np.save(tmp_path / "x.npy", band_images(1)[0])
    assert predict.main(["--checkpoint", str(bn_checkpoint), str(tmp_path / "x.npy")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'x.npy'}: ") and line.count("%") == 3
    assert sum(name in line for name in FMNIST_NAMES) == 3


# ---- predict: photos (dark object on a light background), any size -------------------------

def object_28():
    """A light coat-like blob on black, the Fashion-MNIST look."""
    img = np.zeros((28, 28), np.uint8)
    img[5:24, 8:20] = 200
    img[5:12, 4:24] = 230
    return img


def test_dark_on_light_photo_is_inverted_and_scaled_back_to_28(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    obj = object_28()
    photo = Image.fromarray(255 - obj).resize((84, 84), Image.Resampling.NEAREST).convert("RGB")
    photo.save(tmp_path / "photo.jpg", quality=95)
    pixels, inverted, batched = predict.read_input(tmp_path / "photo.jpg", (28, 28, 1), "auto")
    assert inverted == [True] and not batched and pixels.shape == (1, 28, 28, 1) and pixels.dtype == np.uint8
    assert np.abs(pixels[0, ..., 0].astype(int) - obj).mean() < 6  # JPEG and resampling blur the edges only
    _, inverted, _ = predict.read_input(tmp_path / "photo.jpg", (28, 28, 1), "no")
    assert inverted == [False]
    _, inverted, _ = predict.read_input(tmp_path / "photo.jpg", (28, 28, 1), "auto", auto=False)
    assert inverted == [False]  # a model of light images (or RGB): auto never inverts


def test_transparent_background_counts_as_paper(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgba = np.zeros((28, 28, 4), np.uint8)  # fully transparent...
    rgba[5:24, 8:20] = (40, 40, 40, 255)    # ...around an opaque dark object
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    pixels, inverted, _ = predict.read_input(tmp_path / "cutout.png", (28, 28, 1), "auto")
    assert inverted == [True] and pixels[0, 0, 0, 0] == 0 and pixels[0, 10, 10, 0] == 255 - 40


def test_fit_keeps_the_aspect_ratio_and_pads_with_black():
    from data_tools.images import fit
    tall = np.full((56, 28, 1), 255, np.uint8)  # 2:1 -> 28 x 14, centred
    out = fit(tall, (28, 28))
    assert out.shape == (28, 28, 1)
    assert (out[:, :7] == 0).all() and (out[:, 21:] == 0).all() and (out[:, 7:21] >= 250).all()
    small = np.full((7, 14, 3), (255, 128, 0), np.uint8)  # upscaled x2 -> 14 x 28, colour kept
    out = fit(small, (28, 28))
    assert out.shape == (28, 28, 3) and (out[:7] == 0).all() and (out[21:] == 0).all()
    assert (np.abs(out[7:21].astype(int) - (255, 128, 0)) <= 2).all()


def test_invert_yes_and_auto_on_arrays(tmp_path):
    img = object_28()
    np.save(tmp_path / "a.npy", np.stack([img, 255 - img]))
    pixels, inverted, _ = predict.read_input(tmp_path / "a.npy", (28, 28, 1), "auto")
    assert inverted == [False, True] and (pixels[..., 0] == img).all()
    pixels, inverted, _ = predict.read_input(tmp_path / "a.npy", (28, 28, 1), "yes")
    assert inverted == [True, True] and (pixels[0, ..., 0] == 255 - img).all()


# ---- predict: every bad input is one line naming the file, exit 2 --------------------------

def _truncated_png(path):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(object_28()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _text_image(path):
    pytest.importorskip("PIL")  # without Pillow the line says that Pillow is needed instead
    path.write_text("hello")


def _object_npy(path):
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


BAD_INPUTS = {
    "missing.png": (None, "no such file"),
    "folder": (lambda p: p.mkdir(), "is a folder"),
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "text.png": (_text_image, "not an image Pillow can read"),
    "truncated.png": (_truncated_png, "corrupt or truncated image"),
    "text.npy": (lambda p: p.write_text("hello"), "not a .npy array"),
    "truncated.npy": (lambda p: p.write_bytes(p.with_name("ok.npy").read_bytes()[:200]), "not a readable .npy"),
    "shape.npy": (lambda p: np.save(p, np.zeros((27, 28), np.uint8)), "expected (28, 28)"),
    "batch-shape.npy": (lambda p: np.save(p, np.zeros((2, 28, 27), np.uint8)), "(N, 28, 28)"),
    "empty-batch.npy": (lambda p: np.save(p, np.zeros((0, 28, 28), np.uint8)), "N >= 1"),
    "int64.npy": (lambda p: np.save(p, np.zeros((28, 28), np.int64)), "expected uint8 pixels (0..255) or floats"),
    "bool.npy": (lambda p: np.save(p, np.zeros((28, 28), bool)), "expected uint8 pixels"),
    "range.npy": (lambda p: np.save(p, np.full((28, 28), 255.0)), "expected floats in [0, 1]"),
    "nan.npy": (lambda p: np.save(p, np.full((28, 28), np.nan)), "NaN"),
    "object.npy": (_object_npy, "pickled Python objects"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_it(name, trained, tmp_path, capsys):
    make, expected = BAD_INPUTS[name]
    np.save(tmp_path / "ok.npy", band_images(1)[0])
    path = tmp_path / name
    if make is not None:
        make(path)
    code, results, err = run_predict(capsys, "--checkpoint", trained, path)
    assert code == 2 and results == []
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and expected in err[0], err


def test_a_bad_file_does_not_stop_the_good_ones(trained, tmp_path, capsys):
    np.save(tmp_path / "ok.npy", band_images(1)[0])
    code, results, err = run_predict(capsys, "--checkpoint", trained, tmp_path / "ok.npy", tmp_path / "nope.png")
    assert code == 2 and [r["file"] for r in results] == [str(tmp_path / "ok.npy")]
    assert err == [f"error: {tmp_path / 'nope.png'}: no such file"]


def test_missing_pillow_is_one_clear_line_and_npy_still_works(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import ...` now raises ImportError
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    np.save(tmp_path / "ok.npy", band_images(1)[0])
    code, results, err = run_predict(capsys, "--checkpoint", trained, tmp_path / "a.png", tmp_path / "ok.npy")
    assert code == 2 and len(results) == 1
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'a.png'}: reading images needs Pillow")
    assert "ddp_cnn[images]" in err[0]


def _bad_checkpoints(tmp_path, trained):
    real = trained.read_bytes()
    (tmp_path / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    (tmp_path / "truncated.h5").write_bytes(real[:len(real) // 2])
    (tmp_path / "text.h5").write_text("not a checkpoint")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "folder").mkdir()
    model, _ = inference.load_model_from_checkpoint(trained)
    bare = ckpt.save(tmp_path / "bare", 1, np.asarray(model.params), {}, {}, {"model": model.describe()})
    return {"missing.h5": "no such file", "garbage.h5": "unreadable", "truncated.h5": "unreadable",
            "text.h5": "neither a checkpoint", "array.npy": "neither a checkpoint",
            "folder": "no checkpoint (ckpt-*.h5) in",  # a folder is taken as a run folder
            str(bare.relative_to(tmp_path)): "mean"}


def test_bad_checkpoint_exits_2_with_one_line_naming_it(trained, tmp_path, capsys):
    np.save(tmp_path / "ok.npy", band_images(1)[0])
    for name, expected in _bad_checkpoints(tmp_path, trained).items():
        code = predict.main(["--checkpoint", str(tmp_path / name), str(tmp_path / "ok.npy")])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", name
        assert len(err.splitlines()) == 1 and str(tmp_path / name) in err and expected in err, err


# ---- export: a portable .npz, loaded back with NumPy alone -----------------------------------

@pytest.mark.parametrize("which", ["trained", "bn_checkpoint"])
def test_export_round_trip_gives_bitwise_equal_logits(which, request, tmp_path, capsys):
    source = request.getfixturevalue(which)
    assert export.main(["--checkpoint", str(source), "--out", str(tmp_path / "m.npz")]) == 0
    assert f"wrote {tmp_path / 'm.npz'}" in capsys.readouterr().out
    original, meta = inference.load_model_from_checkpoint(source)
    loaded, npz_meta = inference.load(tmp_path / "m.npz")
    x = inference.normalize(np.concatenate([band_images(5), 255 - band_images(3)]), meta["mean"], meta["std"],
                            np.float32)
    assert np.array_equal(original.predict(x), loaded.predict(x))
    assert np.array_equal(original.params, loaded.params) and loaded.params.dtype == original.params.dtype
    for name, buf in original.named_buffers().items():
        assert np.array_equal(buf, loaded.named_buffers()[name])
    assert loaded.describe() == original.describe()
    assert npz_meta["class_names"] == meta["class_names"]
    assert (npz_meta["mean"], npz_meta["std"]) == (np.ravel(meta["mean"]).tolist(), np.ravel(meta["std"]).tolist())
    assert isinstance(npz_meta["mean"], list)  # one per channel, also from a checkpoint that held a number
    assert npz_meta["source"]["global_step"] == meta["global_step"]


def test_export_refuses_to_overwrite_without_force(trained, bn_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.npz"
    assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert export.main(["--checkpoint", str(bn_checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out}: already exists; use --force to replace it"]
    assert out.read_bytes() == before
    assert export.main(["--checkpoint", str(bn_checkpoint), "--out", str(out), "--force"]) == 0
    assert inference.load(out)[1]["class_names"] == FMNIST_NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary left behind


def test_export_bad_input_or_output_exits_2_and_writes_nothing(trained, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = _bad_checkpoints(tmp_path / "in", trained)
    for name, expected in bad.items():
        out = tmp_path / "out.npz"
        assert export.main(["--checkpoint", str(tmp_path / "in" / name), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and str(tmp_path / "in" / name) in err[0] and expected in err[0], err
        assert not out.exists()
    for out, expected in ((tmp_path / "in", "is a folder"), (tmp_path / "no" / "m.npz", "does not exist")):
        assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_corrupt_npz_is_refused_by_name(trained, tmp_path):
    export.export(trained, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        arrays = dict(z)
    arrays["params"] = arrays["params"].copy()
    arrays["params"][0] += 1
    np.savez(tmp_path / "tampered.npz", **arrays)
    np.savez(tmp_path / "foreign.npz", params=np.zeros(3), meta=np.array("{}"))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "m.npz").read_bytes()[:1000])
    for name, expected in (("tampered.npz", "checksum mismatch"), ("foreign.npz", "not a model exported"),
                           ("cut.npz", "not a model exported")):
        with pytest.raises(ckpt.CheckpointError, match=expected) as info:
            inference.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


# ---- one way to rebuild a saved model (.h5 and .npz), checked against values computed apart ----------

# hand_model's weights and running statistics, written out; hand_logits applies them in plain NumPy.
HAND = {"dense.W": np.arange(12.0).reshape(4, 3) / 10 - 0.5, "dense.b": np.array([0.1, -0.2, 0.3]),
        "batchnorm.gamma": np.array([1.5, 0.5, -1.0]), "batchnorm.beta": np.array([0.0, 1.0, -2.0]),
        "batchnorm.running_mean": np.array([0.2, -0.1, 0.4]), "batchnorm.running_var": np.array([4.0, 0.25, 1.0])}
SAVED_META = {"class_names": ["a", "b", "c"], "mean": 0.25, "std": 0.5, "global_step": 1}


def hand_model():
    """Flatten -> Dense(3) -> BatchNorm on (2, 2, 1) inputs in float64, every number set from HAND."""
    model = Sequential([L.Flatten(), L.Dense(3), L.BatchNorm()], (2, 2, 1), get_backend("cpu", "float64"))
    for name, view in {**model.named_params(), **model.named_buffers()}.items():
        view[...] = HAND[name]
    return model


def hand_logits(x):
    """Eval-mode logits of hand_model: x W + b, then (h - running mean) / sqrt(running var + 1e-5) * gamma + beta."""
    h = x.reshape(len(x), 4) @ HAND["dense.W"] + HAND["dense.b"]
    return ((h - HAND["batchnorm.running_mean"]) / np.sqrt(HAND["batchnorm.running_var"] + 1e-5)
            * HAND["batchnorm.gamma"] + HAND["batchnorm.beta"])


def saved_both_ways(folder, arrays, meta):
    """(checkpoint .h5, exported-format .npz) holding the same flat params, buffers and meta."""
    buffers = {k[len("buffers/"):]: v for k, v in arrays.items() if k.startswith("buffers/")}
    h5 = ckpt.save(folder / "checkpoints", 1, arrays["params"], {}, buffers, meta)
    npz_meta = {**meta, "format": inference.NPZ_FORMAT, "format_version": inference.NPZ_VERSION,
                "params_sha256": ckpt.params_digest(arrays["params"])}
    np.savez(folder / "m.npz", **arrays, meta=np.array(json.dumps(npz_meta)))
    return h5, folder / "m.npz"


def state_of(model):
    return {"params": np.asarray(model.params).copy(),
            **{f"buffers/{k}": np.asarray(v).copy() for k, v in model.named_buffers().items()}}


def test_a_saved_model_is_rebuilt_to_the_hand_computed_logits_from_h5_and_npz(tmp_path):
    model = hand_model()
    x = np.random.default_rng(0).standard_normal((6, 2, 2, 1))
    np.testing.assert_allclose(model.forward(x), hand_logits(x), rtol=1e-12, atol=1e-12)  # hand_logits is right
    h5, npz = saved_both_ways(tmp_path, state_of(model), {"model": model.describe(), **SAVED_META})
    exported = export.export(h5, tmp_path / "exported.npz")
    for loaded, _ in (inference.load_model(h5), inference.load_model_from_checkpoint(h5),
                      inference.load_model(npz), inference.load(exported)):
        assert loaded.params.dtype == np.float64
        np.testing.assert_allclose(loaded.forward(x), hand_logits(x), rtol=1e-12, atol=1e-12)


def test_a_conv_model_with_batchnorm_is_rebuilt_to_its_own_logits_from_h5_and_npz(tmp_path):
    model = Sequential([L.Conv2D(4, 3), L.BatchNorm(), L.LeakyReLU(0.1), L.MaxPool2D(2), L.Flatten(),
                        L.Dropout(0.5), L.Dense(16), L.BatchNorm(), L.PReLU(), L.Dense(10)], (28, 28, 1),
                       get_backend("cpu", "float64"), seed=3)
    rng = np.random.default_rng(3)
    model.params[...] = rng.standard_normal(model.num_params) * 0.3
    for buf in model.named_buffers().values():
        buf[...] = rng.uniform(0.5, 1.5, buf.shape)
    x = rng.standard_normal((5, 28, 28, 1))
    want = np.array(model.forward(x))
    h5, npz = saved_both_ways(tmp_path, state_of(model), {"model": model.describe(), **SAVED_META})
    for path in (h5, npz, export.export(h5, tmp_path / "exported.npz")):
        loaded, _ = inference.load_model(path)
        np.testing.assert_allclose(loaded.forward(x), want, rtol=1e-12, atol=1e-12)


def _shorter(key):
    return lambda arrays: arrays.update({key: arrays[key][:-1]})


@pytest.mark.parametrize("damage, meta_change, expected", [
    (_shorter("params"), {}, "20 parameters, but its model description has 21"),
    (_shorter("buffers/batchnorm.running_var"), {}, "buffer 'batchnorm.running_var' is missing or of the wrong shape"),
    (lambda a: a.pop("buffers/batchnorm.running_mean"), {}, "buffer 'batchnorm.running_mean' is missing"),
    (None, {"model": None}, "holds no model description"),
    (None, {"model": {"input_shape": [2, 2, 1], "layers": [{"type": "Bogus"}]}}, "bad model description"),
], ids=["parameter count", "buffer shape", "missing buffer", "no description", "bad description"])
def test_a_saved_state_that_does_not_fit_its_description_is_an_error_naming_the_file(damage, meta_change, expected,
                                                                                     tmp_path):
    model = hand_model()
    assert model.num_params == 21  # W 4x3 + b 3 + gamma 3 + beta 3
    arrays = state_of(model)
    if damage:
        damage(arrays)
    h5, npz = saved_both_ways(tmp_path, arrays, {"model": model.describe(), **SAVED_META, **meta_change})
    for path, load in ((h5, inference.load_model), (h5, inference.load_model_from_checkpoint),
                       (npz, inference.load_model)):
        with pytest.raises(ckpt.CheckpointError, match=expected) as info:
            load(path)
        assert str(path) in str(info.value)


# ---- no MPI (and, for .npz, no h5py) in a fresh interpreter ------------------------------------

def run_python(code, *args):
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code, *args],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)


def test_predict_does_not_import_mpi4py(trained, tmp_path):
    np.save(tmp_path / "x.npy", band_images(2))
    script = textwrap.dedent("""
        import sys
        from ddp_cnn.cli import predict
        code = predict.main(sys.argv[1:])
        assert "mpi4py" not in sys.modules, "predict imported mpi4py"
        print("exit", code)
    """)
    proc = run_python(script, "--checkpoint", str(trained), str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit 0" and proc.stdout.count("%") == 6


def test_npz_model_needs_neither_h5py_nor_mpi4py(trained, tmp_path):
    export.export(trained, tmp_path / "m.npz")
    np.save(tmp_path / "x.npy", band_images(1)[0])
    script = textwrap.dedent("""
        import sys
        sys.modules["h5py"] = None    # importing either now fails
        sys.modules["mpi4py"] = None
        from ddp_cnn import inference
        from ddp_cnn.cli import predict
        model, meta = inference.load(sys.argv[1])
        print("exit", predict.main(["--checkpoint", sys.argv[1], sys.argv[2]]))
    """)
    proc = run_python(script, str(tmp_path / "m.npz"), str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit 0"


def test_modules_run_with_python_dash_m(trained, tmp_path):
    np.save(tmp_path / "x.npy", band_images(1)[0])
    proc = run_python(None, "-m", "ddp_cnn.predict", "--checkpoint", str(trained), str(tmp_path / "x.npy"))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{tmp_path / 'x.npy'}: "), proc.stderr
    proc = run_python(None, "-m", "ddp_cnn.export", "--checkpoint", str(trained), "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {tmp_path}: is a folder; expected the path of the .npz file to write"]


# ---- the guide's examples (keep in sync with docs/using-a-model.md) ----

def test_readme_npz_snippet(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export.export(trained, "fmnist.npz")
    images = band_images(4)
    # --- begin the guide's snippet
    from ddp_cnn.inference import load, normalize, probabilities
    model, meta = load("fmnist.npz")  # meta: "class_names", "mean", "std", "model" (the description)
    x = normalize(images, meta["mean"], meta["std"], model.backend.dtype)  # (N, 28, 28) uint8 -> (N, 28, 28, 1)
    probs = probabilities(model.predict(x))  # (N, classes), float64; names: meta["class_names"]
    # --- end the guide's snippet
    assert normalize is loader_normalize  # the data loader's own, tested in test_data_reader
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1)
    assert np.array_equal(probs, reference_probs(trained, images))


def test_a_run_with_ema_is_loaded_and_exported_with_its_averaged_weights(tmp_path):
    from ddp_cnn.cli.train import main as train_main
    data = make_synthetic_shards(tmp_path / "data", 1)
    code = train_main(["--data", str(data), "--model", "lenet", "--comm", "single", "--device", "cpu",
                       "--eval-every", "1", "--max-steps", "12", "--batch-size", "32", "--progress", "off",
                       "--ema", "0.9", "--run-dir", str(tmp_path / "run")])
    assert code == 0
    path = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state = ckpt.load(path)
    assert not np.array_equal(state["optim"]["ema"], state["params"])
    model, _ = inference.load_model_from_checkpoint(path)
    assert np.array_equal(model.params, state["optim"]["ema"])
    assert export.main(["--checkpoint", str(path), "--out", str(tmp_path / "m.npz")]) == 0
    exported, _ = inference.load(tmp_path / "m.npz")
    assert np.array_equal(exported.params, state["optim"]["ema"])
    # The average is checksummed like the raw weights.
    import h5py
    with h5py.File(path, "r+") as f:
        f["optim/ema"][0] += 1.0
    with pytest.raises(ckpt.CheckpointError, match="optimizer state checksum mismatch"):
        inference.load_model_from_checkpoint(path)


def test_resuming_an_ema_run_without_ema_says_the_average_is_dropped(tmp_path, capsys):
    from ddp_cnn.cli.train import main as train_main
    data = make_synthetic_shards(tmp_path / "data", 1)
    common = ["--data", str(data), "--model", "lenet", "--comm", "single", "--device", "cpu", "--eval-every", "0",
              "--batch-size", "32", "--progress", "off", "--run-dir", str(tmp_path / "run")]
    assert train_main(common + ["--max-steps", "3", "--ema", "0.9"]) == 0
    capsys.readouterr()
    assert train_main(common + ["--max-steps", "5", "--resume", "latest"]) == 0
    assert "holds a moving average of the weights (--ema), which this run without --ema drops" in capsys.readouterr().out


def test_predict_and_export_take_a_run_folder_for_its_newest_checkpoint(trained, tmp_path, capsys):
    run_dir = trained.parent.parent
    np.save(tmp_path / "ok.npy", band_images(1)[0])
    assert predict.main(["--checkpoint", str(trained), str(tmp_path / "ok.npy"), "--json"]) == 0
    by_file = capsys.readouterr().out
    for folder in (run_dir, run_dir / "checkpoints"):
        assert predict.main(["--checkpoint", str(folder), str(tmp_path / "ok.npy"), "--json"]) == 0
        assert capsys.readouterr().out == by_file
    assert export.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "m.npz")]) == 0
    exported, _ = inference.load(tmp_path / "m.npz")
    assert np.array_equal(exported.params, inference.load_model(trained)[0].params)
