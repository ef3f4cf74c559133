"""The library Trainer: the guide's "your own network" example (docs/using-a-model.md), in one process and under
mpirun, the CLI's equal, its config, and start-up errors raised on every rank."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.model import layers as L
from ddp_cnn import model as model_mod
from ddp_cnn.run.checkpoint import list_checkpoints, load
from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.run.config import TrainConfig
from ddp_cnn.model import Sequential
from ddp_cnn.dist.agree import SetupError
from ddp_cnn.run.trainer import Trainer
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("trainer")
    return {n: make_synthetic_shards(base / f"d{n}", n) for n in (1, 2)}


def readme_example(data_dir, run_dir) -> str:
    """The guide's Trainer example (docs/using-a-model.md), pointed at `data_dir` and `run_dir`."""
    text = (REPO / "docs" / "using-a-model.md").read_text()
    start = text.index("Your own network")
    code = re.search(r"```python\n(.*?)```", text[start:], flags=re.S).group(1)
    assert 'data="data/fashion-mnist"' in code and 'run_dir="runs/mine"' in code
    return code.replace('data="data/fashion-mnist"', f'data="{data_dir}"').replace(
        'run_dir="runs/mine"', f'run_dir="{run_dir}"')


def test_readme_example_trains_in_one_process(data, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example(data[1], tmp_path / "run"))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1/1" in proc.stdout and "test (final model, scored once): loss" in proc.stdout  # it prints its progress
    state = load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert state["meta"]["world_size"] == 1


def test_readme_example_runs_unchanged_under_mpirun(data, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example(data[2], tmp_path / "run"))
    proc = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "2", sys.executable, str(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch 1/1") == 1  # rank 0 alone prints
    state = load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert state["meta"]["world_size"] == 2
    import json
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs and all(0 <= e["comm_exposed_seconds"] <= e["comm_seconds"] for e in epochs)


def test_library_trainer_equals_the_command_line(data, tmp_path):
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.cli.train import main
    flags = dict(max_steps=6, batch_size=32, eval_every=0, optimizer="nesterov", lr=0.05, augment_shift=1, seed=4)
    argv = ["--data", data[1], "--model", "lenet", "--comm", "single", "--device", "cpu", "--progress", "off",
            "--run-dir", tmp_path / "cli"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)]
    assert main([str(a) for a in argv]) == 0
    model = model_mod.build("lenet", get_backend("cpu", "float32"), seed=4, num_classes=10, dropout=True)
    trainer = Trainer(model, TrainConfig(data=str(data[1]), run_dir=str(tmp_path / "lib"), progress="off"),
                      comm=SingleComm(), **flags)
    assert trainer.fit() == 0
    cli = load(list_checkpoints(tmp_path / "cli" / "checkpoints")[-1])
    assert np.array_equal(cli["params"], model.params), "the library and the command line trained differently"


def test_unknown_setting_is_a_type_error(data):
    model = model_mod.build("lenet")
    with pytest.raises(TypeError, match="learning_rate"):
        Trainer(model, comm=SingleComm(), data=str(data[1]), learning_rate=0.1)


