"""Bad flags, config and input: one clear line, exit code 2, before any work starts."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddp_cnn.cli.train import main as train_main
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("cli") / "data", 1)


def run(argv, capsys):
    try:
        code = train_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet9000"], "--model: invalid choice"),
    (["--optimizer", "lbfgs"], "--optimizer: invalid choice"),
    (["--lr", "0"], "--lr: must be a number > 0"),
    (["--lr", "-0.1"], "--lr: must be a number > 0"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--epochs", "-1"], "--epochs: must be an integer >= 1"),
    (["--label-smoothing", "1.5"], "--label-smoothing: must be in [0, 1)"),
    (["--fail-at", "x"], "--fail-at: expected RANK:STEP"),
    (["--dropout-rate", "1"], "--dropout-rate: must be in [0, 1)"),
    (["--collective-timeout", "-1"], "--collective-timeout: must be a number >= 0"),
    (["--ema", "1"], "--ema: must be in [0, 1)"),
    (["--width", "0"], "--width: must be an integer >= 1"),
    (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert needle in err[-1]


def test_missing_data_folder_exits_2(tmp_path, capsys):
    code, err = run(["--data", tmp_path / "nope", "--comm", "single", "--run-dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --data") and "no such folder" in err[0] and "data_tools.shard" in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing written


def test_unknown_config_key_and_bad_value_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "lenet"\nlearning_rate = 0.1\n')
    code, err = run(["--config", cfg], capsys)
    assert code == 2 and "unknown key 'learning_rate'" in err[-1]
    cfg.write_text('lr = -1\n')
    code, err = run(["--config", cfg], capsys)
    assert code == 2 and "key 'lr'" in err[-1]
    cfg.write_text('model = "lenet\n')
    code, err = run(["--config", cfg], capsys)
    assert code == 2 and "not valid TOML" in err[-1]


def test_config_supplies_defaults_and_flags_override(tmp_path):
    from ddp_cnn.cli.train import parse_args
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "mlp"\nlr = 0.5\nhflip = true\nbatch-size = 64\n')
    args = parse_args(["--config", str(cfg), "--lr", "0.25"])
    assert (args.model, args.lr, args.hflip, args.batch_size) == ("mlp", 0.25, True, 64)


def test_recipes_parse():
    from ddp_cnn.cli.train import parse_args
    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("argv,needle", [
    (["--no-dropout", "--dropout-rate", "0.3"], "--dropout-rate: the model has no dropout layers"),
    (["--model", "lenet", "--batchnorm"], "--batchnorm: only for --model fmnist-cnn or mlp"),
    (["--model", "mlp", "--width", "32"], "--width: only for --model fmnist-vgg"),
    (["--model", "mlp", "--batchnorm", "--ema", "0.99"], "--ema: not for a model with batch norm"),
])
def test_model_flags_that_do_not_fit_exit_2(argv, needle, data, tmp_path, capsys):
    code, err = run(argv + ["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_checkpoint_of_another_architecture_exits_2(data, tmp_path, capsys):
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--run-dir", tmp_path,
              "--progress", "off"]
    assert train_main([str(a) for a in common + ["--model", "mlp", "--max-steps", 2]]) == 0
    capsys.readouterr()
    code, err = run(common + ["--model", "lenet", "--resume", "latest"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: checkpoint") and "mlp" in err[0] and "--model lenet" in err[0]


@pytest.mark.parametrize("where", ["--run-dir", "--checkpoint-dir"])
def test_resume_latest_of_a_folder_that_does_not_exist_is_refused_with_one_line(where, data, tmp_path, capsys):
    """A typo in a requeue script's --run-dir must not start the whole training again."""
    typo = tmp_path / "runs" / "mnist-typo"
    code, err = run(["--data", data, "--comm", "single", "--device", "cpu", "--progress", "off",
                     where, typo, "--resume", "latest"], capsys)
    assert code == 2 and err == [f"error: --resume latest: {where} {typo} does not exist, so there is nothing to "
                                 "resume; check the name, or use --resume auto to start a new run when there is "
                                 "nothing yet"]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_resume_auto_starts_a_new_run_saying_so_first_then_resumes_exactly(data, tmp_path, capsys):
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--progress", "off"]
    assert train_main([str(a) for a in common + ["--max-steps", 4, "--run-dir", tmp_path / "straight"]]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "requeued"
    assert train_main([str(a) for a in common + ["--max-steps", 2, "--run-dir", run_dir, "--resume", "auto"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"--resume auto: nothing to resume in {run_dir / 'checkpoints'} yet; starting a new run"
    assert train_main([str(a) for a in common + ["--max-steps", 4, "--run-dir", run_dir, "--resume", "auto"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"resumed from {run_dir / 'checkpoints' / 'ckpt-00000002.h5'} at epoch 1/")
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("resume") == 1

    def final(folder):
        with h5py.File(folder / "checkpoints" / "ckpt-00000004.h5", "r") as fh:
            return fh["params"][...]
    assert np.array_equal(final(run_dir), final(tmp_path / "straight"))


def test_a_run_resumed_at_its_max_steps_trains_no_further_step(data, tmp_path, capsys):
    flags = [str(a) for a in ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0,
                              "--progress", "off", "--max-steps", 3, "--run-dir", tmp_path]]
    assert train_main(flags) == 0
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    assert train_main(flags + ["--resume", "latest"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: 3 steps")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no ckpt-00000004.h5


def test_corrupt_checkpoint_given_by_path_exits_2(data, tmp_path, capsys):
    bad = tmp_path / "ckpt-00000001.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    code, err = run(["--data", data, "--comm", "single", "--resume", bad, "--run-dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0]


def test_help_documents_every_flag_with_default():
    out = subprocess.run([sys.executable, "-m", "ddp_cnn.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for flag in ("--data", "--model", "--epochs", "--batch-size", "--local-batch-size", "--optimizer", "--lr",
                 "--weight-decay", "--schedule", "--warmup-epochs", "--scale-lr", "--seed", "--device", "--comm",
                 "--bucket-mb", "--checkpoint-dir", "--checkpoint-every", "--resume", "--eval-every", "--metrics",
                 "--config", "--check-replicas", "--keep", "--skip-nonfinite", "--collective-timeout", "--dropout-rate"):
        assert flag in out, flag
    assert "(default: 4.0)" in out  # bucket size default shown


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A lenet trained for a few steps on `data`: its last checkpoint."""
    run_dir = tmp_path_factory.mktemp("teacher")
    argv = ["--data", data, "--comm", "single", "--device", "cpu", "--model", "lenet", "--max-steps", 3,
            "--eval-every", 0, "--run-dir", run_dir, "--progress", "off"]
    assert train_main([str(a) for a in argv]) == 0
    return sorted((run_dir / "checkpoints").glob("ckpt-*.h5"))[-1]


def test_distillation_from_a_teacher_trains(data, teacher, tmp_path, capsys):
    argv = ["--data", data, "--comm", "single", "--device", "cpu", "--model", "mlp", "--max-steps", 3,
            "--eval-every", 0, "--run-dir", tmp_path, "--progress", "off", "--teacher", teacher,
            "--distill-weight", 0.7, "--distill-temperature", 2]
    assert train_main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert f"distilling from {teacher} (lenet" in out and "computed once per image" in out
    # A run folder stands for its newest checkpoint.
    argv[argv.index(teacher)] = teacher.parent.parent
    assert train_main([str(a) for a in argv + ["--hflip", "--overwrite"]]) == 0
    out = capsys.readouterr().out
    assert f"distilling from {teacher} (lenet" in out and "runs on every (augmented) batch" in out


def test_teacher_problems_exit_2(data, teacher, tmp_path, tmp_path_factory, capsys):
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--model", "mlp", "--run-dir", tmp_path]
    code, err = run(common + ["--teacher", tmp_path / "none.h5"], capsys)
    assert code == 2 and len(err) == 1 and f"--teacher {tmp_path / 'none.h5'}: no such file" in err[0]
    empty = tmp_path_factory.mktemp("empty-run")
    code, err = run(common + ["--teacher", empty], capsys)
    assert code == 2 and len(err) == 1 and f"--teacher {empty}: no checkpoint (ckpt-*.h5) in {empty}" in err[0]
    code, err = run(common + ["--distill-temperature", 3], capsys)
    assert code == 2 and "--distill-temperature: only with --teacher" in err[-1]
    for bad in (2, 0):
        code, err = run(common + ["--teacher", teacher, "--distill-weight", bad], capsys)
        assert code == 2 and "--distill-weight: must be in (0, 1]" in err[-1]
    other = make_synthetic_shards(tmp_path_factory.mktemp("other") / "data", 1, seed=7)
    code, err = run(common[:1] + [other] + common[2:] + ["--teacher", teacher], capsys)
    assert code == 2 and len(err) == 1 and f"--teacher {teacher}: trained on data with pixel mean" in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_soft_targets_by_row_are_the_teachers_logits_of_each_batch(data):
    from ddp_cnn import model as model_mod
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.dist.comm import SingleComm
    from ddp_cnn.data.loader import Loader, open_rank_data
    from ddp_cnn.inference.distill import Distiller
    train = open_rank_data(data, "train", SingleComm())
    loader = Loader(train, batch_size=32, comm=SingleComm(), seed=3, dtype=np.float64, prefetch=0)
    teacher = model_mod.build("lenet", get_backend("cpu", "float64"), seed=2)
    distiller = Distiller(teacher)
    distiller.cache_rows(Loader(train, batch_size=100, comm=SingleComm(), seed=0, dtype=np.float64,
                                shuffle=False, drop_last=False))
    assert distiller.cache.shape == (len(train), 10) and distiller.teacher is None
    order = loader.order(4)
    for step in (0, 7):
        x, _ = loader.batch(order, 4, step)
        want = teacher.forward(x, train=False)
        rows = loader.rows(order, step)
        assert np.array_equal(rows, order[step * 32:(step + 1) * 32])
        assert np.allclose(distiller.targets(x, rows), want, rtol=1e-12, atol=1e-12)


def test_width_sets_the_vgg_stages_and_survives_a_checkpoint(data, tmp_path):
    from ddp_cnn.run.checkpoint import list_checkpoints
    from ddp_cnn.inference import load_model_from_checkpoint
    argv = ["--data", data, "--comm", "single", "--device", "cpu", "--model", "fmnist-vgg", "--width", 4,
            "--max-steps", 1, "--batch-size", 8, "--eval-every", 0, "--run-dir", tmp_path, "--progress", "off"]
    assert train_main([str(a) for a in argv]) == 0
    model, _ = load_model_from_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [4, 4, 8, 8, 16, 16]


def test_a_resume_says_when_the_teacher_changed(data, teacher, tmp_path, tmp_path_factory, capsys):
    from ddp_cnn.run.checkpoint import list_checkpoints, load
    other_dir = tmp_path_factory.mktemp("teacher2")
    assert train_main([str(a) for a in ["--data", data, "--comm", "single", "--device", "cpu", "--model", "lenet",
                                        "--max-steps", 2, "--seed", 1, "--eval-every", 0, "--run-dir", other_dir,
                                        "--progress", "off"]]) == 0
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--model", "mlp", "--eval-every", 0,
              "--run-dir", tmp_path, "--progress", "off"]
    assert train_main([str(a) for a in common + ["--max-steps", 2, "--teacher", teacher]]) == 0
    meta = load(list_checkpoints(tmp_path / "checkpoints")[-1])["meta"]
    assert meta["teacher"]["source"] == str(teacher) and len(meta["teacher"]["sha256"]) == 64
    capsys.readouterr()
    assert train_main([str(a) for a in common + ["--max-steps", 3, "--resume", "latest", "--teacher", teacher]]) == 0
    assert "warning" not in capsys.readouterr().out
    assert train_main([str(a) for a in common + ["--max-steps", 4, "--resume", "latest", "--teacher", other_dir]]) == 0
    assert f"trained with teacher {teacher}; the run goes on with {other_dir}" in capsys.readouterr().out
    assert train_main([str(a) for a in common + ["--max-steps", 5, "--resume", "latest"]]) == 0
    assert "the run goes on with none" in capsys.readouterr().out


def test_a_run_dir_holding_a_run_is_refused_unless_resume_or_overwrite(data, tmp_path, capsys):
    from ddp_cnn.run.checkpoint import list_checkpoints
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--run-dir", tmp_path,
              "--progress", "off", "--max-steps", 2]
    assert train_main([str(a) for a in common]) == 0
    first = list_checkpoints(tmp_path / "checkpoints")
    before = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    code, err = run(common, capsys)
    assert code == 2 and len(err) == 1
    assert err[0] == (f"error: --run-dir {tmp_path}: holds a run (metrics.jsonl, 1 checkpoint(s)); continue it "
                      "with --resume latest, replace it with --overwrite, or choose another --run-dir")
    assert (tmp_path / "metrics.jsonl").read_text() == before and list_checkpoints(tmp_path / "checkpoints") == first
    code, err = run(common + ["--overwrite", "--batch-size", 100000], capsys)  # refused later in the start-up
    assert code == 2 and "larger than the smallest rank's data" in err[0]
    assert (tmp_path / "metrics.jsonl").read_text() == before and list_checkpoints(tmp_path / "checkpoints") == first
    (tmp_path / "checkpoints" / "best.h5").write_bytes(b"an old run's best")
    assert train_main([str(a) for a in common + ["--max-steps", 1, "--overwrite"]]) == 0
    assert not (tmp_path / "checkpoints" / "best.h5").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00000001.h5"]


def test_a_run_dir_that_is_a_file_exits_2_before_any_work(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run(["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", blocker / "run"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {blocker / 'run'}: cannot be a folder")
    code, err = run(["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", tmp_path / "r",
                     "--checkpoint-dir", blocker], capsys)
    assert code == 2 and len(err) == 1 and (err[0] == f"error: {blocker}: exists and is not a folder"
                                            or err[0].startswith(f"error: {blocker}: cannot be a folder"))


def test_help_shows_each_default_once_and_hides_test_flags():
    out = subprocess.run([sys.executable, "-m", "ddp_cnn.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default 64) (default" not in flat and "default: the architecture's own" in flat
    assert "--fail-at" not in out and "--inject-nan" not in out


def test_an_abbreviated_flag_is_an_error_not_a_guess(capsys):
    code, err = run(["--epoch", "3"], capsys)
    assert code == 2 and "unrecognized arguments: --epoch 3" in err[-1]


def test_metrics_hold_typed_values_and_a_time(data, tmp_path):
    import json
    argv = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 1, "--run-dir", tmp_path,
            "--progress", "off", "--max-steps", 2, "--hflip", "--lr", 0.002]
    assert train_main([str(a) for a in argv]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    config = records[0]["config"]
    assert records[0]["kind"] == "start" and config["lr"] == 0.002 and config["hflip"] is True
    assert config["max_steps"] == 2 and config["teacher"] is None and config["run_dir"] == str(tmp_path)
    times = [r["time"] for r in records]
    assert times == sorted(times) and all(isinstance(t, float) for t in times)
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert "comm_seconds" not in epoch and "comm_exposed_seconds" not in epoch  # one process communicates nothing


@pytest.mark.parametrize("argv", [
    ["data_tools.shard", "--out", "x", "--shard", "2"],
    ["ddp_cnn.evaluate", "--check", "x", "--data", "y"],
    ["ddp_cnn.predict", "--check", "x", "a.npy"],
    ["ddp_cnn.export", "--check", "x", "--out", "y.npz"],
    ["ddp_cnn.summary", "--mod", "lenet"],
])
def test_no_program_guesses_an_abbreviated_flag(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "error:" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_bad_flag_under_4_ranks_prints_its_usage_once():
    proc = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "4", sys.executable, "-m", "ddp_cnn.train",
                           "--epochs", "0"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("--epochs: must be an integer >= 1") == 1 and proc.stderr.count("usage:") == 1


def test_a_checkpoint_from_before_the_classifier_init_still_resumes(data, tmp_path, capsys):
    import json
    import h5py
    from ddp_cnn.run.checkpoint import list_checkpoints
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--run-dir", tmp_path,
              "--progress", "off", "--model", "lenet"]
    assert train_main([str(a) for a in common + ["--max-steps", 2]]) == 0
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    with h5py.File(path, "r+") as f:  # as written before 2026-11-30: the last layer's init was Glorot's
        model = json.loads(f.attrs["model"])
        assert model["layers"][-1]["init"] == "classifier"
        model["layers"][-1]["init"] = "glorot_uniform"
        f.attrs["model"] = json.dumps(model)
    capsys.readouterr()
    assert train_main([str(a) for a in common + ["--max-steps", 3, "--resume", "latest"]]) == 0
    assert f"resumed from {path}" in capsys.readouterr().out


def test_batchnorm_on_one_value_per_channel_is_refused_at_start(data, tmp_path, capsys):
    code, err = run(["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", tmp_path, "--model", "mlp",
                     "--batchnorm", "--local-batch-size", 1], capsys)
    assert code == 2 and len(err) == 1
    assert err[0] == ("error: --local-batch-size 1: layer 'batchnorm' would train on one value per channel; "
                      "use 2 or more images per rank")


def test_a_resume_that_changes_the_batch_optimizer_or_shards_is_refused_with_one_line(data, tmp_path, capsys,
                                                                                      tmp_path_factory):
    common = ["--data", data, "--comm", "single", "--device", "cpu", "--eval-every", 0, "--run-dir", tmp_path,
              "--progress", "off", "--batch-size", 32]
    assert train_main([str(a) for a in common + ["--max-steps", 3]]) == 0
    capsys.readouterr()
    other = make_synthetic_shards(tmp_path_factory.mktemp("reshard") / "data", 1, seed=3)
    for change, needle in ((["--batch-size", 64], "trained with --batch-size (global) 32, this run has 64"),
                           (["--optimizer", "nesterov"], "trained with --optimizer adam, this run has nesterov"),
                           (["--data", other], "trained with shards (sharding_id of --data)")):
        code, err = run(common + ["--max-steps", 5, "--resume", "latest"] + change, capsys)
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert train_main([str(a) for a in common + ["--max-steps", 5, "--resume", "latest"]]) == 0


def test_a_diverging_run_ends_with_one_line_and_exit_65(data, tmp_path, capsys):
    from ddp_cnn.dist.faults import EXIT_DIVERGED
    code, err = run(["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", tmp_path, "--progress",
                     "off", "--eval-every", 0, "--optimizer", "sgd", "--lr", "1e6", "--epochs", 3], capsys)
    errors = [line for line in err if line.startswith("error:")]
    assert code == EXIT_DIVERGED == 65 and len(errors) == 1  # not retried by ddp_cnn.supervise
    assert errors[0].startswith("error: non-finite loss or gradient at global step")


def test_a_run_dir_in_use_by_another_job_is_refused_naming_it(data, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ddp_cnn.run.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        common = ["--data", data, "--comm", "single", "--device", "cpu", "--run-dir", tmp_path, "--progress", "off",
                  "--eval-every", 0, "--max-steps", 1]
        code, err = run(common, capsys)
        assert code == 2 and len(err) == 1
        assert err[0].startswith(f"error: --run-dir {tmp_path}: in use by process {holder.pid} on ")
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died (as a killed job does): its lock went with it; a dead writer's temporary file goes too.
    (tmp_path / "checkpoints").mkdir()
    dead = tmp_path / "checkpoints" / "ckpt-00000009.h5.tmp-999999999"
    dead.write_bytes(b"half a checkpoint")
    assert train_main([str(a) for a in common]) == 0
    assert not dead.exists() and f"removed {dead}" in capsys.readouterr().out
