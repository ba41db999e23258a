// covariance: per segment, cxx = sum_t w_t x_t x_t^T and cyx = sum_t w_t y_t x_t^T.
//
// Tokens are counting-sorted by segment (O(N) int64 indices, masked tokens dropped), then each
// segment streams its tokens in chunks: a chunk is gathered into accumulation-dtype buffers
// (weights applied while gathering) and fed to BLAS for both products. Only the upper-triangle
// column blocks of cxx are computed; the lower triangle is mirrored at the end. Segments that
// hold a large share of the tokens run one at a time, their tokens split over the threads
// (private accumulators, added up at the end); the others run in parallel, one segment per
// thread. Either way each BLAS call is single-threaded, which suits these thin products
// better than splitting one product over threads.
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "common.h"

namespace mace_kernels {
namespace {

// Column blocks of cxx: below this size one full GEMM is cheaper than several calls.
constexpr int64_t kFullGemmMaxD = 192;
constexpr int64_t kColumnBlock = 128;
// Gather buffers per worker (elements of the accumulation type, all buffers together).
constexpr int64_t kChunkElems = 1 << 20;
constexpr int64_t kMinChunk = 64;
constexpr int64_t kMaxChunk = 4096;
// cyx with fewer columns than this (and than rows) is computed transposed.
constexpr int64_t kTransposedYxMaxD = 16;
// Fewest tokens per thread when a big segment is split over the threads.
constexpr int64_t kMinPart = 256;
// Memory for the private accumulators of the extra threads on a big segment.
constexpr int64_t kPrivateBudgetBytes = int64_t(256) << 20;

template <typename T>
struct CovProblem {
  const void* x = nullptr;
  kern::SrcType xt = kern::SrcType::kFloat;
  bool x_is_acc = false;
  int64_t d = 0;
  const void* y = nullptr;  // null: no cyx
  kern::SrcType yt = kern::SrcType::kFloat;
  bool y_is_acc = false;
  int64_t e = 0;
  const T* w = nullptr;
  const int64_t* perm = nullptr;  // token order grouped by segment; null: identity
  const int64_t* offsets = nullptr;
  T* cxx = nullptr;  // (S, d, d) or null
  T* cyx = nullptr;  // (S, e, d) or null
  // cyx is computed as its transpose (d, e) and transposed at the end: BLAS handles a thin
  // (e, d) product with small d poorly (LoRA gradients, where d is the rank).
  bool yx_transposed = false;
  int64_t chunk = 0;
};

template <typename T>
struct CovBuffers {
  std::unique_ptr<T[]> x, xw, y, yx_t;
};

template <typename T>
CovBuffers<T> make_buffers(const CovProblem<T>& p) {
  CovBuffers<T> b;
  // x is needed unweighted only for cxx; the weighted copy feeds both products.
  b.x.reset(new T[p.chunk * std::max<int64_t>(p.d, 1)]);
  if (p.w != nullptr && p.cxx != nullptr) b.xw.reset(new T[p.chunk * std::max<int64_t>(p.d, 1)]);
  if (p.y != nullptr) b.y.reset(new T[p.chunk * std::max<int64_t>(p.e, 1)]);
  if (p.yx_transposed) b.yx_t.reset(new T[p.d * p.e]);
  return b;
}

// Gathers the n rows of a chunk into a dense (n, ncols) buffer.
template <typename T>
void gather(kern::SrcType st, const void* src, int64_t ncols, const int64_t* idx, int64_t row0,
            int64_t n, const T* w, T* dst, T* dst_w) {
  kern::gather_rows(st, src, ncols, idx, row0, n, ncols, w, dst, ncols, dst_w, ncols);
}

// Sums over the sorted tokens [begin, end) into cxx (upper-triangle blocks only; the strict
// lower triangle outside the diagonal blocks is left unwritten) and cyx, overwriting them.
template <typename T>
void accumulate_range(const CovProblem<T>& p, CovBuffers<T>& buf, int64_t begin, int64_t end,
                      T* cxx, T* cyx) {
  const int64_t d = p.d, e = p.e;
  if (begin == end) {
    if (cxx) std::memset(cxx, 0, sizeof(T) * d * d);
    if (cyx) std::memset(cyx, 0, sizeof(T) * e * d);
    return;
  }
  for (int64_t c0 = begin; c0 < end; c0 += p.chunk) {
    const int64_t n = std::min(p.chunk, end - c0);
    const int64_t* idx = p.perm ? p.perm + c0 : nullptr;
    int64_t row0 = c0;
    // Sorted tokens of one segment are increasing: a chunk spanning n ids is consecutive.
    if (idx && idx[n - 1] - idx[0] == n - 1) {
      row0 = idx[0];
      idx = nullptr;
    }
    const T* X = nullptr;   // unweighted, for cxx
    const T* Xw = nullptr;  // weighted, for both products
    if (idx == nullptr && p.x_is_acc && p.w == nullptr) {
      X = Xw = static_cast<const T*>(p.x) + row0 * d;
    } else if (p.w == nullptr) {
      gather<T>(p.xt, p.x, d, idx, row0, n, nullptr, buf.x.get(), nullptr);
      X = Xw = buf.x.get();
    } else if (cxx != nullptr) {
      gather<T>(p.xt, p.x, d, idx, row0, n, p.w, buf.x.get(), buf.xw.get());
      X = buf.x.get();
      Xw = buf.xw.get();
    } else {
      gather<T>(p.xt, p.x, d, idx, row0, n, p.w, buf.x.get(), nullptr);
      Xw = buf.x.get();
    }
    const T beta = c0 == begin ? T(0) : T(1);
    if (cxx != nullptr) {
      if (d <= kFullGemmMaxD) {
        gemm<T>(true, false, d, d, n, T(1), Xw, d, X, d, beta, cxx, d);
      } else {
        // cxx[0:j1, j0:j1] (+)= Xw[:, 0:j1]^T X[:, j0:j1]: the upper triangle, by column block.
        for (int64_t j0 = 0; j0 < d; j0 += kColumnBlock) {
          const int64_t j1 = std::min(d, j0 + kColumnBlock);
          gemm<T>(true, false, j1, j1 - j0, n, T(1), Xw, d, X + j0, d, beta, cxx + j0, d);
        }
      }
    }
    if (cyx != nullptr) {
      const T* Y;
      if (idx == nullptr && p.y_is_acc) {
        Y = static_cast<const T*>(p.y) + row0 * e;
      } else {
        gather<T>(p.yt, p.y, e, idx, row0, n, nullptr, buf.y.get(), nullptr);
        Y = buf.y.get();
      }
      if (p.yx_transposed) {
        gemm<T>(true, false, d, e, n, T(1), Xw, d, Y, e, beta, buf.yx_t.get(), e);
      } else {
        gemm<T>(true, false, e, d, n, T(1), Y, e, Xw, d, beta, cyx, d);
      }
    }
  }
  if (cyx != nullptr && p.yx_transposed) {
    const T* t = buf.yx_t.get();
    for (int64_t j = 0; j < e; ++j) {
      for (int64_t i = 0; i < d; ++i) cyx[j * d + i] = t[i * e + j];
    }
  }
}

template <typename T>
void process_segment(const CovProblem<T>& p, CovBuffers<T>& buf, int64_t s) {
  const int64_t d = p.d, e = p.e;
  T* cxx = p.cxx ? p.cxx + s * d * d : nullptr;
  T* cyx = p.cyx ? p.cyx + s * e * d : nullptr;
  accumulate_range(p, buf, p.offsets[s], p.offsets[s + 1], cxx, cyx);
  if (cxx != nullptr && p.offsets[s + 1] > p.offsets[s]) kern::mirror_upper(cxx, d, d);
}

// A segment with a large share of the tokens: its tokens are split over the threads, each
// summing its part with single-threaded BLAS into the output (part 0) or a private
// accumulator, which are then added up.
template <typename T>
void process_big_segment(const CovProblem<T>& p, std::vector<CovBuffers<T>>& bufs,
                         std::vector<std::unique_ptr<T[]>>& priv_xx,
                         std::vector<std::unique_ptr<T[]>>& priv_yx, int64_t s) {
  const int64_t d = p.d, e = p.e;
  const int64_t begin = p.offsets[s], end = p.offsets[s + 1], cnt = end - begin;
  T* cxx = p.cxx ? p.cxx + s * d * d : nullptr;
  T* cyx = p.cyx ? p.cyx + s * e * d : nullptr;
  const int64_t parts = std::clamp<int64_t>(cnt / kMinPart, 1, static_cast<int64_t>(bufs.size()));
  // parts == 1 (few tokens, or no room for private accumulators): multi-threaded BLAS instead.
  auto part_range = [&](int64_t t) {
    return std::make_pair(begin + cnt * t / parts, begin + cnt * (t + 1) / parts);
  };
  if (parts == 1) {
    accumulate_range(p, bufs[0], begin, end, cxx, cyx);  // BLAS keeps its threads
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
      SerialBlasGuard guard;
      for (int64_t t = t0; t < t1; ++t) {
        const auto [b, e_] = part_range(t);
        accumulate_range(p, bufs[t], b, e_, t == 0 ? cxx : priv_xx[t].get(),
                         t == 0 ? cyx : priv_yx[t].get());
      }
    });
    // out += the other parts: the upper triangle of cxx (all that was computed), all of cyx.
    at::parallel_for(0, d + e, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* dst;
        const int64_t col0 = r < d ? r : 0;
        if (r < d && cxx == nullptr) continue;
        if (r >= d && cyx == nullptr) continue;
        dst = r < d ? cxx + r * d : cyx + (r - d) * d;
        for (int64_t t = 1; t < parts; ++t) {
          const T* src = r < d ? priv_xx[t].get() + r * d : priv_yx[t].get() + (r - d) * d;
          for (int64_t c = col0; c < d; ++c) dst[c] += src[c];
        }
      }
    });
  }
  if (cxx != nullptr) kern::mirror_upper(cxx, d, d);
}

