import pytest
import torch
from conftest import ALL_BACKENDS, assert_close_scaled

from mace_kernels import token_covariance

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(n, d, e, dtype):
    x = torch.randn(n, d).to(dtype)
    y = torch.randn(n, e).to(dtype) if e else None
    return x, y


def _oracle(x, y, seg, S, w):
    """Independent float64 oracle: one einsum per segment."""
    x64 = x.double()
    w64 = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.double()
    cxx = torch.zeros(S, x.shape[1], x.shape[1], dtype=torch.float64)
    cyx = torch.zeros(S, y.shape[1], x.shape[1], dtype=torch.float64) if y is not None else None
    for s in range(S):
        sel = seg == s
        cxx[s] = torch.einsum("t,ti,tj->ij", w64[sel], x64[sel], x64[sel])
        if y is not None:
            cyx[s] = torch.einsum("t,ti,tj->ij", w64[sel], y.double()[sel], x64[sel])
    return cxx, cyx


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,e", [(1, 7, 0), (5, 7, 3), (37, 123, 17), (129, 64, 64)])
def test_unsegmented_matches_oracle(backend, dtype, n, d, e):
    x, y = _inputs(n, d, e, dtype)
    cxx, cyx = token_covariance(x, y, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert cxx.shape == (d, d) and cxx.dtype == acc
    ref_xx, ref_yx = _oracle(x, y, torch.zeros(n, dtype=torch.long), 1, None)
    assert_close_scaled(cxx.double(), ref_xx[0], acc)
    assert torch.equal(cxx, cxx.T), "cxx must be exactly symmetric"
    if e:
        assert cyx.shape == (e, d)
        assert_close_scaled(cyx.double(), ref_yx[0], acc)
    else:
        assert cyx is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segments_mask_and_weights(backend, dtype):
    n, d, e, S = 70, 123, 9, 6
    x, y = _inputs(n, d, e, dtype)
    seg = torch.randint(0, S, (n,))
    seg[seg == 2] = 3  # segment 2 empty
    seg[seg == 4] = 5
    seg[0] = 4  # segment 4 holds a single token
    mask = torch.rand(n) > 0.2
    mask[0] = True
    w = torch.rand(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    cxx, cyx = token_covariance(x, y, mask=mask, segment_ids=seg, num_segments=S, weights=w, backend=backend)
    assert cxx.shape == (S, d, d) and cyx.shape == (S, e, d)
    ref_xx, ref_yx = _oracle(x, y, torch.where(mask, seg, -1), S, w)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_scaled(cxx.double(), ref_xx, acc)
    assert_close_scaled(cyx.double(), ref_yx, acc)
    assert float(cxx[2].abs().max()) == 0.0, "an empty segment must give zeros"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sd_width_against_reference(backend):
    x, y = _inputs(300, 768, 0, torch.float16)
    seg = torch.randint(0, 3, (300,))
    cxx, _ = token_covariance(x, segment_ids=seg, num_segments=3, backend=backend)
    oracle, _ = _oracle(x, None, seg, 3, None)
    assert_close_scaled(cxx.double(), oracle, torch.float32)
    if backend != "torch":  # and agrees with the reference backend
        ref, _ = token_covariance(x, segment_ids=seg, num_segments=3, backend="torch")
        assert_close_scaled(cxx, ref, torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_many_segments_match_reference(backend):
    x, y = _inputs(400, 16, 5, torch.float32)
    seg = torch.randint(0, 150, (400,))
    cxx, cyx = token_covariance(x, y, segment_ids=seg, num_segments=150, backend=backend)
    ref_xx, ref_yx = _oracle(x, y, seg, 150, None)
    assert_close_scaled(cxx.double(), ref_xx, torch.float32)
    assert_close_scaled(cyx.double(), ref_yx, torch.float32)


def test_bad_inputs_name_the_problem():
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="x must be a"):
        token_covariance(torch.randn(10))
    with pytest.raises(ValueError, match="y must be"):
        token_covariance(x, torch.randn(9, 4))
    with pytest.raises(TypeError, match="share a dtype"):
        token_covariance(x, torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"segment ids outside \[0, 3\)"):
        token_covariance(x, segment_ids=torch.tensor([0, 1, 2, 3, 0, 0, 0, 0, 0, 0]), num_segments=3)
    with pytest.raises(ValueError, match="outside"):
        token_covariance(x, segment_ids=torch.full((10,), -1), num_segments=3)
    with pytest.raises(ValueError, match="needs num_segments"):
        token_covariance(x, segment_ids=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be"):
        token_covariance(x, mask=torch.ones(10))
    with pytest.raises(ValueError, match="weights must be"):
        token_covariance(x, weights=torch.ones(3))
