// cholesky and cholesky_solve for spd_solve: X (L L^T) = R with many right-hand sides.
//
// The factorisation of small matrices (the many-small-systems case, where one LAPACK call per
// item loses to its overhead) uses the kernel of kernels.cpp, parallel over batch items; large
// ones go to LAPACK through ATen. The solve is blocked over column blocks of 64 (GEMM updates
// plus substitution kernels on the diagonal blocks) and parallel over panels of right-hand
// sides, so one factor with 25k right-hand sides and many small systems both use all threads.
#include <torch/library.h>

#include <memory>

#include "common.h"

namespace mace_kernels {
namespace {

constexpr int64_t kSmallCholeskyMaxD = 128;
constexpr int64_t kBatchedCholeskyMaxD = 256;

template <typename T>
void cholesky_small(const at::Tensor& M, at::Tensor& L, at::Tensor& info) {
  const int64_t B = M.size(0), d = M.size(1);
  const T* m = M.data_ptr<T>();
  T* l = L.data_ptr<T>();
  int32_t* inf = info.data_ptr<int32_t>();
  const int64_t flops = std::max<int64_t>(1, d * d * d / 3);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / flops);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* mb = m + b * d * d;
      T* lb = l + b * d * d;
      for (int64_t i = 0; i < d; ++i) {
        std::copy(mb + i * d, mb + i * d + i + 1, lb + i * d);
        std::fill(lb + i * d + i + 1, lb + (i + 1) * d, T(0));
      }
      inf[b] = static_cast<int32_t>(kern::cholesky_lower(lb, d, d));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cholesky(const at::Tensor& M_in) {
  TORCH_CHECK(M_in.dim() == 3 && M_in.size(1) == M_in.size(2), "cholesky: M must be (B, d, d), got ",
              M_in.sizes());
  TORCH_CHECK(M_in.scalar_type() == at::kFloat || M_in.scalar_type() == at::kDouble,
              "cholesky: M must be float32 or float64, got ", M_in.scalar_type());
  const at::Tensor M = M_in.contiguous();
  const int64_t B = M.size(0), d = M.size(1);
  // Own kernel: small matrices, or a batch of mid-sized ones (parallel over items); LAPACK
  // (multi-threaded) wins for a single larger matrix.
  const bool own = d <= kSmallCholeskyMaxD || (d <= kBatchedCholeskyMaxD && B >= 2);
  if (!own) {
    // L comes back in LAPACK's column-major layout; cholesky_solve accepts any layout.
    auto [L, info] = at::linalg_cholesky_ex(M, /*upper=*/false, /*check_errors=*/false);
    return {L, info.to(at::kInt)};
  }
  at::Tensor L = at::empty_like(M);
  at::Tensor info = at::zeros({B}, M.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "mace_kernels::cholesky",
                             [&] { cholesky_small<scalar_t>(M, L, info); });
  return {L, info};
}

// Right-hand sides per kernel block: the transposed block (w x mb) should stay in L1.
template <typename T>
int solve_block_width(int64_t w, int64_t m) {
  int mb = 64;
  while (mb > 8 && w * mb * static_cast<int64_t>(sizeof(T)) > (32 << 10)) mb /= 2;
  while (mb > 8 && m <= mb / 2) mb /= 2;
  return mb;
}

template <typename T>
struct SolveProblem {
  const T* l;     // (B, d, d) lower factors
  const T* u;     // (B, d, d) their transposes
  T* x;           // (B, m, d) right-hand sides, solved in place
  int64_t m, d, panel, panels;
  int mb;
};

// Columns [j0, j0 + w) of nb rows of x (ld d): a triangular solve with the diagonal block
// (mode 1 forward, 2 backward, 3 both when the block is the whole matrix), mb rows at a time.
template <typename T>
void solve_diag_block(const SolveProblem<T>& p, const T* l, const T* u, int64_t j0, int64_t w,
                      T* x, int64_t nb, T* xt, int mode) {
  const int64_t d = p.d;
  for (int64_t r0 = 0; r0 < nb; r0 += p.mb) {
    const int64_t rows = std::min<int64_t>(p.mb, nb - r0);
    T* xb = x + r0 * d + j0;
    kern::load_transposed(xb, d, rows, w, xt, p.mb);
    kern::tri_solve_block(l + j0 * d + j0, u + j0 * d + j0, d, w, xt, p.mb, mode);
    kern::store_transposed(xt, p.mb, rows, w, xb, d);
  }
}

// Diagonal block width of the solve. 64 rather than 128: shorter substitution chains, and
// measured errors at or below LAPACK's (128 was 10-20% above at d = 200..768).
constexpr int64_t kSolveBlock = 64;

// One panel of nb rows (ld d), in place, blocked by column blocks J and right-looking:
// forward Z L^T = R: Z_J = X_J L_JJ^-T, then X_{>J} -= Z_J L_{>J,J}^T; backward X L = Z:
// X_J = X_J L_JJ^-1, then X_{<J} -= X_J L_{J,<J}. The GEMM updates carry most of the flops;
// the diagonal blocks use the substitution kernels (BLAS trsm is much slower on small
// blocks). Rounding each block's update into X keeps the accumulation chains short
// (left-looking updates over all previous blocks at once measured 20-30% larger errors at
// d = 768).
template <typename T>
void solve_panel(const SolveProblem<T>& p, int64_t b, int64_t r0, T* xt) {
  const int64_t d = p.d;
  const T* l = p.l + b * d * d;
  const T* u = p.u + b * d * d;
  T* x = p.x + (b * p.m + r0) * d;
  const int64_t nb = std::min(p.panel, p.m - r0);
  if (d <= kSolveBlock) {
    solve_diag_block(p, l, u, 0, d, x, nb, xt, 3);
    return;
  }
  for (int64_t j0 = 0; j0 < d; j0 += kSolveBlock) {
    const int64_t w = std::min(kSolveBlock, d - j0), j1 = j0 + w;
    solve_diag_block(p, l, u, j0, w, x, nb, xt, 1);
    if (j1 < d) {
      gemm<T>(false, true, nb, d - j1, w, T(-1), x + j0, d, l + j1 * d + j0, d, T(1), x + j1, d);
    }
  }
  for (int64_t j0 = ((d - 1) / kSolveBlock) * kSolveBlock; j0 >= 0; j0 -= kSolveBlock) {
    const int64_t w = std::min(kSolveBlock, d - j0);
    solve_diag_block(p, l, u, j0, w, x, nb, xt, 2);
    if (j0 > 0) gemm<T>(false, false, nb, j0, w, T(-1), x + j0, d, l + j0 * d, d, T(1), x, d);
  }
}

template <typename T>
void solve(const at::Tensor& L, const at::Tensor& U, at::Tensor& X) {
  const int64_t B = X.size(0), m = X.size(1), d = X.size(2);
  SolveProblem<T> p;
  p.l = L.data_ptr<T>();
  p.u = U.data_ptr<T>();
  p.x = X.data_ptr<T>();
  p.m = m;
  p.d = d;
  const int64_t w = std::min(d, kSolveBlock);
  p.mb = solve_block_width<T>(w, m);
  // Panels of rows that stay in L2 while every column block passes over them.
  const int64_t rows_l2 = (int64_t(1) << 19) / (d * static_cast<int64_t>(sizeof(T)));
  p.panel = std::max<int64_t>(p.mb, rows_l2 / p.mb * p.mb);
  p.panels = (m + p.panel - 1) / p.panel;
  auto make_state = [&]() { return std::unique_ptr<T[]>(new T[w * p.mb]); };
  auto body = [&](std::unique_ptr<T[]>& xt, int64_t item) {
    solve_panel(p, item / p.panels, (item % p.panels) * p.panel, xt.get());
  };
  const int64_t items = B * p.panels;
  if (B * m * d * d < (int64_t(1) << 17)) {  // too small to pay for a parallel region
    auto state = make_state();
    for (int64_t i = 0; i < items; ++i) body(state, i);
  } else {
    parallel_items(items, make_state, body);
  }
}

at::Tensor cholesky_solve(const at::Tensor& L_in, const at::Tensor& R_in) {
  TORCH_CHECK(L_in.dim() == 3 && L_in.size(1) == L_in.size(2),
              "cholesky_solve: L must be (B, d, d), got ", L_in.sizes());
  TORCH_CHECK(R_in.dim() == 3 && R_in.size(0) == L_in.size(0) && R_in.size(2) == L_in.size(2),
              "cholesky_solve: R must be (B, m, d) matching L ", L_in.sizes(), ", got ", R_in.sizes());
  TORCH_CHECK(L_in.scalar_type() == R_in.scalar_type() &&
                  (L_in.scalar_type() == at::kFloat || L_in.scalar_type() == at::kDouble),
              "cholesky_solve: L and R must both be float32 or float64, got ", L_in.scalar_type(),
              " and ", R_in.scalar_type());
  at::Tensor X = R_in.clone(at::MemoryFormat::Contiguous);
  if (X.numel() == 0) return X;
  // Row-major L and U = L^T; one of them is a free view when L comes from LAPACK.
  const at::Tensor L = L_in.contiguous();
  const at::Tensor U = L_in.transpose(1, 2).contiguous();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mace_kernels::cholesky_solve",
                             [&] { solve<scalar_t>(L, U, X); });
  return X;
}

}  // namespace

TORCH_LIBRARY_IMPL(mace_kernels, CPU, m) {
  m.impl("cholesky", &cholesky);
  m.impl("cholesky_solve", &cholesky_solve);
}

}  // namespace mace_kernels
