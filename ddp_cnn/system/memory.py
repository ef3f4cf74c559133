"""What a model needs in memory, known from its layers' shapes before anything is allocated.

A layer of 10^9 units (a typo in a model file, a stored description, a
``--width``) would otherwise be allocated as far as memory goes and end in
a traceback.  Building a layer fixes shapes only; from them come the
parameter count and the activations of one image, so a model that cannot
fit is refused with one line naming its largest layer and the size.  The
figures are lower bounds (what is kept per layer, not every temporary), so
a model refused here could never have run; one that passes may still be
tight.
"""
from __future__ import annotations

import math
from pathlib import Path


class TooLarge(ValueError):
    """A model, or one batch of it, that does not fit in the memory available."""


def param_count(layer) -> int:
    return sum(math.prod(spec.shape) for spec in layer.param_specs())


def activations_per_image(layer) -> int:
    """Values a training step keeps for one image in this layer: its output and the gradient
    for its input, plus a convolution's im2col rows."""
    if type(layer).__name__ == "Flatten":  # a view of its input, both ways
        return 0
    out = math.prod(layer.output_shape) + math.prod(layer.input_shape)
    if hasattr(layer, "k"):  # Conv2D: (OH*OW, KH*KW*C) rows per image
        out += layer.oh * layer.ow * layer.k
    return out


def _produced(layer) -> int:
    """What a layer adds itself (its output, a convolution's rows): how the message picks the layer to name."""
    if type(layer).__name__ == "Flatten":
        return 0
    return math.prod(layer.output_shape) + (layer.oh * layer.ow * layer.k if hasattr(layer, "k") else 0)


def available_bytes(backend) -> int | None:
    """Memory this process can still get on ``backend``'s device (None: unknown)."""
    if backend.is_gpu:
        try:
            free, _ = backend.xp.cuda.runtime.memGetInfo()
            return int(free) + int(backend.xp.get_default_memory_pool().free_bytes())
        except Exception:  # no runtime to ask: nothing to refuse by
            return None
    return _host_available()


def _host_available() -> int | None:
    """MemAvailable, lowered by this process's cgroup (v2) limit and its address-space limit."""
    bounds = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        bounds.append(int(next(l for l in meminfo.splitlines() if l.startswith("MemAvailable:")).split()[1]) * 1024)
    except (OSError, ValueError, StopIteration):
        pass
    try:  # a cgroup limit below the machine's: what a SLURM job or a container may use (v2, else v1)
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, where = line.split(":", 2)
            v2 = controllers == ""
            if v2 or "memory" in controllers.split(","):
                group = Path("/sys/fs/cgroup") / ("" if v2 else "memory") / where.strip().lstrip("/")
                names = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
                if (group / names[0]).is_file():
                    limit = (group / names[0]).read_text().strip()
                    if limit != "max" and int(limit) < 2 ** 60:  # v1 writes "no limit" as a huge number
                        bounds.append(int(limit) - int((group / names[1]).read_text()))
    except (OSError, ValueError):
        pass
    try:  # an address-space limit (ulimit -v, as some clusters set): what is left of it
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text()
            bounds.append(limit - int(next(l for l in status.splitlines() if l.startswith("VmSize:")).split()[1]) * 1024)
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    return min(bounds) if bounds else None


def size_text(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return ""


def _layer_text(layers, i: int) -> str:
    return f"layer {i + 1} {layers[i].name!r} ({type(layers[i]).__name__})"


def check_model(name: str, layers, backend, available: int | None = None) -> None:
    """TooLarge unless ``layers`` (built, not allocated) fit with their gradients and one image's
    activations.  Parameters cost a float64 copy at initialisation plus the parameters, their gradients
    and the cast in between in the backend's precision."""
    available = available_bytes(backend) if available is None else available
    if available is None:
        return
    itemsize = _itemsize(backend)
    counts = [param_count(layer) for layer in layers]
    per_image = [activations_per_image(layer) for layer in layers]
    need = sum(counts) * (8 + 3 * itemsize) + sum(per_image) * itemsize
    if need <= available:
        return
    big = max(range(len(layers)), key=lambda i: counts[i] * (8 + 3 * itemsize) + _produced(layers[i]) * itemsize)
    if counts[big] * (8 + 3 * itemsize) >= _produced(layers[big]) * itemsize:
        what = f"{counts[big]:,} parameters"
    else:
        what = f"{_produced(layers[big]):,} values per image"
    raise TooLarge(f"model {name!r} does not fit in memory: {_layer_text(layers, big)} has {what}; the model needs "
                   f"at least {size_text(need)}, {size_text(available)} is available on {backend.name}")


def check_batch(name: str, layers, backend, batch: int, setting: str, available: int | None = None) -> None:
    """TooLarge unless one training batch of ``batch`` images per rank fits beside the allocated model
    (``setting`` names the flags that made the number)."""
    available = available_bytes(backend) if available is None else available
    if available is None:
        return
    itemsize = _itemsize(backend)
    per_image = [activations_per_image(layer) for layer in layers]
    need = sum(per_image) * itemsize * batch
    if need <= available:
        return
    big = max(range(len(layers)), key=lambda i: _produced(layers[i]))
    raise TooLarge(f"{setting}: one batch of model {name!r} needs at least {size_text(need)} of activations "
                   f"({_layer_text(layers, big)}: {_produced(layers[big]):,} values per image), "
                   f"{size_text(available)} is available on {backend.name}; use a smaller batch per rank (--accumulate, more ranks) or a "
                   "smaller model")


def _itemsize(backend) -> int:
    import numpy as np
    return np.dtype(backend.dtype).itemsize
