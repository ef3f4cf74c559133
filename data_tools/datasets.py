"""What we know about the canonical MNIST-style data sets: class names, mirrors, file hashes.

Each file has two hashes: ``sha256`` of the canonical ``.gz`` as the mirrors
serve it, and ``raw_sha256`` of the decompressed IDX bytes.  A re-compressed
copy (Debian's ``dataset-fashion-mnist`` strips the file name and changes the
timestamp in the gzip header, so its ``.gz`` hashes differ) still carries the
same data, and is recognised by the second hash.  Both sets of values are the
ones published by many independent projects for these files.
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class KnownFile:
    name: str
    sha256: str  # of the canonical gzip file
    raw_sha256: str  # of its decompressed content


@dataclass(frozen=True)
class KnownDataset:
    name: str
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order
    files: dict  # role -> KnownFile

    def accepts(self, role: str, sha256: str, raw_sha256: str | None = None) -> bool:
        known = self.files[role]
        return sha256 == known.sha256 or raw_sha256 == known.raw_sha256


MNIST = KnownDataset(
    name="mnist",
    class_names=tuple(str(d) for d in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    files={
        "train_images": KnownFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train_labels": KnownFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "test_images": KnownFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "test_labels": KnownFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
)

FASHION_MNIST = KnownDataset(
    name="fashion-mnist",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files={
        "train_images": KnownFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train_labels": KnownFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "test_images": KnownFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "test_labels": KnownFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
)

KNOWN = {d.name: d for d in (MNIST, FASHION_MNIST)}

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist/"
DEBIAN_HINT = ("install it with `apt-get install dataset-fashion-mnist`, give IDX files or a folder, "
               "or use --download fashion-mnist when online")


def identify(train_images_sha256: str, train_images_raw_sha256: str) -> KnownDataset | None:
    """The known data set whose training images these are, recognised by content."""
    for dataset in KNOWN.values():
        if dataset.accepts("train_images", train_images_sha256, train_images_raw_sha256):
            return dataset
    return None


def class_names(dataset: KnownDataset | None, num_classes: int) -> list[str]:
    """Names for the classes: the known data set's, else "0".."K-1"."""
    if dataset is not None:
        return list(dataset.class_names)
    return [str(i) for i in range(num_classes)]