template <typename T>
void run_covariance(CovProblem<T>& p, int64_t S) {
  const int64_t d = p.d, e = p.e;
  const int64_t per_row = d * ((p.w && p.cxx) ? 2 : 1) + (p.y ? e : 0);
  p.chunk = std::clamp<int64_t>(kChunkElems / std::max<int64_t>(per_row, 1), kMinChunk, kMaxChunk);

  const int64_t total = p.offsets[S];
  const int64_t threads = at::get_num_threads();
  // Big segments (more than half a thread's share of the tokens) run one after another, each
  // split over the threads; the rest run concurrently, one per thread, largest first.
  std::vector<int64_t> big, small;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t cnt = p.offsets[s + 1] - p.offsets[s];
    if (threads > 1 && !at::in_parallel_region() && cnt > 0 && cnt * 2 * threads > total) {
      big.push_back(s);
    } else {
      small.push_back(s);
    }
  }
  if (!big.empty()) {
    const int64_t priv_bytes =
        static_cast<int64_t>(sizeof(T)) * ((p.cxx ? d * d : 0) + (p.cyx ? e * d : 0));
    const int64_t max_parts =
        std::clamp<int64_t>(1 + kPrivateBudgetBytes / std::max<int64_t>(priv_bytes, 1), 1, threads);
    std::vector<CovBuffers<T>> bufs;
    std::vector<std::unique_ptr<T[]>> priv_xx(max_parts), priv_yx(max_parts);
    for (int64_t t = 0; t < max_parts; ++t) {
      bufs.push_back(make_buffers(p));
      if (t > 0 && p.cxx) priv_xx[t].reset(new T[d * d]);
      if (t > 0 && p.cyx) priv_yx[t].reset(new T[e * d]);
    }
    for (int64_t s : big) process_big_segment(p, bufs, priv_xx, priv_yx, s);
  }
  if (!small.empty()) {
    std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) {
      return p.offsets[a + 1] - p.offsets[a] > p.offsets[b + 1] - p.offsets[b];
    });
    parallel_items(
        static_cast<int64_t>(small.size()), [&]() { return make_buffers(p); },
        [&](CovBuffers<T>& buf, int64_t i) { process_segment(p, buf, small[i]); });
  }
}

