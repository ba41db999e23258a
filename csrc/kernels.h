// Hand-written CPU kernels of the mace_kernels extension (no torch headers).
//
// These are the loops that BLAS does not cover (or covers slowly): dtype-converting row
// gathers, a small unblocked Cholesky and triangular solves for blocks of right-hand sides. kernels.cpp compiles
// each of them for AVX-512, AVX2 and baseline x86-64 (GCC target_clones) and picks the best
// at load time, since setup.py builds without -march flags.
#pragma once

#include <cstdint>

namespace mace_kernels::kern {

// Element types a gather can read (fp16 and bf16 are read as their raw 16-bit patterns).
enum class SrcType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Gathers nrows rows of a row-major (., ncols) matrix, converting to the accumulation type.
//   source row of output row i: idx[i] when idx is non-null, else row0 + i.
//   w (nullable): per-source-row weights. Without w: dst = x. With w and dst_w null:
//   dst = w * x. With w and dst_w: dst = x and dst_w = w * x.
void gather_rows(SrcType st, const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,
                 int64_t nrows, int64_t ncols, const float* w, float* dst, int64_t dst_ld,
                 float* dst_w, int64_t dstw_ld);
void gather_rows(SrcType st, const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,
                 int64_t nrows, int64_t ncols, const double* w, double* dst, int64_t dst_ld,
                 double* dst_w, int64_t dstw_ld);

// C (d x d, leading dimension ld): copies the upper triangle onto the strict lower one.
void mirror_upper(float* c, int64_t d, int64_t ld);
void mirror_upper(double* c, int64_t d, int64_t ld);

// In place lower Cholesky of a d x d row-major matrix whose lower triangle holds M (the
// strict upper triangle is not read). Returns 0, or k > 0 when the leading minor of order k
// is not positive definite; rows k-1.. are then zeroed.
int64_t cholesky_lower(float* a, int64_t d, int64_t ld);
int64_t cholesky_lower(double* a, int64_t d, int64_t ld);

// Triangular solves for a block of mb right-hand sides (mb = 8, 16, 32 or 64) held
// transposed: xt[j * mb + i] is column j of right-hand side i, j < w. L (lower) and U = L^T
// (upper) are w x w row-major with leading dimension ld.
// mode 1: Z L^T = B (forward), mode 2: X L = Z (backward), mode 3: both, i.e. X L L^T = B.
void tri_solve_block(const float* L, const float* U, int64_t ld, int64_t w, float* xt, int mb,
                     int mode);
void tri_solve_block(const double* L, const double* U, int64_t ld, int64_t w, double* xt, int mb,
                     int mode);

// xt (d x mb) = transpose of the nb rows (d columns) of r (row-major, ld), zero-padded to
// mb rows.
void load_transposed(const float* r, int64_t ld, int64_t nb, int64_t d, float* xt, int mb);
void load_transposed(const double* r, int64_t ld, int64_t nb, int64_t d, double* xt, int mb);
// Rows 0..nb-1 of x (row-major, ld) = transpose of xt (d x mb).
void store_transposed(const float* xt, int mb, int64_t nb, int64_t d, float* x, int64_t ld);
void store_transposed(const double* xt, int mb, int64_t nb, int64_t d, double* x, int64_t ld);

}  // namespace mace_kernels::kern
