"""What survives what: checkpoint retention around corrupt files, models too large for memory, a full
disk while training, and the small promises a new user leans on (issue 32, items 2-5).

Runs of the CLI are real subprocesses in one process (no launcher needed for these paths), each bounded
by a timeout sized to catch a hang on a loaded machine."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.dist.faults import EXIT_DISK_FULL
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("survival") / "d1", 1)


def train(data_dir, run_dir, *flags, timeout=300, env=None):
    cmd = [sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
           "--device", "cpu", "--progress", "off", "--local-batch-size", "8", *map(str, flags)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])  # as by a full disk


def flip_params(path: Path) -> None:
    """Flip bytes inside the stored parameters (the file still opens; its checksum disagrees)."""
    import h5py
    with h5py.File(path, "r+") as f:
        f["params"][:4] = -f["params"][:4] - 1.0


# ---- item 2: --keep counts only checkpoints that verify -------------------------------------

def small_save(folder, step, keep, warn):
    params = np.arange(10, dtype=np.float32) + step
    return ckpt.save(folder, step, params, {"m": params * 0}, {}, {"global_step": step}, keep=keep, warn=warn)


def test_keep_counts_only_checkpoints_that_verify_and_moves_corrupt_ones_aside(tmp_path):
    for step in (1, 2, 3, 4, 5):
        small_save(tmp_path, step, keep=0, warn=print)
    truncate(tmp_path / "ckpt-00000005.h5")
    flip_params(tmp_path / "ckpt-00000004.h5")
    said = []
    small_save(tmp_path, 6, keep=3, warn=said.append)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-00000002.h5", "ckpt-00000003.h5", "ckpt-00000006.h5"]  # three that verify
    for step in (4, 5):
        name = f"ckpt-0000000{step}.h5"
        assert (tmp_path / (name + ckpt.CORRUPT_SUFFIX)).is_file()  # moved aside, not deleted
        assert any(str(tmp_path / name) in line and "moved aside" in line for line in said), said
    assert len(said) == 2
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.load(path)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_resume_past_two_corrupt_checkpoints_keeps_the_one_it_resumed_from(data, tmp_path, ranks):
    common = ["--model", "lenet", "--epochs", 2, "--checkpoint-every", 4, "--eval-every", 0]
    if ranks > 1:
        data = make_synthetic_shards(tmp_path / f"d{ranks}", ranks)
    launch = [str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks)] if ranks > 1 else []
    run_dir = tmp_path / "run"

    def run(*flags):  # under the launcher for 2 ranks
        cmd = [*launch, sys.executable, "-m", "ddp_cnn.train", "--data", str(data), "--run-dir", str(run_dir),
               "--device", "cpu", "--progress", "off", "--local-batch-size", "8", *map(str, common), *map(str, flags)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    first = run("--max-steps", 20, "--keep", 0)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = run_dir / "checkpoints"
    names = [p.name for p in ckpt.list_checkpoints(folder)]
    assert names[-3:] == ["ckpt-00000012.h5", "ckpt-00000016.h5", "ckpt-00000020.h5"], names
    truncate(folder / "ckpt-00000020.h5")
    flip_params(folder / "ckpt-00000016.h5")
    proc = run("--max-steps", 13, "--keep", 3, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {folder / 'ckpt-00000012.h5'}" in proc.stdout
    kept = [p.name for p in ckpt.list_checkpoints(folder)]
    assert kept == ["ckpt-00000008.h5", "ckpt-00000012.h5", "ckpt-00000013.h5"], kept
    for name in ("ckpt-00000016.h5", "ckpt-00000020.h5"):
        assert (folder / (name + ckpt.CORRUPT_SUFFIX)).is_file()
        assert f"{folder / name}" in proc.stdout and "moved aside" in proc.stdout


# ---- item 4: a full disk while training ------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 1500 KiB (two lenet checkpoints and a little), mounted for the test (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                if not fh.write(b"\0" * 4096):
                    return
        except OSError:
            pass


def processes_naming(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``run_dir`` (a rank of the job, left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def assert_nothing_half_written(run_dir: Path) -> None:
    assert not list(run_dir.rglob("*.tmp-*")), list(run_dir.rglob("*"))
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        ckpt.load(path)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_disk_full_while_training_is_one_line_and_the_run_continues_once_there_is_space(
        small_disk, tmp_path_factory, ranks):
    data_dir = make_synthetic_shards(tmp_path_factory.mktemp("full") / f"d{ranks}", ranks)
    run_dir = small_disk / "run"
    flags = ["--model", "lenet", "--epochs", 2, "--max-steps", 40, "--checkpoint-every", 4, "--keep", 0,
             "--eval-every", 0]
    launch = [str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks)] if ranks > 1 else []
    cmd = [*launch, sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
           "--device", "cpu", "--progress", "off", "--local-batch-size", "8", *map(str, flags)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    saved = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert saved, "the disk holds at least one checkpoint before it is full"
    failed = ckpt.checkpoint_path(run_dir / "checkpoints", int(saved[-1].name[5:13]) + 4)
    assert f"{failed}: cannot be written (no space left on device)" in errors[0]
    assert f"the earlier checkpoints are intact (newest: {saved[-1]})" in errors[0]
    assert "--resume latest" in errors[0]
    assert_nothing_half_written(run_dir)
    deadline = time.monotonic() + 30  # ranks killed as the launcher ends may take a moment to go on a busy machine
    while processes_naming(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_naming(run_dir), "a rank outlived the job"
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    again = subprocess.run(cmd + ["--resume", "latest"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {saved[-1]}" in again.stdout
    assert_nothing_half_written(run_dir)


def test_a_disk_full_at_start_names_the_file_it_could_not_write(data, small_disk):
    fill(small_disk)
    proc = train(data, small_disk / "run", "--model", "lenet", "--epochs", 1, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {small_disk / 'run' / '.lock'}: cannot be written (no space left on device)"], proc.stderr


def test_a_metrics_line_cut_short_by_a_full_disk_is_rolled_back(small_disk):
    from ddp_cnn.system.nospace import DiskFull
    from ddp_cnn.run.rundir import MetricsLog
    path = small_disk / "metrics.jsonl"
    path.write_text('{"kind": "start"}'.ljust(4090) + "\n")  # one page, all but a few bytes
    fill(small_disk)
    with pytest.raises(DiskFull, match="metrics.jsonl: cannot be written"):
        MetricsLog(path, is_root=True).write({"kind": "step", "step": 1, "loss": 0.5})
    assert path.stat().st_size == 4091  # the partial line is gone
    json.loads(path.read_text())


def test_a_checkpoint_write_that_finds_no_space_names_the_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC injected at the checkpoint's fsync."""
    import errno
    from ddp_cnn.system.nospace import DiskFull

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "fsync_file", no_space)
    with pytest.raises(DiskFull) as caught:
        small_save(tmp_path, 7, keep=0, warn=print)
    assert str(caught.value) == f"{tmp_path / 'ckpt-00000007.h5'}: cannot be written (no space left on device)"
    assert list(tmp_path.iterdir()) == []


