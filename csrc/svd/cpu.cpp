// CPU kernels of the svd family: the Gaussian sketch Y = A Omega, generated panel by panel
// (Omega is never stored whole; each panel feeds one BLAS GEMM through ATen), and the
// one-sided (Hestenes) Jacobi SVD, one matrix per thread.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_clones.h"
#include "svd/ops.h"
#include "svd/svd_math.h"

namespace lowrank::svd {
namespace {

constexpr int64_t kSketchPanelRows = 512;  // rows of Omega per GEMM: 512 x l fp32 stays in L2

// y_parts[i] += a_parts[i] Omega, a part [rows, n] of any strides, Omega [n, l] made a panel
// of kSketchPanelRows rows at a time (shared by every part: generated once).
void sketch_into(const std::vector<at::Tensor>& a_parts, const std::vector<at::Tensor>& y_parts, int64_t n, int64_t l,
                 int64_t seed) {
  const at::Tensor& a0 = a_parts.front();
  at::Tensor panel = at::empty({std::min(kSketchPanelRows, n), l}, a0.options());
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES(a0.scalar_type(), "gaussian_sketch_cpu", [&] {
    for (int64_t j0 = 0; j0 < n; j0 += kSketchPanelRows) {
      const int64_t pr = std::min(kSketchPanelRows, n - j0);
      scalar_t* p = panel.data_ptr<scalar_t>();
      // panel[jj, c] = Omega[j0 + jj, c], element index e = c * n + j0 + jj (svd_math.h): a
      // column of the panel is a run of consecutive e, four per Philox call
      at::parallel_for(0, l, 1, [&](int64_t c_begin, int64_t c_end) {
        float g4[4];
        for (int64_t c = c_begin; c < c_end; ++c) {
          const uint64_t e0 = static_cast<uint64_t>(c * n + j0), e1 = e0 + static_cast<uint64_t>(pr);
          for (uint64_t g = e0 >> 2; 4 * g < e1; ++g) {
            sketch_group(useed, g, g4);
            for (uint64_t e = std::max(4 * g, e0); e < std::min(4 * g + 4, e1); ++e)
              p[static_cast<int64_t>(e - e0) * l + c] = static_cast<scalar_t>(g4[e & 3]);
          }
        }
      });
      for (size_t part = 0; part < a_parts.size(); ++part)
        y_parts[part].addmm_(a_parts[part].narrow(1, j0, pr), panel.narrow(0, 0, pr));
    }
  });
}

at::Tensor gaussian_sketch_cpu(const at::Tensor& a_in, int64_t l, int64_t seed) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: the output never requires grad
  check_sketch_args(a_in, l);
  // a batch of transposed matrices (rsvd of G^T) is read through its strides by the GEMMs:
  // no transposed copy; other layouts are made contiguous
  at::Tensor a = a_in.to(work_dtype(a_in.scalar_type()));
  if (is_transposed_batch(a) && !a.is_contiguous()) return gaussian_sketch_list_cpu(a.unbind(0), l, seed);
  a = a.contiguous();
  const int64_t n = a.size(-1);
  const int64_t rows = a.numel() / std::max<int64_t>(n, 1);  // every batch entry shares Omega
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = l;
  at::Tensor y = at::zeros(out_shape, a.options());
  if (rows == 0 || l == 0 || n == 0) return y;
  sketch_into({a.view({rows, n})}, {y.view({rows, l})}, n, l, seed);  // all rows stacked: one GEMM per panel
  return y;
}

// The two inner loops of Jacobi are LOWRANK_CPU_CLONES (common/cpu_clones.h): with the fixed
// accumulator lanes below, both versions round identically.

// Dot product with eight independent double accumulators: exact enough for the rotation
// angles of fp32 columns and free of the serial dependency of one running sum.
template <typename T>
LOWRANK_CPU_CLONES double dot(const T* x, const T* y, int64_t m) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    for (int t = 0; t < 8; ++t) acc[t] += static_cast<double>(x[i + t]) * static_cast<double>(y[i + t]);
  for (; i < m; ++i) acc[0] += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// [x, y] <- [c x - s y, s x + c y]
template <typename T>
LOWRANK_CPU_CLONES void rotate(T* x, T* y, int64_t m, T c, T s) {
  for (int64_t i = 0; i < m; ++i) {
    const T xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

// One Jacobi rotation of columns p and q (rows p, q of `w`, each m long; `v` accumulates):
// skipped when their cosine is within tol. Returns whether it rotated.
template <typename T>
bool rotate_pair(T* w, T* v, int64_t n, int64_t m, int64_t p, int64_t q, double* norm2, double tol) {
  const double alpha = norm2[p], beta = norm2[q];
  if (alpha == 0.0 || beta == 0.0) return false;
  const double gamma = dot(w + p * m, w + q * m, m);
  if (std::abs(gamma) <= tol * std::sqrt(alpha) * std::sqrt(beta)) return false;
  // The angle that zeroes the (p, q) entry of W^T W, the smaller of the two roots.
  const double zeta = (beta - alpha) / (2.0 * gamma);
  const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
  const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
  rotate(w + p * m, w + q * m, m, static_cast<T>(c), static_cast<T>(s));
  rotate(v + p * n, v + q * n, n, static_cast<T>(c), static_cast<T>(s));
  norm2[p] = alpha - t * gamma;
  norm2[q] = beta + t * gamma;
  return true;
}

// One-sided Jacobi on the n columns of one matrix, in round-robin (tournament) order: each of
// the N - 1 steps of a sweep (N = n rounded up to even) rotates N/2 disjoint pairs, so a
// step's pairs can run on several threads with a result that does not depend on how many
// (a lone matrix uses them; a batch runs one matrix per thread, in the same order). A pair
// is rotated when its cosine exceeds sqrt(m) eps (LAPACK gesvj's criterion); on return every
// pair of columns is orthogonal to working precision however small their norms, which is
// what makes one-sided Jacobi accurate.
template <typename T>
void jacobi_one(T* w, T* v, int64_t n, int64_t m, bool parallel_pairs) {
  constexpr int kMaxSweeps = 60;
  const double tol = std::sqrt(static_cast<double>(m)) * std::numeric_limits<T>::epsilon();
  const int64_t players = n + (n & 1), half = players / 2;
  std::vector<double> norm2(n);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    for (int64_t j = 0; j < n; ++j) norm2[j] = dot(w + j * m, w + j * m, m);  // fresh each sweep: no drift
    std::atomic<bool> rotated{false};
    for (int64_t step = 0; step + 1 < players; ++step) {
      // circle method: player players-1 stays, the others turn one seat per step
      auto run = [&](int64_t i0, int64_t i1) {
        bool any = false;
        for (int64_t i = i0; i < i1; ++i) {
          int64_t a = i == 0 ? players - 1 : (step + i) % (players - 1);
          int64_t b = (step - i + players - 1) % (players - 1);
          if (a >= n || b >= n) continue;  // the bye of an odd n
          if (a > b) std::swap(a, b);
          any |= rotate_pair(w, v, n, m, a, b, norm2.data(), tol);
        }
        if (any) rotated.store(true, std::memory_order_relaxed);
      };
      if (parallel_pairs) at::parallel_for(0, half, 4, run);
      else run(0, half);
    }
    if (!rotated.load()) return;
  }
}

void jacobi_columns_cpu(at::Tensor& cols, at::Tensor& v) {
  const int64_t batch = cols.size(0), n = cols.size(1), m = cols.size(2);
  // Pairs in parallel only where the batch cannot feed every thread and the pairs are big
  // enough to pay for a parallel region per step.
  const bool parallel_pairs = batch < at::get_num_threads() && n * m >= 64 * 64;
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "jacobi_svd_cpu", [&] {
    scalar_t* w = cols.data_ptr<scalar_t>();
    scalar_t* vv = v.data_ptr<scalar_t>();
    if (parallel_pairs) {
      for (int64_t b = 0; b < batch; ++b) jacobi_one(w + b * n * m, vv + b * n * n, n, m, true);
      return;
    }
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) jacobi_one(w + b * n * m, vv + b * n * n, n, m, false);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& a) {
  return jacobi_svd_driver(a, jacobi_columns_cpu);
}

}  // namespace

at::Tensor gaussian_sketch_list_cpu(const std::vector<at::Tensor>& a, int64_t l, int64_t seed) {
  const at::Tensor& a0 = a.front();
  const int64_t m = a0.size(0), n = a0.size(1);
  at::Tensor y = at::zeros({static_cast<int64_t>(a.size()), m, l}, a0.options());
  if (m == 0 || l == 0 || n == 0) return y;
  std::vector<at::Tensor> y_parts;
  for (int64_t i = 0; i < y.size(0); ++i) y_parts.push_back(y.select(0, i));
  sketch_into(a, y_parts, n, l, seed);
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("gaussian_sketch", TORCH_FN(gaussian_sketch_cpu));
  m.impl("jacobi_svd", TORCH_FN(jacobi_svd_cpu));
  m.impl("rsvd", TORCH_FN(rsvd_driver));
  m.impl("batched_rsvd", TORCH_FN(batched_rsvd_driver));
  m.impl("svd_update", TORCH_FN(svd_update_driver));
}

}  // namespace lowrank::svd
