// Hand-written CPU kernels of the mace_kernels extension; see kernels.h.
//
// Every exported kernel is a thin wrapper compiled three times (AVX-512, AVX2+FMA+F16C and
// baseline x86-64) around an always-inline template, so the loops below are vectorised for
// the machine the extension runs on even though setup.py passes no -march flag.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    (__GNUC__ >= 12)
#define MK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MK_CLONES
#endif

#if defined(__GNUC__)
#define MK_INLINE inline __attribute__((always_inline))
#else
#define MK_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__FLT16_MAX__)
#define MK_HAVE_FLOAT16 1
typedef _Float16 mk_f16_alias __attribute__((may_alias));
#endif

namespace mace_kernels::kern {
namespace detail {

// ------------------------------------------------------------------------- conversions

MK_INLINE float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

#ifndef MK_HAVE_FLOAT16
MK_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: mant * 2^-24
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    uint32_t fb;
    std::memcpy(&fb, &f, sizeof(fb));
    bits = sign | fb;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
#endif

template <SrcType ST>
constexpr int64_t elem_size() {
  return (ST == SrcType::kHalf || ST == SrcType::kBFloat16) ? 2 : (ST == SrcType::kFloat ? 4 : 8);
}

template <SrcType ST, typename T>
MK_INLINE void convert_row(const void* src, T* __restrict dst, int64_t n) {
  if constexpr (ST == SrcType::kFloat) {
    const float* __restrict s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
  } else if constexpr (ST == SrcType::kDouble) {
    const double* __restrict s = static_cast<const double*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
  } else if constexpr (ST == SrcType::kBFloat16) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_bits_to_float(s[i]));
  } else {
#ifdef MK_HAVE_FLOAT16
    const mk_f16_alias* __restrict s = static_cast<const mk_f16_alias*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(s[i]));
#else
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_bits_to_float(s[i]));
#endif
  }
}

template <SrcType ST, typename T>
MK_INLINE void gather_impl(const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,
                           int64_t nrows, int64_t ncols, const T* w, T* dst, int64_t dst_ld,
                           T* dst_w, int64_t dstw_ld) {
  const char* base = static_cast<const char*>(src);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t s = idx ? idx[r] : row0 + r;
    T* __restrict out = dst + r * dst_ld;
    convert_row<ST, T>(base + s * src_ld * elem_size<ST>(), out, ncols);
    if (w) {
      const T wt = w[s];
      T* __restrict o2 = dst_w ? dst_w + r * dstw_ld : out;
      for (int64_t c = 0; c < ncols; ++c) o2[c] = wt * out[c];
    }
  }
}

#define MK_DEFINE_GATHER(NAME, ST, T)                                                         \
  MK_CLONES void NAME(const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,      \
                      int64_t nrows, int64_t ncols, const T* w, T* dst, int64_t dst_ld,       \
                      T* dst_w, int64_t dstw_ld) {                                            \
    gather_impl<ST, T>(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld); \
  }

MK_DEFINE_GATHER(gather_h_f, SrcType::kHalf, float)
MK_DEFINE_GATHER(gather_b_f, SrcType::kBFloat16, float)
MK_DEFINE_GATHER(gather_f_f, SrcType::kFloat, float)
MK_DEFINE_GATHER(gather_d_f, SrcType::kDouble, float)
MK_DEFINE_GATHER(gather_h_d, SrcType::kHalf, double)
MK_DEFINE_GATHER(gather_b_d, SrcType::kBFloat16, double)
MK_DEFINE_GATHER(gather_f_d, SrcType::kFloat, double)
MK_DEFINE_GATHER(gather_d_d, SrcType::kDouble, double)
#undef MK_DEFINE_GATHER

// ------------------------------------------------------------------------- mirror

template <typename T>
MK_INLINE void mirror_impl(T* c, int64_t d, int64_t ld) {
  constexpr int64_t kB = 32;
  for (int64_t i0 = 0; i0 < d; i0 += kB) {
    const int64_t i1 = std::min(d, i0 + kB);
    for (int64_t j0 = 0; j0 <= i0; j0 += kB) {
      const int64_t j1 = std::min(d, j0 + kB);
      for (int64_t i = i0; i < i1; ++i) {
        T* __restrict row = c + i * ld;
        const int64_t jend = std::min(j1, i);
        for (int64_t j = j0; j < jend; ++j) row[j] = c[j * ld + i];
      }
    }
  }
}

MK_CLONES void mirror_f(float* c, int64_t d, int64_t ld) { mirror_impl(c, d, ld); }
MK_CLONES void mirror_d(double* c, int64_t d, int64_t ld) { mirror_impl(c, d, ld); }

// ------------------------------------------------------------------------- Cholesky

