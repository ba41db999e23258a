import pytest
import torch
from conftest import ALL_BACKENDS, assert_close_scaled

from mace_kernels import closed_form_edit


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,outs", [(7, [5, 1, 37]), (123, [64, 33])])
def test_matches_per_layer_matmul(backend, wdtype, tdtype, d, outs):
    weights = [torch.randn(o, d).to(wdtype) for o in outs]
    T = torch.randn(d, d, dtype=tdtype)
    got = closed_form_edit(weights, T, backend=backend)
    assert [g.shape for g in got] == [w.shape for w in weights]
    assert all(g.dtype == wdtype for g in got)
    for g, w in zip(got, weights, strict=True):
        ref = (w.double() @ T.double()).to(wdtype)
        assert_close_scaled(g, ref, wdtype if wdtype != torch.float64 else tdtype)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(out, 8\)"):
        closed_form_edit([torch.randn(3, 8), torch.randn(3, 7)], torch.randn(8, 8))
    with pytest.raises(ValueError, match="transform must be"):
        closed_form_edit([torch.randn(3, 8)], torch.randn(8, 7))
    with pytest.raises(ValueError, match="empty"):
        closed_form_edit([], torch.randn(8, 8))
