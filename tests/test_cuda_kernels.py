"""The dedicated CUDA kernels (ddp_cnn/model/cuda_kernels.py) against their generic NumPy twins."""
import numpy as np
import pytest

from ddp_cnn.model import kernels
from ddp_cnn.system.backend import gpu_available
from helpers import GPU_REASON

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason=GPU_REASON)]

CASES = [  # (H, W, C, KH, KW, stride, padding)
    (7, 6, 3, 3, 3, 1, "valid"), (7, 7, 2, 3, 3, 1, "same"), (8, 7, 4, 3, 3, 2, "same"), (6, 6, 1, 5, 5, 1, "same"),
    (9, 9, 2, 2, 2, 3, "valid"), (5, 8, 3, 1, 3, 1, 1), (6, 6, 2, 2, 2, 2, "valid"), (7, 7, 3, 3, 3, 2, 1)]


def geometry(h, w, kh, kw, stride, padding):
    pads = kernels.resolve_padding(padding, (h, w), (kh, kw), stride)
    oh = kernels.conv_out_size(h, kh, stride, *pads[0])
    ow = kernels.conv_out_size(w, kw, stride, *pads[1])
    return pads, oh, ow


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("h,w,c,kh,kw,stride,padding", CASES)
def test_im2col_and_col2im_match_the_generic_pair(dtype, h, w, c, kh, kw, stride, padding):
    import cupy
    from ddp_cnn.model import cuda_kernels as ck
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, h, w, c)).astype(dtype)
    pads, oh, ow = geometry(h, w, kh, kw, stride, padding)
    want = kernels.im2col(kernels.pad_nhwc(x, pads), kh, kw, stride, oh, ow)
    got = ck.im2col(cupy.asarray(x), kh, kw, stride, pads, oh, ow)
    assert np.array_equal(cupy.asnumpy(got), want)
    dcols = rng.standard_normal(want.shape).astype(dtype)
    padded = kernels.pad_nhwc(x, pads).shape
    want_dx = kernels.unpad_nhwc(kernels.col2im(dcols, padded, kh, kw, stride, oh, ow), pads)
    got_dx = cupy.asnumpy(ck.col2im(cupy.asarray(dcols), x.shape, kh, kw, stride, pads, oh, ow))
    assert np.allclose(got_dx, want_dx, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)


@pytest.mark.parametrize("h,w,c,kh,kw,stride,padding", [(6, 8, 3, 2, 2, 2, 0), (5, 5, 2, 2, 2, 2, 0),
                                                       (7, 7, 2, 3, 3, 2, 1), (6, 6, 1, 3, 3, 1, 0)])
def test_maxpool_kernels_match_the_layer_on_numpy(h, w, c, kh, kw, stride, padding):
    import cupy
    from ddp_cnn.model import cuda_kernels as ck
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.model.layers import Pool2D
    from ddp_cnn.model import Sequential
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, h, w, c))
    layer = Pool2D((kh, kw), stride, padding, "max")
    Sequential([layer], (h, w, c), get_backend("cpu", "float64"))
    want_y = layer.forward(x, train=True)
    dy = rng.standard_normal(want_y.shape)
    want_dx = layer.backward(dy)
    pads, oh, ow = layer.pads, layer.oh, layer.ow
    y, arg = ck.maxpool_forward(cupy.asarray(x), kh, kw, stride, pads, oh, ow)
    dx = ck.maxpool_backward(cupy.asarray(dy), arg, x.shape, kh, kw, stride, pads, oh, ow)
    assert np.array_equal(cupy.asnumpy(y), want_y)
    assert np.allclose(cupy.asnumpy(dx), want_dx, rtol=1e-13, atol=1e-15)


def test_fused_adam_matches_the_numpy_update():
    import cupy
    from ddp_cnn.model import optim
    rng = np.random.default_rng(2)
    p0, gs = rng.standard_normal(1000), [rng.standard_normal(1000) for _ in range(3)]
    results = []
    for xp in (np, cupy):
        p, g = xp.asarray(p0.copy()), xp.zeros(1000)
        opt = optim.create("adam", p, g, 0.01)
        for gi in gs:
            g[...] = xp.asarray(gi)
            opt.step()
        results.append(cupy.asnumpy(p) if xp is cupy else p)
    assert np.allclose(results[0], results[1], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (7, 4), (0, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_on_the_gpu_matches_the_cpu_path(shape, train):
    from ddp_cnn.system.backend import get_backend, to_host
    from ddp_cnn.model.layers import BatchNorm
    from ddp_cnn.model import Sequential
    rng = np.random.default_rng(2)
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    results = []
    for device in ("cpu", "gpu"):
        bk = get_backend(device, "float64")
        layer = BatchNorm(momentum=0.3)
        model = Sequential([layer], shape[1:], bk)
        model.params[...] = bk.xp.asarray(rng.standard_normal(model.num_params) if not results
                                          else to_host(results[0][4]))
        layer.buffers["running_mean"][...] = 0.5
        layer.buffers["running_var"][...] = 2.0
        y = layer.forward(bk.xp.asarray(x), train=train)
        dx = layer.backward(bk.xp.asarray(dy))
        results.append([to_host(a).copy() for a in (y, dx, model.grads, layer.buffers["running_mean"],
                                                       model.params, layer.buffers["running_var"])])
    for want, got in zip(*results):
        assert got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-11, atol=1e-12)


def test_dropout_masks_on_the_gpu_are_keyed_unbiased_and_uncorrelated():
    import cupy
    shape, p = (64, 28, 28, 32), 0.3
    a = cupy.asnumpy(kernels.dropout_mask(shape, p, (0, 1, 0, 5, 2), cupy, np.float32))
    again = cupy.asnumpy(kernels.dropout_mask(shape, p, (0, 1, 0, 5, 2), cupy, np.float32))
    other = cupy.asnumpy(kernels.dropout_mask(shape, p, (0, 1, 0, 6, 2), cupy, np.float32))
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    assert set(np.unique(a).tolist()) == {0.0, np.float32(1 / 0.7)}
    kept = (a > 0).ravel()
    assert abs(kept.mean() - 0.7) < 0.002  # 1.6 M draws: the standard error is 0.00036
    assert abs(np.corrcoef(kept[:-1], kept[1:])[0, 1]) < 0.005
    assert abs(np.corrcoef(kept, (other > 0).ravel())[0, 1]) < 0.005