template <typename T>
MK_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Crout (row-oriented, left-looking) factorisation: column j of L from dot products of
// already finished row prefixes; four rows at a time share the loads of row j.
template <typename T>
MK_INLINE int64_t cholesky_impl(T* a, int64_t d, int64_t ld) {
  for (int64_t j = 0; j < d; ++j) {
    T* lj = a + j * ld;
    const T s = lj[j] - dot(lj, lj, j);
    if (!(s > T(0))) {
      for (int64_t i = j; i < d; ++i) std::fill(a + i * ld, a + i * ld + i + 1, T(0));
      return j + 1;
    }
    const T ljj = std::sqrt(s);
    lj[j] = ljj;
    const T inv = T(1) / ljj;
    int64_t i = j + 1;
    for (; i + 4 <= d; i += 4) {
      T* a0 = a + i * ld;
      T* a1 = a0 + ld;
      T* a2 = a1 + ld;
      T* a3 = a2 + ld;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < j; ++k) {
        const T b = lj[k];
        s0 += a0[k] * b;
        s1 += a1[k] * b;
        s2 += a2[k] * b;
        s3 += a3[k] * b;
      }
      a0[j] = (a0[j] - s0) * inv;
      a1[j] = (a1[j] - s1) * inv;
      a2[j] = (a2[j] - s2) * inv;
      a3[j] = (a3[j] - s3) * inv;
    }
    for (; i < d; ++i) {
      T* ai = a + i * ld;
      ai[j] = (ai[j] - dot(ai, lj, j)) * inv;
    }
  }
  return 0;
}

MK_CLONES int64_t cholesky_f(float* a, int64_t d, int64_t ld) { return cholesky_impl(a, d, ld); }
MK_CLONES int64_t cholesky_d(double* a, int64_t d, int64_t ld) { return cholesky_impl(a, d, ld); }

// ------------------------------------------------------------------------- Cholesky solve

// Triangular solves for MB right-hand sides held transposed (x[j * MB + i] is column j of
// row i), each step an axpy over the MB lanes; two accumulators keep two independent FMA
// chains per lane. Dividing by the pivot (not multiplying by its reciprocal) matches LAPACK's
// rounding. One step: x_j = (x_j - sum_{k0 <= k < k1} row[k] x_k) / row[j].
template <typename T, int MB>
MK_INLINE void solve_step(const T* __restrict row, int64_t j, int64_t k0, int64_t k1, T* __restrict x) {
  T acc0[MB], acc1[MB];
  T* xj = x + j * MB;
#pragma omp simd
  for (int i = 0; i < MB; ++i) {
    acc0[i] = xj[i];
    acc1[i] = 0;
  }
  int64_t k = k0;
  for (; k + 2 <= k1; k += 2) {
    const T r0 = row[k], r1 = row[k + 1];
    const T* x0 = x + k * MB;
    const T* x1 = x0 + MB;
#pragma omp simd
    for (int i = 0; i < MB; ++i) {
      acc0[i] -= r0 * x0[i];
      acc1[i] -= r1 * x1[i];
    }
  }
  if (k < k1) {
    const T r0 = row[k];
    const T* x0 = x + k * MB;
#pragma omp simd
    for (int i = 0; i < MB; ++i) acc0[i] -= r0 * x0[i];
  }
  const T djj = row[j];
#pragma omp simd
  for (int i = 0; i < MB; ++i) xj[i] = (acc0[i] + acc1[i]) / djj;
}

// Forward: Z L^T = B, z_j = (b_j - sum_{k<j} L[j][k] z_k) / L[j][j].
template <typename T, int MB>
MK_INLINE void solve_fwd_impl(const T* __restrict L, int64_t ld, int64_t w, T* __restrict x) {
  for (int64_t j = 0; j < w; ++j) solve_step<T, MB>(L + j * ld, j, 0, j, x);
}

// Backward: X L = Z with U = L^T row-major, x_j = (z_j - sum_{k>j} U[j][k] x_k) / L[j][j].
template <typename T, int MB>
MK_INLINE void solve_bwd_impl(const T* __restrict U, int64_t ld, int64_t w, T* __restrict x) {
  for (int64_t j = w - 1; j >= 0; --j) solve_step<T, MB>(U + j * ld, j, j + 1, w, x);
}

// mode: 1 forward only, 2 backward only, 3 both.
template <typename T, int MB>
MK_INLINE void solve_modes(const T* L, const T* U, int64_t ld, int64_t w, T* x,
                           int mode) {
  if (mode & 1) solve_fwd_impl<T, MB>(L, ld, w, x);
  if (mode & 2) solve_bwd_impl<T, MB>(U, ld, w, x);
}

template <typename T>
MK_INLINE void solve_dispatch(const T* L, const T* U, int64_t ld, int64_t w, T* x,
                              int mb, int mode) {
  switch (mb) {
    case 8: solve_modes<T, 8>(L, U, ld, w, x, mode); break;
    case 16: solve_modes<T, 16>(L, U, ld, w, x, mode); break;
    case 32: solve_modes<T, 32>(L, U, ld, w, x, mode); break;
    default: solve_modes<T, 64>(L, U, ld, w, x, mode); break;
  }
}

