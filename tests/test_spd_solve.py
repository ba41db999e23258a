import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import ALL_BACKENDS

from mace_kernels import NotPositiveDefiniteError, SPDJitterWarning, spd_solve


def _spd(batch, d, cond=1e3, dtype=torch.float64):
    Q, _ = torch.linalg.qr(torch.randn(*batch, d, d, dtype=torch.float64))
    eig = torch.logspace(0, np.log10(cond), d, dtype=torch.float64)
    M = Q @ torch.diag_embed(eig.expand(*batch, d)) @ Q.mT
    return ((M + M.mT) / 2).to(dtype)


def _oracle(M, R):
    """Independent float64 oracle: scipy's LAPACK solve of M^T X^T = R^T per batch item."""
    Mn = M.double().numpy().reshape(-1, *M.shape[-2:])
    Rn = np.broadcast_to(R.double().numpy(), (*M.shape[:-2], *R.shape[-2:])).reshape(-1, *R.shape[-2:])
    X = np.stack([scipy.linalg.solve(m.T, r.T, assume_a="pos").T for m, r in zip(Mn, Rn, strict=True)])
    return torch.from_numpy(X.reshape(*M.shape[:-2], *R.shape[-2:]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,d,m", [((), 7, 1), ((3,), 7, 5), ((2, 2), 33, 40), ((), 123, 17), ((), 768, 50)])
def test_matches_scipy_oracle_and_residual(backend, dtype, batch, d, m):
    M = _spd(batch, d, dtype=dtype)
    R = torch.randn(*batch, m, d, dtype=dtype)
    X = spd_solve(M, R, backend=backend)
    assert X.shape == R.shape and X.dtype == dtype
    ref = _oracle(M, R)
    # cond(M) = 1e3: float64 keeps ~12 digits, float32 ~3-4.
    rtol = 1e-9 if dtype == torch.float64 else 2e-3
    err = (X.double() - ref).norm() / ref.norm()
    assert float(err) < rtol
    # A backward-stable solve leaves a relative residual of at most ~ eps * cond(M).
    residual = (X.double() @ M.double() - R.double()).norm() / R.double().norm()
    eps = torch.finfo(dtype).eps
    assert float(residual) < eps * 1e3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shared_matrix_broadcasts_over_rhs_batches(backend):
    M = _spd((), 16)
    R = torch.randn(4, 3, 16, dtype=torch.float64)
    X = spd_solve(M, R, backend=backend)
    assert X.shape == (4, 3, 16)
    torch.testing.assert_close(X, _oracle(M.expand(4, 16, 16), R), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_not_positive_definite_names_the_batch_item(backend):
    M = _spd((3,), 10)
    M[1, 4, 4] = -5.0
    with pytest.raises(NotPositiveDefiniteError, match=r"\[\(1,\)\]") as info:
        spd_solve(M, torch.randn(3, 2, 10, dtype=torch.float64), backend=backend)
    assert info.value.failed == [(1,)]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singular_lam_zero_raises_never_nan(backend, dtype):
    # MACE with lam = 0 and fewer tokens than dimensions: a rank-deficient covariance.
    tokens = torch.randn(5, 24, dtype=torch.float64)
    M = (tokens.T @ tokens).to(dtype)
    R = torch.randn(3, 24, dtype=dtype)
    with pytest.raises(NotPositiveDefiniteError, match="not numerically positive definite"):
        spd_solve(M, R, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jitter_is_added_and_reported(backend):
    tokens = torch.randn(5, 24, dtype=torch.float64)
    M = torch.stack([tokens.T @ tokens, _spd((), 24)])
    R = torch.randn(2, 3, 24, dtype=torch.float64)
    with pytest.warns(SPDJitterWarning, match=r"\(0,\)"):
        X, info = spd_solve(M, R, jitter=1e-8, return_info=True, backend=backend)
    assert torch.isfinite(X).all()
    assert float(info.jitter[0]) > 0 and float(info.jitter[1]) == 0
    jittered = M[0] + info.jitter[0] * torch.eye(24, dtype=torch.float64)
    residual = (X[0] @ jittered - R[0]).norm() / R[0].norm()
    assert float(residual) < 1e-6


def test_low_precision_inputs_solve_in_float32():
    M = _spd((), 12).float()
    R = torch.randn(4, 12).half()
    X = spd_solve(M, R)
    assert X.dtype == torch.float32
    torch.testing.assert_close(X.double(), _oracle(M, R.float()), rtol=2e-3, atol=1e-4)


def test_bad_inputs():
    M = _spd((), 6)
    with pytest.raises(ValueError, match="M must be"):
        spd_solve(M[:, :5], torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"R must be \(\.\.\., m, 6\)"):
        spd_solve(M, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="not symmetric"):
        spd_solve(M + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1), torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        bad = M.clone()
        bad[0, 0] = float("nan")
        spd_solve(bad, torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not broadcast"):
        spd_solve(_spd((3,), 6), torch.randn(2, 4, 6, dtype=torch.float64))