@pytest.mark.parametrize("make,needle", [
    (lambda: Sequential([L.Flatten(), L.Dense(10)], (32, 32, 3)), "takes inputs of shape (32, 32, 3)"),
    (lambda: Sequential([L.Flatten(), L.Dense(7)], (28, 28, 1)), "predicts 7 classes"),
    (lambda: Sequential([L.Flatten(), L.Dense(10), L.BatchNorm()], (28, 28, 1)), "--ema: not for a model"),
])
def test_a_model_that_does_not_fit_the_data_is_a_setup_error(data, tmp_path, make, needle):
    with pytest.raises(SetupError, match=re.escape(needle)):
        Trainer(make(), comm=SingleComm(), data=str(data[1]), run_dir=str(tmp_path), ema=0.5)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_step_alone_memorises_a_batch():
    """The step under the Trainer (compute_gradients + the optimizer), driven by hand as before the Trainer."""
    from ddp_cnn.model import optim
    from ddp_cnn.dist.reducer import GradReducer
    from ddp_cnn.run.step import compute_gradients
    model = Sequential([L.Conv2D(8, 3, padding="same"), L.BatchNorm(), L.ReLU(), L.MaxPool2D(2),
                        L.Flatten(), L.Dropout(0.2), L.Dense(10)], input_shape=(28, 28, 1), seed=0)
    opt = optim.create("adam", model.params, model.grads, lr=1e-3, decay_ranges=model.decay_ranges)
    reducer = GradReducer(SingleComm(), model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)))
    loss_fn, rng = L.SoftmaxCrossEntropy(), np.random.default_rng(0)
    x, y = rng.standard_normal((64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64)
    for step in range(30):
        loss, correct = compute_gradients(model, loss_fn, reducer, x, y, step)
        opt.step()
    reducer.close()
    assert float(loss) < 1.0 < np.log(10)  # it learns: memorises the 64 samples, far below chance
    assert int(correct) >= 48


def signalled_trainer(data, tmp_path, when):
    """A one-epoch Trainer whose stop flag is set (as SIGTERM would) by `when(trainer)`'s hook."""
    model = model_mod.build("lenet")
    trainer = Trainer(model, comm=SingleComm(), data=str(data[1]), run_dir=str(tmp_path), epochs=1, batch_size=100,
                      progress="off", keep=0)
    when(trainer)
    return trainer


def metric_kinds(run_dir):
    import json
    return [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_signal_during_backward_stops_after_that_step(data, tmp_path):
    from ddp_cnn.dist.faults import EXIT_PREEMPTED

    def during_backward_of_step_3(trainer):
        layer_done = trainer.reducer.layer_done

        def hook(i):
            if trainer.global_step == 3 and i == 0:  # the first layer: backward's very end
                trainer.stop.signum = 15
            layer_done(i)
        trainer.reducer.layer_done = hook
    trainer = signalled_trainer(data, tmp_path, during_backward_of_step_3)
    assert trainer.fit() == EXIT_PREEMPTED
    assert load(list_checkpoints(tmp_path / "checkpoints")[-1])["meta"]["global_step"] == 4  # steps 0..3 done


def test_a_signal_during_the_last_step_stops_before_evaluation(data, tmp_path):
    from ddp_cnn.dist.faults import EXIT_PREEMPTED

    def after_the_last_allreduce(trainer):
        step = trainer.opt.step

        def hook(lr=None):
            if trainer.global_step == trainer.steps_per_epoch - 1:  # the flag has gone out already
                trainer.stop.signum = 15
            step(lr)
        trainer.opt.step = hook
    trainer = signalled_trainer(data, tmp_path, after_the_last_allreduce)
    assert trainer.fit() == EXIT_PREEMPTED
    saved = load(list_checkpoints(tmp_path / "checkpoints")[-1])["meta"]
    assert saved["global_step"] == trainer.steps_per_epoch
    assert "epoch" not in metric_kinds(tmp_path)  # neither the evaluation nor the epoch's record ran first


def test_progress_lines_say_epoch_step_loss_speed_and_time_left(capsys, monkeypatch):
    from ddp_cnn.run.progress import Progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # as under mpirun
    progress = Progress("auto", epoch=1, epochs=3, steps=4, start_step=0, world_size=2, every_s=0.0)
    assert progress.mode == "lines"
    for _ in range(4):
        progress.update(np.float32(0.5), batch=8)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # none after the epoch's last step: the epoch line follows
    assert re.fullmatch(r"epoch 2/3 step 1/4: loss 0\.5000, \d+ img/s, 0:00:\d\d left in the epoch", lines[0])
    assert Progress("off", 0, 1, 4, 0, 1).mode == "off"


def test_held_out_validation_rows_are_the_same_whatever_the_ranks_and_disjoint_from_training(data):
    from ddp_cnn.data.loader import open_rank_data
    from ddp_cnn.data.splits import hold_out, holdout_mask
    whole = open_rank_data(data[1], "train", SingleComm())
    train, val = hold_out(whole, 0.25)
    assert len(train) + len(val) == len(whole) and abs(len(val) / len(whole) - 0.25) < 0.05
    assert not set(train.source_index) & set(val.source_index)
    assert np.array_equal(holdout_mask(whole.source_index, 0.25)[np.argsort(whole.source_index)],
                          holdout_mask(np.sort(whole.source_index), 0.25))  # a property of each row alone
    # Two shards of another sharding of the same images hold out the same images.
    halves = [hold_out(open_rank_data(data[2], "train", _FakeRank(r, 2)), 0.25)[1] for r in range(2)]
    assert set(np.concatenate([h.source_index for h in halves])) == set(val.source_index)


class _FakeRank(SingleComm):
    """Rank r of n for reading shards (open_rank_data's agreement is answered locally)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def allgather_obj(self, obj):
        return [obj] * self.size


def test_epochs_are_scored_on_validation_the_best_is_kept_and_the_test_set_once_at_the_end(data, tmp_path):
    import json
    from ddp_cnn.run.checkpoint import BEST_NAME
    model = model_mod.build("lenet", seed=1)
    trainer = Trainer(model, comm=SingleComm(), data=str(data[1]), run_dir=str(tmp_path), epochs=3, batch_size=64,
                      progress="off", val_fraction=0.2, keep=1, lr=3e-3)
    assert trainer.fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all("val_acc" in r and "test_acc" not in r for r in epochs)
    assert {r["val_count"] for r in epochs} == {len(trainer.val_data)} and 200 < len(trainer.val_data) < 280
    tests = [r for r in records if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["test_count"] == 300 and tests[0]["step"] == epochs[-1]["step"]
    best_epoch = max(epochs, key=lambda r: r["val_acc"])  # the first of equals: a tie keeps the earlier one
    best_epoch = [r for r in epochs if r["val_acc"] == best_epoch["val_acc"]][0]
    best = load(tmp_path / "checkpoints" / BEST_NAME)
    assert best["meta"]["global_step"] == best_epoch["step"] and best["meta"]["best_val_acc"] == best_epoch["val_acc"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [f"ckpt-{epochs[-1]['step']:08d}.h5"]


def test_without_a_validation_split_epochs_are_not_scored(data, tmp_path, capsys):
    import json
    trainer = Trainer(model_mod.build("lenet"), comm=SingleComm(), data=str(data[1]), run_dir=str(tmp_path),
                      epochs=1, max_steps=3, batch_size=64, progress="off")
    assert trainer.fit() == 0
    assert "no validation split" in capsys.readouterr().out
    kinds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_acc" in r or "test_acc" in r for r in kinds if r["kind"] == "epoch")
    assert [r["kind"] for r in kinds].count("test") == 1


def test_adamw_weight_decay_zero_means_none_from_the_command_line_and_the_library(data, tmp_path):
    from ddp_cnn.cli.train import parse_args
    assert parse_args(["--optimizer", "adamw"]).weight_decay is None  # the optimizer's default: 0.01
    assert parse_args(["--optimizer", "adamw", "--weight-decay", "0"]).weight_decay == 0.0
    common = dict(comm=SingleComm(), data=str(data[1]), optimizer="adamw", eval_every=0, progress="off")
    assert Trainer(model_mod.build("lenet"), run_dir=str(tmp_path / "a"), **common).opt.weight_decay == 0.01
    assert Trainer(model_mod.build("lenet"), run_dir=str(tmp_path / "b"), weight_decay=0.0,
                   **common).opt.weight_decay == 0.0