MK_CLONES void solve_f(const float* L, const float* U, int64_t ld, int64_t w,
                       float* x, int mb, int mode) {
  solve_dispatch(L, U, ld, w, x, mb, mode);
}
MK_CLONES void solve_d(const double* L, const double* U, int64_t ld, int64_t w, double* x,
                       int mb, int mode) {
  solve_dispatch(L, U, ld, w, x, mb, mode);
}

template <typename T>
MK_INLINE void load_t_impl(const T* r, int64_t ld, int64_t nb, int64_t d, T* xt, int mb) {
  for (int64_t i = 0; i < nb; ++i) {
    const T* ri = r + i * ld;
    for (int64_t j = 0; j < d; ++j) xt[j * mb + i] = ri[j];
  }
  if (nb < mb) {
    for (int64_t j = 0; j < d; ++j) std::fill(xt + j * mb + nb, xt + (j + 1) * mb, T(0));
  }
}

template <typename T>
MK_INLINE void store_t_impl(const T* xt, int mb, int64_t nb, int64_t d, T* x, int64_t ld) {
  for (int64_t i = 0; i < nb; ++i) {
    T* xi = x + i * ld;
    for (int64_t j = 0; j < d; ++j) xi[j] = xt[j * mb + i];
  }
}

MK_CLONES void load_t_f(const float* r, int64_t ld, int64_t nb, int64_t d, float* xt, int mb) {
  load_t_impl(r, ld, nb, d, xt, mb);
}
MK_CLONES void load_t_d(const double* r, int64_t ld, int64_t nb, int64_t d, double* xt, int mb) {
  load_t_impl(r, ld, nb, d, xt, mb);
}
MK_CLONES void store_t_f(const float* xt, int mb, int64_t nb, int64_t d, float* x, int64_t ld) {
  store_t_impl(xt, mb, nb, d, x, ld);
}
MK_CLONES void store_t_d(const double* xt, int mb, int64_t nb, int64_t d, double* x,
                         int64_t ld) {
  store_t_impl(xt, mb, nb, d, x, ld);
}

}  // namespace detail

// ------------------------------------------------------------------------- public entry points

void gather_rows(SrcType st, const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,
                 int64_t nrows, int64_t ncols, const float* w, float* dst, int64_t dst_ld,
                 float* dst_w, int64_t dstw_ld) {
  switch (st) {
    case SrcType::kHalf:
      return detail::gather_h_f(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kBFloat16:
      return detail::gather_b_f(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kFloat:
      return detail::gather_f_f(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kDouble:
      return detail::gather_d_f(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
  }
}

void gather_rows(SrcType st, const void* src, int64_t src_ld, const int64_t* idx, int64_t row0,
                 int64_t nrows, int64_t ncols, const double* w, double* dst, int64_t dst_ld,
                 double* dst_w, int64_t dstw_ld) {
  switch (st) {
    case SrcType::kHalf:
      return detail::gather_h_d(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kBFloat16:
      return detail::gather_b_d(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kFloat:
      return detail::gather_f_d(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
    case SrcType::kDouble:
      return detail::gather_d_d(src, src_ld, idx, row0, nrows, ncols, w, dst, dst_ld, dst_w, dstw_ld);
  }
}

void mirror_upper(float* c, int64_t d, int64_t ld) { detail::mirror_f(c, d, ld); }
void mirror_upper(double* c, int64_t d, int64_t ld) { detail::mirror_d(c, d, ld); }

int64_t cholesky_lower(float* a, int64_t d, int64_t ld) { return detail::cholesky_f(a, d, ld); }
int64_t cholesky_lower(double* a, int64_t d, int64_t ld) { return detail::cholesky_d(a, d, ld); }

void tri_solve_block(const float* L, const float* U, int64_t ld, int64_t w, float* xt, int mb,
                     int mode) {
  detail::solve_f(L, U, ld, w, xt, mb, mode);
}
void tri_solve_block(const double* L, const double* U, int64_t ld, int64_t w, double* xt,
                     int mb, int mode) {
  detail::solve_d(L, U, ld, w, xt, mb, mode);
}

void load_transposed(const float* r, int64_t ld, int64_t nb, int64_t d, float* xt, int mb) {
  detail::load_t_f(r, ld, nb, d, xt, mb);
}
void load_transposed(const double* r, int64_t ld, int64_t nb, int64_t d, double* xt, int mb) {
  detail::load_t_d(r, ld, nb, d, xt, mb);
}
void store_transposed(const float* xt, int mb, int64_t nb, int64_t d, float* x, int64_t ld) {
  detail::store_t_f(xt, mb, nb, d, x, ld);
}
void store_transposed(const double* xt, int mb, int64_t nb, int64_t d, double* x, int64_t ld) {
  detail::store_t_d(xt, mb, nb, d, x, ld);
}

}  // namespace mace_kernels::kern
