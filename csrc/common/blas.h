// Single-threaded tile products for the CPU kernels of every op family (attention, LoRA):
// one gemm() that goes straight to the BLAS linked into libtorch, or through ATen when there
// is none.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

// Fortran BLAS as exported by libtorch_cpu when torch is built with MKL (the LP64 interface,
// 32-bit integers, which is what ATen itself calls). Declared weak: a torch without these
// symbols still loads the extension, and gemm() below then goes through ATen instead.
#if AT_MKL_ENABLED()
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}
#endif

namespace mmk {

// C (m x n, row stride ldc) = op(A) op(B), or += with `accumulate`. A is stored row-major as
// (m x k) with row stride lda, or as (k x m) when ta (op(A) = A^T); B likewise as (k x n), or
// (n x k) when tb. Row strides must be >= the row length (BLAS's rule); callers guarantee it.
// Called from worker threads (inside at::parallel_for), BLAS runs single-threaded; called
// outside a parallel region it may use every thread. Products need m, n, k >= 1.
// With accumulate = false, C is written without being read (BLAS's beta = 0), so an output
// that still holds NaN poison (the test suite's deterministic mode) is simply overwritten.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
#if AT_MKL_ENABLED()
  // Straight to BLAS: through ATen (tensor wrappers + dispatch) a 64 x 64 x 256 tile product
  // costs ~1.5 us more, 7-20% of the tile. Row-major C = op(A) op(B) is column-major
  // C^T = op(B)^T op(A)^T, so B is passed first.
  constexpr bool kDouble = std::is_same<T, double>::value;
  const bool have = kDouble ? dgemm_ != nullptr : sgemm_ != nullptr;
  if (have && std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda),
              LDC = static_cast<int>(ldc);
    const char TA = tb ? 'T' : 'N', TB = ta ? 'T' : 'N';
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (kDouble) {
      dgemm_(&TA, &TB, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    } else {
      sgemm_(&TA, &TB, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    }
    return;
  }
#endif
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor A = ta ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  const at::Tensor B = tb ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

}  // namespace mmk
