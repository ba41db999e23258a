// The GEMM-shaped ops: packed_matmul (closed_form_edit), fuse_loras, and the segmented LoRA
// primitives sgmv_shrink / sgmv_expand (lora_apply). All products go to BLAS on views of the
// packed outputs; the loops over layers, concepts and segments stay in C++.
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <vector>

#include "common.h"

namespace mace_kernels {
namespace {

bool is_acc_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

// ----------------------------------------------------------------------------- packed_matmul

at::Tensor packed_matmul(at::TensorList weights, const at::Tensor& transform) {
  TORCH_CHECK(transform.dim() == 2 && transform.size(0) == transform.size(1),
              "packed_matmul: transform must be (d, d), got ", transform.sizes());
  TORCH_CHECK(is_acc_dtype(transform.scalar_type()),
              "packed_matmul: transform must be float32 or float64, got ", transform.scalar_type());
  const int64_t d = transform.size(0);
  const at::ScalarType acc = transform.scalar_type();
  int64_t total = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(1) == d, "packed_matmul: weights[", l,
                "] must be (out, ", d, "), got ", weights[l].sizes());
    TORCH_CHECK(at::isFloatingType(weights[l].scalar_type()), "packed_matmul: weights[", l,
                "] must be floating point");
    total += weights[l].size(0);
  }
  const at::Tensor T = transform.contiguous();
  at::Tensor out = at::empty({total, d}, T.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mace_kernels::packed_matmul", [&] {
    const scalar_t* t = T.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    int64_t row = 0;
    for (const at::Tensor& w_in : weights) {
      const int64_t rows = w_in.size(0);
      if (rows > 0) {
        const at::Tensor w = w_in.to(acc).contiguous();
        gemm<scalar_t>(false, false, rows, d, d, 1, w.data_ptr<scalar_t>(), d, t, d, 0,
                       o + row * d, d);
      }
      row += rows;
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- fuse_loras

// Stage 1: AC[l] (n r x d, layer-major) = rows A_il C_i for every concept i and layer l; one
// (L r x d)(d x d) GEMM per concept reads C_i once for all layers.
template <typename T>
void fuse_stage1(at::TensorList A, const at::Tensor& C, at::Tensor& AC) {
  const int64_t L = static_cast<int64_t>(A.size());
  const int64_t n = C.size(0), d = C.size(1), r = A[0].size(1);
  const int64_t Lr = L * r;
  std::vector<at::Tensor> a(L);
  std::vector<const void*> a_ptr(L);
  std::vector<kern::SrcType> a_type(L);
  bool all_acc = true;
  for (int64_t l = 0; l < L; ++l) {
    a[l] = A[l].contiguous();
    a_ptr[l] = a[l].data_ptr();
    a_type[l] = src_type(a[l].scalar_type());
    all_acc = all_acc && a[l].scalar_type() == scalar_type_of<T>();
  }
  const T* c = C.data_ptr<T>();
  T* ac = AC.data_ptr<T>();
  const bool direct_a = L == 1 && all_acc;  // A[0][i] is already the GEMM's left operand
  const bool direct_out = L == 1;           // AC[0] rows of concept i are contiguous
  struct Buffers {
    std::unique_ptr<T[]> a, out;
  };
  auto make_state = [&]() {
    Buffers b;
    if (!direct_a) b.a.reset(new T[Lr * d]);
    if (!direct_out) b.out.reset(new T[Lr * d]);
    return b;
  };
  auto body = [&](Buffers& b, int64_t i) {
    const T* left;
    if (direct_a) {
      left = static_cast<const T*>(a_ptr[0]) + i * r * d;
    } else {
      for (int64_t l = 0; l < L; ++l) {
        kern::gather_rows(a_type[l], a_ptr[l], d, nullptr, i * r, r, d, static_cast<const T*>(nullptr),
                          b.a.get() + l * r * d, d, nullptr, 0);
      }
      left = b.a.get();
    }
    T* dst = direct_out ? ac + i * r * d : b.out.get();
    gemm<T>(false, false, Lr, d, d, 1, left, d, c + i * d * d, d, 0, dst, d);
    if (!direct_out) {
      for (int64_t l = 0; l < L; ++l) {
        std::memcpy(ac + (l * n * r + i * r) * d, dst + l * r * d, sizeof(T) * r * d);
      }
    }
  };
  parallel_items(n, make_state, body);
}

at::Tensor fuse_loras(at::TensorList A, at::TensorList B, const at::Tensor& C_in,
                      at::TensorList base, const std::optional<at::Tensor>& T_in) {
  TORCH_CHECK(C_in.dim() == 3 && C_in.size(1) == C_in.size(2), "fuse_loras: C must be (n, d, d), got ",
              C_in.sizes());
  TORCH_CHECK(is_acc_dtype(C_in.scalar_type()), "fuse_loras: C must be float32 or float64, got ",
              C_in.scalar_type());
  const int64_t L = static_cast<int64_t>(A.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(B.size()) == L,
              "fuse_loras: A and B must list the same layers, got ", A.size(), " and ", B.size());
  const int64_t n = C_in.size(0), d = C_in.size(1);
  const int64_t r = A[0].dim() == 3 ? A[0].size(1) : 0;
  const at::ScalarType acc = C_in.scalar_type();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(A[l].dim() == 3 && A[l].size(0) == n && A[l].size(1) == r && A[l].size(2) == d,
                "fuse_loras: A[", l, "] must be (", n, ", ", r, ", ", d, "), got ", A[l].sizes());
    TORCH_CHECK(B[l].dim() == 3 && B[l].size(0) == n && B[l].size(2) == r, "fuse_loras: B[", l,
                "] must be (", n, ", out, ", r, "), got ", B[l].sizes());
    TORCH_CHECK(at::isFloatingType(A[l].scalar_type()) && at::isFloatingType(B[l].scalar_type()),
                "fuse_loras: A[", l, "] and B[", l, "] must be floating point");
    total += B[l].size(1);
  }
  const bool has_base = !base.empty();
  at::Tensor T;
  if (has_base) {
    TORCH_CHECK(static_cast<int64_t>(base.size()) == L, "fuse_loras: base has ", base.size(),
                " layers, A has ", L);
    TORCH_CHECK(T_in.has_value() && T_in->defined() && T_in->dim() == 2 && T_in->size(1) == d,
                "fuse_loras: base needs a (k, ", d, ") base_transform");
    const int64_t k = T_in->size(0);
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(base[l].dim() == 2 && base[l].size(0) == B[l].size(1) && base[l].size(1) == k,
                  "fuse_loras: base[", l, "] must be (", B[l].size(1), ", ", k,
                  ") to match base_transform, got ", base[l].sizes());
    }
    T = T_in->to(acc).contiguous();
  }
  const at::Tensor C = C_in.contiguous();
  const auto opts = C.options();
  at::Tensor out = at::empty({total, d}, opts);
  const int64_t nr = n * r;
  at::Tensor AC = at::empty({nr > 0 ? L : 0, nr, d}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "mace_kernels::fuse_loras", [&] {
    using T_ = scalar_t;
    if (nr > 0 && d > 0) fuse_stage1<T_>(A, C, AC);
    // Stage 2, per layer: out_l = base_l @ T + [B_1l ... B_nl] @ AC[l]; base_l is (out_l, k)
    // and T (k, d), k = d unless the caller stacks several base terms.
    T_* o = out.data_ptr<T_>();
    int64_t row = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t rows = B[l].size(1);
      T_* ol = o + row * d;
      row += rows;
      if (rows == 0 || d == 0) continue;
      T_ beta = 0;
      if (has_base) {
        const int64_t k = T.size(0);
        const at::Tensor w = base[l].to(acc).contiguous();
        gemm<T_>(false, false, rows, d, k, 1, w.data_ptr<T_>(), k, T.data_ptr<T_>(), d, 0, ol, d);
        beta = 1;
      }
      if (nr > 0) {
        at::Tensor bcat = at::empty({rows, n, r}, opts);
        bcat.copy_(B[l].permute({1, 0, 2}));
        gemm<T_>(false, false, rows, d, nr, 1, bcat.data_ptr<T_>(), nr,
                 AC.data_ptr<T_>() + l * nr * d, d, beta, ol, d);
      } else if (!has_base) {
        std::fill(ol, ol + rows * d, T_(0));
      }
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- SGMV

struct RowBlock {
  int64_t k, row0, rows;
};

// Row blocks of the segments (segment k covers rows [start_k, start_k + seg_lens[k])), at
// most max_rows rows each, so a few long segments still spread over the threads.
std::vector<RowBlock> row_blocks(const at::Tensor& seg_lens_in, int64_t K, int64_t T,
                                 int64_t max_rows, const char* op) {
  TORCH_CHECK(seg_lens_in.dim() == 1 && seg_lens_in.size(0) == K, op, ": seg_lens must hold ", K,
              " lengths, got ", seg_lens_in.sizes());
  TORCH_CHECK(seg_lens_in.device().is_cpu() && !at::isFloatingType(seg_lens_in.scalar_type()), op,
              ": seg_lens must be a CPU integer tensor");
  const at::Tensor lens = seg_lens_in.to(at::kLong).contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  std::vector<RowBlock> blocks;
  int64_t start = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(len[k] >= 0, op, ": seg_lens must be >= 0, got ", len[k], " for segment ", k);
    for (int64_t r0 = 0; r0 < len[k]; r0 += max_rows) {
      blocks.push_back({k, start + r0, std::min(max_rows, len[k] - r0)});
    }
    start += len[k];
  }
  TORCH_CHECK(start == T, op, ": seg_lens sum to ", start, ", but there are ", T, " rows");
  return blocks;
}

int64_t rows_per_block(int64_t T) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((T + 4 * threads - 1) / (4 * threads), 32, 256);
}

// Runs body over the blocks: inline when the whole job is too small for a parallel region.
template <typename MakeState, typename Body>
void run_blocks(int64_t n, int64_t work, const MakeState& make_state, const Body& body) {
  if (work < (int64_t(1) << 16)) {
    auto state = make_state();
    for (int64_t i = 0; i < n; ++i) body(state, i);
  } else {
    parallel_items(n, make_state, body);
  }
}

at::Tensor sgmv_shrink(const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& seg_lens) {
  TORCH_CHECK(x_in.dim() == 2 && at::isFloatingType(x_in.scalar_type()),
              "sgmv_shrink: x must be a floating (T, d_in) tensor, got ", x_in.sizes(), " ",
              x_in.scalar_type());
  TORCH_CHECK(A.dim() == 3 && A.size(2) == x_in.size(1) && at::isFloatingType(A.scalar_type()),
              "sgmv_shrink: A must be a floating (K, r, ", x_in.size(1), ") tensor, got ", A.sizes());
  const int64_t T = x_in.size(0), d_in = x_in.size(1), K = A.size(0), r = A.size(1);
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t max_rows = rows_per_block(T);
  const std::vector<RowBlock> blocks = row_blocks(seg_lens, K, T, max_rows, "sgmv_shrink");
  at::Tensor h = at::empty({T, r}, x_in.options().dtype(acc));
  if (T == 0 || r == 0) return h;
  const at::Tensor x = x_in.contiguous();
  const bool x_is_acc = x.scalar_type() == acc;
  const kern::SrcType xt = src_type(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "mace_kernels::sgmv_shrink", [&] {
    using T_ = scalar_t;
    const BatchedOperand<T_> a = batched_operand<T_>(A);  // A_k: r x d_in
    const void* xp = x.data_ptr();
    T_* hp = h.data_ptr<T_>();
    auto make_state = [&]() {
      return std::unique_ptr<T_[]>(x_is_acc ? nullptr : new T_[max_rows * std::max<int64_t>(d_in, 1)]);
    };
    auto body = [&](std::unique_ptr<T_[]>& buf, int64_t i) {
      const RowBlock& b = blocks[i];
      const T_* xb;
      if (x_is_acc) {
        xb = static_cast<const T_*>(xp) + b.row0 * d_in;
      } else {
        kern::gather_rows(xt, xp, d_in, nullptr, b.row0, b.rows, d_in, static_cast<const T_*>(nullptr),
                          buf.get(), d_in, nullptr, 0);
        xb = buf.get();
      }
      // h_k = x_k @ A_k^T
      gemm<T_>(false, !a.trans, b.rows, r, d_in, 1, xb, d_in, a.ptr + b.k * a.batch_stride, a.ld, 0,
               hp + b.row0 * r, r);
    };
    run_blocks(static_cast<int64_t>(blocks.size()), T * d_in * r, make_state, body);
  });
  return h;
}

void sgmv_expand(at::Tensor& out, const at::Tensor& h_in, const at::Tensor& B,
                 const at::Tensor& seg_lens, double scale) {
  TORCH_CHECK(out.dim() == 2 && is_acc_dtype(out.scalar_type()),
              "sgmv_expand: out must be a float32 or float64 (T, d_out) tensor, got ", out.sizes(),
              " ", out.scalar_type());
  const int64_t T = out.size(0), d_out = out.size(1);
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1,
              "sgmv_expand: out must have contiguous rows (it is updated in place)");
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(0) == T && h_in.scalar_type() == out.scalar_type(),
              "sgmv_expand: h must be (", T, ", r) with out's dtype ", out.scalar_type(), ", got ",
              h_in.sizes(), " ", h_in.scalar_type());
  const int64_t r = h_in.size(1);
  TORCH_CHECK(B.dim() == 3 && B.size(1) == d_out && B.size(2) == r &&
                  at::isFloatingType(B.scalar_type()),
              "sgmv_expand: B must be a floating (K, ", d_out, ", ", r, ") tensor, got ", B.sizes());
  const int64_t K = B.size(0);
  const std::vector<RowBlock> blocks = row_blocks(seg_lens, K, T, rows_per_block(T), "sgmv_expand");
  if (T == 0 || d_out == 0 || r == 0 || scale == 0.0) return;
  const at::Tensor h = h_in.contiguous();
  const int64_t ldo = out.size(1) <= 1 ? std::max<int64_t>(d_out, 1) : out.stride(0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mace_kernels::sgmv_expand", [&] {
    using T_ = scalar_t;
    const BatchedOperand<T_> b = batched_operand<T_>(B);  // B_k: d_out x r
    const T_* hp = h.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    const T_ alpha = static_cast<T_>(scale);
    auto make_state = [] { return 0; };
    auto body = [&](int, int64_t i) {
      const RowBlock& blk = blocks[i];
      // out_k += scale * h_k @ B_k^T
      gemm<T_>(false, !b.trans, blk.rows, d_out, r, alpha, hp + blk.row0 * r, r,
               b.ptr + blk.k * b.batch_stride, b.ld, 1, op + blk.row0 * ldo, ldo);
    };
    run_blocks(static_cast<int64_t>(blocks.size()), T * d_out * r, make_state, body);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mace_kernels, CPU, m) {
  m.impl("packed_matmul", &packed_matmul);
  m.impl("fuse_loras", &fuse_loras);
  m.impl("sgmv_shrink", &sgmv_shrink);
  m.impl("sgmv_expand", &sgmv_expand);
}

}  // namespace mace_kernels
