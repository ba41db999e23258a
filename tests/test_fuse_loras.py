import pytest
import torch
from conftest import ALL_BACKENDS, assert_close_scaled

from mace_kernels import fuse_loras


def _problem(n, r, d, outs, dtype, cdtype):
    A = [torch.randn(n, r, d).to(dtype) for _ in outs]
    B = [torch.randn(n, o, r).to(dtype) for o in outs]
    X = torch.randn(n, 3 * d, d, dtype=torch.float64)
    C = (X.mT @ X / d).to(cdtype)
    return A, B, C


def _oracle(A, B, C, base=None, T=None):
    outs = []
    for lay, (a, b) in enumerate(zip(A, B, strict=True)):
        out = torch.einsum("ior,ird,ide->oe", b.double(), a.double(), C.double())
        if base is not None:
            out = out + base[lay].double() @ T.double()
        outs.append(out)
    return outs


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,r,d,outs", [(1, 1, 7, [5]), (5, 3, 7, [5, 1, 37]), (12, 4, 123, [64, 33, 16])])
def test_matches_oracle(backend, dtype, cdtype, n, r, d, outs):
    A, B, C = _problem(n, r, d, outs, dtype, cdtype)
    got = fuse_loras(A, B, C, backend=backend)
    ref = _oracle(A, B, C)
    assert len(got) == len(ref) == len(outs)
    for g, e in zip(got, ref, strict=True):
        assert g.dtype == cdtype
        assert_close_scaled(g.double(), e, cdtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("cdtype", [torch.float32, torch.float64])
def test_with_base_term(backend, cdtype):
    outs, d = [5, 40, 17], 19
    A, B, C = _problem(4, 2, d, outs, torch.float32, cdtype)
    base = [torch.randn(o, d) for o in outs]
    T = torch.randn(d, d, dtype=cdtype)
    got = fuse_loras(A, B, C, base=base, base_transform=T, backend=backend)
    assert len(got) == len(outs)
    for g, e in zip(got, _oracle(A, B, C, base, T), strict=True):
        assert_close_scaled(g.double(), e, cdtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rectangular_base_stacks_two_terms(backend):
    """base (out, 2d) @ base_transform (2d, d) = W T + W0 T0, as the fusion with preservation uses."""
    outs, d = [6, 11], 9
    A, B, C = _problem(3, 1, d, outs, torch.float32, torch.float64)
    W = [torch.randn(o, d, dtype=torch.float64) for o in outs]
    W0 = [torch.randn(o, d, dtype=torch.float64) for o in outs]
    T, T0 = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    got = fuse_loras(A, B, C, base=[torch.cat([w, w0], 1) for w, w0 in zip(W, W0, strict=True)],
                     base_transform=torch.cat([T, T0]), backend=backend)
    assert len(got) == len(outs)
    for g, e, w0 in zip(got, _oracle(A, B, C, W, T), W0, strict=True):
        assert_close_scaled(g, e + w0 @ T0, torch.float64)


def test_bad_inputs():
    A, B, C = _problem(3, 2, 8, [4, 5], torch.float32, torch.float32)
    with pytest.raises(ValueError, match="same layers"):
        fuse_loras(A, B[:1], C)
    with pytest.raises(ValueError, match=r"A\[1\] must be \(3, 2, 8\)"):
        fuse_loras([A[0], A[1][:, :1]], B, C)
    with pytest.raises(ValueError, match=r"B\[0\] must be"):
        fuse_loras(A, [B[0][:2], B[1]], C)
    with pytest.raises(ValueError, match="C must be"):
        fuse_loras(A, B, C[:, :, :7])
    with pytest.raises(ValueError, match="go together"):
        fuse_loras(A, B, C, base=[torch.randn(4, 8), torch.randn(5, 8)])