# ---- item 3: a model that does not fit in memory is refused before allocation --------------

def model_file(folder: Path, text: str) -> Path:
    path = folder / "net.toml"
    path.write_text(text)
    return path


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_model_file_with_a_dense_of_a_billion_units_is_refused_naming_the_layer(data, tmp_path):
    path = model_file(tmp_path, '[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\nunits = 1000000000\n'
                                '[[layers]]\ntype = "Dense"\nunits = "classes"\n')
    line = one_error_line(train(data, tmp_path / "run", "--model", path, "--epochs", 1, timeout=120))
    assert line.startswith(f"error: {path}: model 'net' does not fit in memory: layer 2 'dense' (Dense) has "
                           "785,000,000,000 parameters; the model needs at least "), line


def test_a_named_model_whose_flags_make_it_too_large_is_refused_naming_the_layer(data, tmp_path):
    line = one_error_line(train(data, tmp_path / "run", "--model", "fmnist-vgg", "--width", 1000000, "--epochs", 1,
                                timeout=120))
    assert "model 'fmnist-vgg' does not fit in memory: layer " in line and "(Conv2D) has " in line, line


def test_one_batch_of_activations_past_the_memory_limit_is_refused_before_the_first_step(data, tmp_path):
    """An address-space limit (ulimit -v 4 GiB) makes the limit known and keeps the machine safe either way:
    128 images of 20,000 26x26 feature maps need more than 4 GiB, the parameters 1.5 MB."""
    import resource
    path = model_file(tmp_path, '[[layers]]\ntype = "Conv2D"\nfilters = 20000\nkernel_size = 3\n'
                                '[[layers]]\ntype = "GlobalAvgPool2D"\n[[layers]]\ntype = "Dense"\nunits = "classes"\n')
    limit = 4 << 30
    cmd = [sys.executable, "-m", "ddp_cnn.train", "--data", str(data), "--run-dir", str(tmp_path / "run"),
           "--device", "cpu", "--progress", "off", "--local-batch-size", "128", "--model", str(path), "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    line = one_error_line(proc)
    assert line.startswith("error: --local-batch-size 128: one batch of model 'net' needs at least ") and \
        "(layer 1 'conv2d' (Conv2D): 13,526,084 values per image)" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists() or not ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")


def stored(folder: Path, description: dict, class_names=None, params=None) -> Path:
    """A checkpoint whose stored model description (and class names) are as given."""
    params = np.zeros(1, np.float32) if params is None else params
    meta = {"model": description, "class_names": class_names or [str(i) for i in range(10)], "mean": [0.3],
            "std": [0.3], "global_step": 1}
    return ckpt.save(folder, 1, params, {}, {}, meta)


def predict(checkpoint: Path, folder: Path):
    image = folder / "x.npy"
    np.save(image, np.zeros((1, 28, 28), np.uint8))
    return subprocess.run([sys.executable, "-m", "ddp_cnn.predict", "--checkpoint", str(checkpoint), str(image)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def lenet_description():
    from ddp_cnn import model as model_mod
    model = model_mod.build("lenet", input_shape=(28, 28, 1), num_classes=10)
    return model.describe(), model.params


def test_a_checkpoint_whose_stored_model_is_too_large_is_refused_naming_the_layer(data, tmp_path):
    desc, _ = lenet_description()
    desc["layers"][-1]["units"] = 10 ** 9  # the last Dense: (84 + 1) x 10^9 parameters
    path = stored(tmp_path / "ck", desc)
    line = one_error_line(predict(path, tmp_path))
    assert line.startswith(f"error: checkpoint {path}: model 'lenet' does not fit in memory: layer ") and \
        "layer 13 'dense_2' (Dense) has 85,000,000,000 parameters" in line, line
    resumed = train(data, tmp_path / "run", "--resume", path, "--epochs", 1, timeout=120)
    assert "does not fit in memory" in one_error_line(resumed)


def test_a_stored_layer_argument_of_the_wrong_type_is_a_bad_description_not_a_crash(tmp_path):
    desc, params = lenet_description()
    desc["layers"][-1]["init"] = {"name": "classifier"}
    line = one_error_line(predict(stored(tmp_path / "ck", desc, params=params), tmp_path))
    assert "bad model description (layer 13 (Dense): AttributeError: " in line, line


def test_a_checkpoint_with_more_class_names_than_logits_is_refused(tmp_path):
    desc, params = lenet_description()
    path = stored(tmp_path / "ck", desc, class_names=[f"c{i}" for i in range(200000)], params=params)
    line = one_error_line(predict(path, tmp_path))
    assert line == (f"error: checkpoint {path}: lists 200,000 class names for a model of 10 logits "
                    "(a damaged or edited file)"), line


# ---- item 5: the small things a new user met --------------------------------------------------

def test_inspect_grid_without_matplotlib_names_the_extra_to_install(data, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
            "from data_tools.inspect import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(data / "test.h5"), "--grid", str(tmp_path / "g.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    line = one_error_line(proc)
    assert "matplotlib" in line and "pip install 'ddp_cnn[report]'" in line, line
    assert proc.stdout == "" and not list(tmp_path.iterdir())  # refused before any work


def test_the_time_left_with_max_steps_covers_the_steps_that_will_run(monkeypatch, capsys):
    """A clock that moves 1 s per step: 2 steps done of the 10 that --max-steps lets run, 8 s left (not the 98 s
    of the whole 100-step epoch)."""
    import types
    from ddp_cnn.run import progress as progress_mod
    clock = {"t": 0.0}
    monkeypatch.setattr(progress_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    progress = progress_mod.Progress("lines", 0, 2, steps=100, start_step=0, world_size=1, every_s=0.0, end=10)
    for _ in range(2):
        clock["t"] += 1.0
        progress.update(0.5, 8)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("step 2/100: loss 0.5000, 8 img/s, 0:00:08 left until --max-steps (step 10 of the epoch)"), last
    whole = progress_mod.Progress("lines", 0, 2, steps=100, start_step=0, world_size=1, every_s=0.0)
    clock["t"] += 1.0
    whole.update(0.5, 8)
    assert capsys.readouterr().out.strip().endswith("0:01:39 left in the epoch")


@pytest.mark.parametrize("model_channels,picture_mode,said", [
    (3, "L", "a grayscale picture, converted to RGB (three equal channels) for a model of colour images"),
    (1, "RGB", "a colour picture, converted to grayscale for a model of grayscale images")])
def test_predict_says_what_it_converted_when_the_picture_has_other_colours_than_the_model(
        tmp_path, model_channels, picture_mode, said):
    Image = pytest.importorskip("PIL.Image", reason="needs Pillow (the images extra)")
    from ddp_cnn import model as model_mod
    model = model_mod.build("lenet", input_shape=(28, 28, model_channels), num_classes=10)
    meta = {"model": model.describe(), "class_names": [str(i) for i in range(10)], "mean": [0.3] * model_channels,
            "std": [0.3] * model_channels, "global_step": 1}
    checkpoint = ckpt.save(tmp_path / "ck", 1, model.params, {}, {}, meta)
    picture = tmp_path / "photo.png"
    Image.new(picture_mode, (40, 30), 90).save(picture)
    same = tmp_path / "same.png"
    Image.new("L" if model_channels == 1 else "RGB", (40, 30), 90).save(same)
    proc = subprocess.run([sys.executable, "-m", "ddp_cnn.predict", "--checkpoint", str(checkpoint), str(picture),
                           str(same)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"note: {picture}: {said}"]  # the matching picture: nothing said
    assert len(proc.stdout.strip().splitlines()) == 2


def test_a_one_process_run_reports_no_communication_and_one_epoch_numbering(data, tmp_path):
    """Two epochs in one process: the epoch lines and records say nothing of communication (none happens),
    the test record names the last epoch as the epoch records do (index 1), and report titles its matrix
    "epoch 2"."""
    pytest.importorskip("matplotlib", reason="report draws with matplotlib (the report extra)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ddp_cnn.cli.report import confusion_figure, read_metrics, summary_markdown
    run_dir = tmp_path / "run"
    proc = train(data, run_dir, "--model", "mlp", "--epochs", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and not any("comm" in line for line in epoch_lines), epoch_lines
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    test = [r for r in records if r["kind"] == "test"]
    assert [r["epoch"] for r in epochs] == [0, 1] and test[0]["epoch"] == 1
    assert not any(k.startswith("comm") for r in epochs for k in r)
    assert "communication" not in summary_markdown(records, run_dir)
    assert confusion_figure(records, plt).axes[0].get_title() == "Confusion matrix, test set, epoch 2"
    plt.close("all")


def test_report_reads_a_log_whose_test_record_counted_epochs_from_1(tmp_path):
    """Logs written before the numbering was made one: the test record after 2 epochs said epoch 2."""
    pytest.importorskip("matplotlib", reason="report draws with matplotlib (the report extra)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ddp_cnn.cli.report import confusion_figure
    epoch = {"kind": "epoch", "complete": True, "train_loss": 1.0, "train_acc": 0.5, "images_per_s": 10.0,
             "seconds": 1.0}
    records = [{"kind": "start", "step": 0, "world_size": 2, "class_names": ["a", "b"]},
               {**epoch, "epoch": 0, "step": 5}, {**epoch, "epoch": 1, "step": 10},
               {"kind": "test", "step": 10, "epoch": 2, "test_acc": 0.5, "test_confusion": [[1, 1], [1, 1]]}]
    assert confusion_figure(records, plt).axes[0].get_title() == "Confusion matrix, test set, epoch 2"
    plt.close("all")