std::tuple<at::Tensor, at::Tensor> covariance(const at::Tensor& x_in,
                                              const std::optional<at::Tensor>& y_in,
                                              const std::optional<at::Tensor>& seg_in,
                                              const std::optional<at::Tensor>& w_in,
                                              int64_t num_segments, bool with_xx) {
  TORCH_CHECK(x_in.dim() == 2, "covariance: x must be (N, d), got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "covariance: x must be floating point, got ",
              x_in.scalar_type());
  TORCH_CHECK(num_segments >= 1, "covariance: num_segments must be >= 1, got ", num_segments);
  const int64_t N = x_in.size(0), d = x_in.size(1), S = num_segments;
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous();

  at::Tensor y;
  if (y_in.has_value() && y_in->defined()) {
    TORCH_CHECK(y_in->dim() == 2 && y_in->size(0) == N, "covariance: y must be (", N,
                ", e) like x's rows, got ", y_in->sizes());
    TORCH_CHECK(at::isFloatingType(y_in->scalar_type()), "covariance: y must be floating point");
    y = y_in->contiguous();
  }
  at::Tensor w;
  if (w_in.has_value() && w_in->defined()) {
    TORCH_CHECK(w_in->dim() == 1 && w_in->size(0) == N, "covariance: weights must be (", N,
                ",), got ", w_in->sizes());
    w = w_in->to(acc).contiguous();
  }

  // Counting sort of the tokens by segment; -1 drops a token.
  std::vector<int64_t> offsets(S + 1, 0);
  std::vector<int64_t> perm;
  if (seg_in.has_value() && seg_in->defined()) {
    TORCH_CHECK(seg_in->dim() == 1 && seg_in->size(0) == N, "covariance: segment_ids must be (",
                N, ",), got ", seg_in->sizes());
    TORCH_CHECK(!at::isFloatingType(seg_in->scalar_type()), "covariance: segment_ids must be integer");
    const at::Tensor seg = seg_in->to(at::kLong).contiguous();
    const int64_t* ids = seg.data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t) {
      const int64_t s = ids[t];
      TORCH_CHECK(s >= -1 && s < S, "covariance: segment id ", s, " of token ", t,
                  " is outside [-1, ", S, ")");
      if (s >= 0) ++offsets[s + 1];
    }
    std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
    perm.resize(offsets[S]);
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t t = 0; t < N; ++t) {
      const int64_t s = ids[t];
      if (s >= 0) perm[fill[s]++] = t;
    }
  } else {
    std::fill(offsets.begin() + 1, offsets.end(), N);
  }

  const auto opts = x.options().dtype(acc);
  at::Tensor cxx = with_xx ? at::empty({S, d, d}, opts) : at::empty({0}, opts);
  at::Tensor cyx = y.defined() ? at::empty({S, y.size(1), d}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES(acc, "mace_kernels::covariance", [&] {
    CovProblem<scalar_t> p;
    p.x = x.data_ptr();
    p.xt = src_type(x.scalar_type());
    p.x_is_acc = x.scalar_type() == acc;
    p.d = d;
    if (y.defined()) {
      p.y = y.data_ptr();
      p.yt = src_type(y.scalar_type());
      p.y_is_acc = y.scalar_type() == acc;
      p.e = y.size(1);
      p.cyx = cyx.data_ptr<scalar_t>();
      p.yx_transposed = d < kTransposedYxMaxD && d < p.e;
    }
    if (w.defined()) p.w = w.data_ptr<scalar_t>();
    if (with_xx) p.cxx = cxx.data_ptr<scalar_t>();
    p.perm = (seg_in.has_value() && seg_in->defined()) ? perm.data() : nullptr;
    p.offsets = offsets.data();
    if (p.cxx != nullptr || p.cyx != nullptr) run_covariance(p, S);
  });
  return {cxx, cyx};
}

}  // namespace

TORCH_LIBRARY_IMPL(mace_kernels, CPU, m) { m.impl("covariance", &covariance); }

}  // namespace mace_kernels
