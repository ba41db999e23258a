// Operator schemas of the mace_kernels C++ extension and its (empty) Python module.
//
// The ops live in torch.ops.mace_kernels; each family's CPU kernels are registered next to
// their implementation (covariance.cpp, linalg.cpp, matmul.cpp). `from mace_kernels import _C`
// only loads this library, which runs the registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mace_kernels, m) {
  m.def(
      "covariance(Tensor x, Tensor? y, Tensor? segment_ids, Tensor? weights, int num_segments, "
      "bool with_xx) -> (Tensor, Tensor)");
  m.def("cholesky(Tensor M) -> (Tensor, Tensor)");
  m.def("cholesky_solve(Tensor L, Tensor R) -> Tensor");
  m.def("packed_matmul(Tensor[] weights, Tensor transform) -> Tensor");
  m.def(
      "fuse_loras(Tensor[] A, Tensor[] B, Tensor C, Tensor[] base, Tensor? base_transform) -> "
      "Tensor");
  m.def("sgmv_shrink(Tensor x, Tensor A, Tensor seg_lens) -> Tensor");
  m.def("sgmv_expand(Tensor(a!) out, Tensor h, Tensor B, Tensor seg_lens, float scale) -> ()");
}

static PyModuleDef mace_kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "C++ CPU kernels of mace_kernels (ops registered under torch.ops.mace_kernels).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mace_kernels_module); }
