// Shared helpers of the mace_kernels C++ ops: a row-major GEMM front end over the BLAS
// that libtorch_cpu carries, and a dynamically scheduled parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels.h"

// The Fortran BLAS symbols exported by libtorch_cpu (MKL or OpenBLAS builds). They are weak,
// so a torch without them still loads the extension; the helpers then fall back to ATen ops.
extern "C" {
#if defined(__GNUC__)
#define MACE_WEAK __attribute__((weak))
#else
#define MACE_WEAK
#endif
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) MACE_WEAK;
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) MACE_WEAK;
// MKL only (its C name; the lower-case symbol is the Fortran by-reference binding): the number
// of threads the BLAS calls made by this thread may use, 0 = the global setting.
int MKL_Set_Num_Threads_Local(int nt) MACE_WEAK;
}

namespace mace_kernels {

inline bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

template <typename T>
inline at::ScalarType scalar_type_of() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

inline kern::SrcType src_type(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return kern::SrcType::kHalf;
    case at::kBFloat16: return kern::SrcType::kBFloat16;
    case at::kFloat: return kern::SrcType::kFloat;
    case at::kDouble: return kern::SrcType::kDouble;
    default: TORCH_CHECK(false, "mace_kernels: unsupported floating dtype ", st);
  }
}

// Leading dimension that BLAS accepts for a row-major rows x cols operand: the stride is
// irrelevant for a single row, and must cover the row otherwise.
inline int64_t fix_ld(int64_t ld, int64_t rows, int64_t cols) {
  if (rows <= 1) return std::max<int64_t>({ld, cols, 1});
  TORCH_CHECK(ld >= std::max<int64_t>(cols, 1), "mace_kernels: internal error, leading dimension ",
              ld, " < ", cols);
  return ld;
}

// Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C. op(A) is A (m x k, ld lda)
// or, with trans_a, A^T for A stored k x m; same for B. beta == 0 ignores C's contents.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  ldc = fix_ld(ldc, m, n);
  if (k <= 0 || alpha == T(0)) {
    for (int64_t i = 0; i < m; ++i) {
      T* ci = c + i * ldc;
      if (beta == T(0)) {
        std::fill(ci, ci + n, T(0));
      } else if (beta != T(1)) {
        for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
      }
    }
    return;
  }
  lda = trans_a ? fix_ld(lda, k, m) : fix_ld(lda, m, k);
  ldb = trans_b ? fix_ld(ldb, n, k) : fix_ld(ldb, k, n);
  constexpr bool is_double = std::is_same_v<T, double>;
  const bool have_blas = is_double ? (dgemm_ != nullptr) : (sgemm_ != nullptr);
  if (have_blas && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc)) {
    // Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    if constexpr (is_double) {
      dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    } else {
      sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    }
    return;
  }
  // Fallback through ATen on views of the same memory.
  const auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  at::Tensor A = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor B = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    C.copy_(at::mm(A, B).mul_(alpha));
  } else {
    C.addmm_(A, B, beta, alpha);
  }
}

// Makes the BLAS calls of this thread single-threaded for the guard's lifetime (MKL); used
// inside our own parallel regions, where MKL would otherwise rely on its nested-parallelism
// detection.
struct SerialBlasGuard {
  bool active = false;
  int prev = 0;
  SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      prev = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~SerialBlasGuard() {
    if (active) MKL_Set_Num_Threads_Local(prev);
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;
};

// Runs body(worker_state, item) for item in [0, n) on at::get_num_threads() workers that take
// items in order from a shared counter (dynamic scheduling, so put the big items first).
// make_state() is called once per worker (per-thread buffers). BLAS calls inside run
// single-threaded. With one worker, or inside a parallel region, everything runs inline and
// BLAS keeps its threads.
template <typename MakeState, typename Body>
void parallel_items(int64_t n, const MakeState& make_state, const Body& body) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    auto state = make_state();
    for (int64_t i = 0; i < n; ++i) body(state, i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      SerialBlasGuard guard;
      auto state = make_state();
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= n) break;
        body(state, i);
      }
    }
  });
}

// Per-k matrices of a 3-D (K, p, q) tensor as BLAS operands without a copy when its last two
// strides allow it: M_k = ptr + k * batch_stride, row-major p x q with leading dimension ld,
// or (trans) stored as its q x p transpose.
template <typename T>
struct BatchedOperand {
  at::Tensor keep;  // owns the memory when a converted / contiguous copy was needed
  const T* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t ld = 1;
  bool trans = false;
};

template <typename T>
BatchedOperand<T> batched_operand(const at::Tensor& t_in) {
  TORCH_CHECK(t_in.dim() == 3, "mace_kernels: expected a 3-D tensor, got ", t_in.sizes());
  BatchedOperand<T> op;
  at::Tensor t = t_in.scalar_type() == scalar_type_of<T>() ? t_in : t_in.to(scalar_type_of<T>());
  const int64_t p = t.size(1), q = t.size(2);
  const int64_t s1 = t.stride(1), s2 = t.stride(2);
  if ((q <= 1 || s2 == 1) && (p <= 1 || s1 >= std::max<int64_t>(q, 1))) {
    op.trans = false;
    op.ld = std::max<int64_t>({p <= 1 ? q : s1, q, 1});
  } else if ((p <= 1 || s1 == 1) && (q <= 1 || s2 >= std::max<int64_t>(p, 1))) {
    op.trans = true;
    op.ld = std::max<int64_t>({q <= 1 ? p : s2, p, 1});
  } else {
    t = t.contiguous();
    op.trans = false;
    op.ld = std::max<int64_t>(q, 1);
  }
  op.keep = t;
  op.ptr = t.data_ptr<T>();
  op.batch_stride = t.stride(0);
  return op;
}

}  // namespace mace_kernels
