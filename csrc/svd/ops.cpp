// Argument checks and the device-generic drivers of the svd family. The drivers are plain
// ATen code (GEMMs, QR, Cholesky, triangular solves and, on CPU, the small SVDs go to the
// vendor libraries through ATen) around the family's two kernels, the Gaussian sketch and the
// one-sided Jacobi SVD (the small SVDs on GPUs).
#include "svd/ops.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/cpu_parallel.h"

namespace lowrank::svd {
namespace {

bool is_svd_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The family's ops called through the dispatcher, so a driver reaches each device's kernel.
at::Tensor call_gaussian_sketch(const at::Tensor& a, int64_t l, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowrank::gaussian_sketch", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(a, l, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_jacobi_svd(const at::Tensor& a) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowrank::jacobi_svd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(a);
}

// Batched matrix product. On CPU at::bmm hands each thread whole matrices of the batch
// (single-threaded GEMMs); one multi-threaded BLAS call per matrix measured ~15% faster for
// the drivers' shapes (12 x 2048^2 times 2048 x 138) on the 2-core dev machines.
at::Tensor batched_mm(const at::Tensor& a, const at::Tensor& b) {
  if (!a.device().is_cpu() || a.size(0) <= 1) return at::bmm(a, b);
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  for (int64_t i = 0; i < a.size(0); ++i) {
    at::Tensor out_i = out.select(0, i);
    at::mm_out(out_i, a.select(0, i), b.select(0, i));
  }
  return out;
}

// The matrices of an rsvd call: a stacked batch [b, m, n] in the work dtype, or (batched_rsvd
// on CPU) a list of [m, n] matrices of one shape, each read where it lies: no stacked copy of,
// e.g., a model's gradients (b m n fp32 bytes of transient memory; for 12 x 2048^2, 192 MB and
// 20-35 ms of a ~900 ms GaLore refresh, measured interleaved).
struct Matrices {
  at::Tensor stacked;            // [b, m, n], or undefined for a list
  std::vector<at::Tensor> list;  // [m, n] each (any strides), when `stacked` is undefined

  int64_t batch() const { return stacked.defined() ? stacked.size(0) : static_cast<int64_t>(list.size()); }
  at::Tensor operator[](int64_t i) const { return stacked.defined() ? stacked.select(0, i) : list[i]; }
  const at::Tensor& first() const { return stacked.defined() ? stacked : list.front(); }
};

// A X (A [b, m, n], X [b, n, l]) or, with transpose_a, A^T X (X [b, m, l]). On CPU each
// entry's product is formed as (X^T op(A)^T)^T, a column-major result: MKL runs the
// transposed-A product ~13% slower at the drivers' shapes (2048^2 by 138: 128 against 147
// GFLOP/s on the 2-core dev machines) and the plain one no faster, and LAPACK's QR, which
// takes these products next, wants column-major input (a row-major one is copied first).
at::Tensor product(const Matrices& a, const at::Tensor& x, bool transpose_a) {
  const at::Tensor& a0 = a.first();
  if (!a0.device().is_cpu()) return at::bmm(transpose_a ? a.stacked.transpose(1, 2) : a.stacked, x);
  const int64_t rows = a0.size(transpose_a ? -1 : -2);
  at::Tensor out_t = at::empty({a.batch(), x.size(2), rows}, x.options());  // the transposed products
  for (int64_t i = 0; i < a.batch(); ++i) {
    const at::Tensor ai = a[i];
    at::Tensor out_i = out_t.select(0, i);
    at::mm_out(out_i, x.select(0, i).t(), transpose_a ? ai : ai.t());
  }
  return out_t.transpose(1, 2);
}

double unit_roundoff(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::epsilon() / 2 : std::numeric_limits<float>::epsilon() / 2;
}

// Deterministic signs: each column of U has its largest-magnitude entry (the first, on ties)
// positive; the matching row of Vh flips with it, so U S Vh is unchanged.
void fix_signs(at::Tensor& u, at::Tensor* vh) {
  if (u.numel() == 0) return;
  const at::Tensor idx = u.abs().argmax(-2, /*keepdim=*/true);  // [b, 1, p]
  at::Tensor sign = u.gather(-2, idx).sign();
  sign = at::where(sign == 0, at::ones_like(sign), sign);
  u = u * sign;
  if (vh) *vh = *vh * sign.transpose(-2, -1);
}

// A CPU algorithm switch read from the environment at each call: true for the CPU's default
// (unset or `dflt`), false for `other` (the GPU's algorithm, run on CPU by the tests).
bool cpu_default_algorithm(const char* name, const char* dflt, const char* other) {
  const char* env = std::getenv(name);
  if (env == nullptr || std::strcmp(env, dflt) == 0) return true;
  TORCH_CHECK(std::strcmp(env, other) == 0, name, " must be '", dflt, "' or '", other, "', got '", env, "'");
  return false;
}

// The small SVDs inside the drivers (rsvd's l x l R^T, svd_update's middle matrix): the Jacobi
// kernel on GPUs, where one launch runs a whole batch; on CPU, LAPACK's divide-and-conquer
// gesdd (at::linalg_svd) in fp64, 3-5x faster than the fp32 Jacobi kernel at these sizes on
// the 2-core dev VMs (one thread: 106^2 3.5 against 10.7 ms, 138^2 6.3 against 20.5 ms, 266^2
// 30 against 140 ms): StreamingSVD 2.1x and rsvd 2-4% faster there (interleaved A/B).
// LOWRANK_CPU_SMALL_SVD=jacobi runs the kernel on CPU (the tests run the drivers both ways).
bool cpu_lapack_small_svd(const at::Tensor& a) {
  return a.device().is_cpu() && cpu_default_algorithm("LOWRANK_CPU_SMALL_SVD", "lapack", "jacobi");
}

// u, s, vh with NaN in every batch entry whose input was not finite (finite: [b] bools).
void nan_where_not_finite(const at::Tensor& finite, at::Tensor& u, at::Tensor& s, at::Tensor& vh) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  u = at::where(finite.view({-1, 1, 1}), u, at::full_like(u, nan));
  s = at::where(finite.view({-1, 1}), s, at::full_like(s, nan));
  vh = at::where(finite.view({-1, 1, 1}), vh, at::full_like(vh, nan));
}

// U, S, Vh (reduced) of a [m, n] or [b, m, n] work-dtype matrix, as call_jacobi_svd returns them:
// columns of U signed by fix_signs, NaN factors for a matrix holding inf or NaN (where LAPACK's
// result is undefined), the others untouched by it. Should gesdd report no convergence (torch
// then raises; not seen here in fp64 on finite input, but MKL has been reported to on rare
// inputs) the call falls back to the Jacobi kernel, which cannot fail.
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_svd(const at::Tensor& a_in) {
  if (!cpu_lapack_small_svd(a_in)) return call_jacobi_svd(a_in);
  const at::Tensor a = a_in.dim() == 2 ? a_in.unsqueeze(0) : a_in;
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2), p = std::min(m, n);
  const at::Tensor finite = at::isfinite(a).flatten(1).all(1);  // [b]; read on the host: free on CPU
  const bool all_finite = finite.all().item<bool>();
  // in fp64 whatever the work dtype: LAPACK's error is eps * sigma_max, and in fp32 that mixes
  // up the directions near the working precision's floor that rsvd's truncation picks from
  // (2048 x 1024, k = 128, sigma_i = 0.9^i: 1.46x the optimal error with fp32 gesdd, within
  // 1.05x with fp64 gesdd or fp32 Jacobi, whose dots accumulate in fp64)
  const at::Tensor clean =
      (all_finite ? a : at::where(finite.view({-1, 1, 1}), a, at::zeros_like(a))).to(at::kDouble);
  at::Tensor u, s, vh;
  try {
    if (b < at::get_num_threads() || at::in_parallel_region()) {
      std::optional<SingleThreadedBlas> one_thread;  // on a worker of a parallel region (cpu_blas.h)
      if (at::in_parallel_region()) one_thread.emplace();
      std::tie(u, s, vh) = at::linalg_svd(clean, /*full_matrices=*/false);
    } else {  // a matrix per thread, single-threaded LAPACK (as householder_qr_cpu)
      u = at::empty({b, m, p}, clean.options());
      s = at::empty({b, p}, clean.options());
      vh = at::empty({b, p, n}, clean.options());
      parallel_for_as_caller(0, b, 1, [&](int64_t b0, int64_t b1) {
        const SingleThreadedBlas one_thread;
        for (int64_t i = b0; i < b1; ++i) {
          at::Tensor ui = u.select(0, i), si = s.select(0, i), vhi = vh.select(0, i);
          at::linalg_svd_out(ui, si, vhi, clean.select(0, i), /*full_matrices=*/false);
        }
      });
    }
  } catch (const c10::Error&) {
    return call_jacobi_svd(a_in);
  }
  u = u.to(a.scalar_type());
  s = s.to(a.scalar_type());
  vh = vh.to(a.scalar_type());
  if (!all_finite) nan_where_not_finite(finite, u, s, vh);
  fix_signs(u, &vh);
  if (a_in.dim() == 2) return {u.squeeze(0), s.squeeze(0), vh.squeeze(0)};
  return {u, s, vh};
}

struct Orthonormal {
  at::Tensor q, r;  // y = q r, q [b, m, l] orthonormal columns, r [b, l, l] upper triangular
};

// Shifted CholeskyQR (after Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, SISC 2020): a
// first CholeskyQR pass on Y^T Y + s I with s = 100 u ||Y||_F^2 cannot break down for a
// finite Y of full numerical rank and leaves kappa(Q1) <= 1/sqrt(100 u) (~400 in fp32), where
// plain CholeskyQR is accurate; a second, plain pass then gives kappa(Q2) ~ 1 + 1e-2 and a
// third orthonormality to working precision. (Their shift, 11 (m l + l (l + 1)) u ||Y||_2^2,
// guarantees the first pass for any rounding but exceeds ||Y||^2 in fp32 once m l > ~1e6:
// the pass would then barely condition Y.) The span of Q1 is that of Y whatever the shift.
// Every pass is two GEMMs (the Gram, and Y R^-1 with the l x l inverse formed first, twice
// as fast as a TRSM on the tall Y): no Householder panel factorisation, where GPUs lose time
// on tall-skinny matrices. The third pass's Gram doubles as the check: if Q2^T Q2 is far from
// I (Y rank deficient, zero or not finite) or a Cholesky fails, that batch entry falls back
// to Householder QR, which is orthonormal whatever Y is.
// `passes` = 2 stops after the second pass, a basis that is orthonormal to ~1e-2: all the
// power iterations need between products. Only a failed Cholesky falls back there.
// On CPU the orthonormalisation is Householder QR instead (LAPACK's blocked geqrf + orgqr):
// there it is faster than the CholeskyQR passes (rsvd of 12 x 2048^2, k = 128: 6% less time,
// measured interleaved in one process) and orthonormal to working precision whatever Y is.
// LOWRANK_CPU_ORTHONORMALIZATION=cholesky_qr runs the GPU's CholeskyQR on CPU (the tests
// check that algorithm this way on machines without a GPU).
bool cpu_householder(const at::Tensor& y) {
  return y.device().is_cpu() && cpu_default_algorithm("LOWRANK_CPU_ORTHONORMALIZATION", "householder", "cholesky_qr");
}

// Reduced Householder QR of each matrix of a CPU batch. With at least as many matrices as
// threads, each thread factors whole matrices with single-threaded LAPACK: the panel
// factorisations use two threads poorly (12 x [2048, 138]: 31 against 37 ms).
Orthonormal householder_qr_cpu(const at::Tensor& y) {
  const int64_t b = y.size(0), m = y.size(1), l = y.size(2);
  if (b < at::get_num_threads() || at::in_parallel_region()) {
    auto [q, r] = at::linalg_qr(y, "reduced");
    return {q, r};
  }
  const int64_t p = std::min(m, l);
  at::Tensor q = at::empty({b, p, m}, y.options()).transpose(1, 2);  // column-major, as LAPACK writes it
  at::Tensor r = at::empty({b, p, l}, y.options());
  parallel_for_as_caller(0, b, 1, [&](int64_t b0, int64_t b1) {
    const SingleThreadedBlas one_thread;  // else MKL's geqrf can wait for a nested team: a hang
    for (int64_t i = b0; i < b1; ++i) {
      at::Tensor qi = q.select(0, i), ri = r.select(0, i);
      at::linalg_qr_out(qi, ri, y.select(0, i), "reduced");  // qi is column-major: LAPACK's layout
    }
  });
  return {q, r};
}

Orthonormal orthonormalize(const at::Tensor& y, int passes = 3) {
  if (cpu_householder(y)) return householder_qr_cpu(y);
  const int64_t l = y.size(2);
  const double u = unit_roundoff(y.scalar_type());
  const at::Tensor eye = at::eye(l, y.options()).unsqueeze(0);
  at::Tensor ok = at::ones({y.size(0)}, y.options().dtype(at::kBool));
  // The smallest normal number on the diagonal of every Gram: a zero Y then gives Q = 0, not
  // a failed Cholesky and NaNs (and nothing else changes).
  const double tiny = y.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                     : static_cast<double>(std::numeric_limits<float>::min());
  auto pass = [&](const at::Tensor& q_in, const at::Tensor& gram) {
    auto [r, info] = at::linalg_cholesky_ex(gram + tiny * eye, /*upper=*/true);
    ok = ok & (info == 0);
    const at::Tensor r_inv = at::linalg_solve_triangular(r, eye.expand_as(r), /*upper=*/true);
    return std::make_pair(batched_mm(q_in, r_inv), r);
  };
  const at::Tensor gram = batched_mm(y.transpose(1, 2), y);
  const at::Tensor shift = gram.diagonal(0, 1, 2).sum(1).view({-1, 1, 1}) * (100.0 * u);  // ||Y||_F^2 = trace
  auto [q, r] = pass(y, gram + shift * eye);
  auto [q2, r2] = pass(q, batched_mm(q.transpose(1, 2), q));
  q = q2;
  r = batched_mm(r2, r);
  if (passes > 2) {
    const at::Tensor gram3 = batched_mm(q2.transpose(1, 2), q2);
    ok = ok & ((gram3 - eye).abs().amax({1, 2}) <= 0.1);  // false for NaN too
    auto [q3, r3] = pass(q2, gram3);
    q = q3;
    r = batched_mm(r3, r);
  }
  if (y.device().is_cpu()) {  // reading `ok` on the host is free here: QR only the failed entries
    const at::Tensor bad = (~ok).nonzero().squeeze(1);
    if (bad.numel() > 0) {
      auto [qh, rh] = at::linalg_qr(y.index_select(0, bad), "reduced");
      q = q.index_copy(0, bad, qh);
      r = r.index_copy(0, bad, rh);
    }
  } else {
    // No host synchronisation on a GPU: Householder QR is computed for every entry and
    // selected on the device. The two-pass bases between power iterations need it too: where
    // Y is rank deficient (rank < l), or its spectrum falls below the working precision within
    // l, Q1^T Q1 has eigenvalues ~u/100, under its rounding, and the unshifted second Cholesky
    // fails (a shifted one instead loses those directions: fp32 error past the 1.05x-optimal
    // test, measured with this path forced on the CPU).
    auto [qh, rh] = at::linalg_qr(y, "reduced");
    const at::Tensor keep = ok.view({-1, 1, 1});
    q = at::where(keep, q, qh);
    r = at::where(keep, r, rh);
  }
  return {q, r};
}

// Outputs are contiguous (what the fake kernels promise), without the batch dim of a 2-D input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(bool unbatch, const at::Tensor& u, const at::Tensor& s,
                                                      const at::Tensor& vh) {
  if (unbatch) return {u.squeeze(0).contiguous(), s.squeeze(0).contiguous(), vh.squeeze(0).contiguous()};
  return {u.contiguous(), s.contiguous(), vh.contiguous()};
}

// [b, m, n] in the work dtype. On CPU a batch of transposed matrices stays a view (the GEMMs and
// the CPU sketch read it through its strides: rsvd(G^T) copies nothing); else contiguous.
at::Tensor as_batched_work(const at::Tensor& a) {
  const at::Tensor b = (a.dim() == 2 ? a.unsqueeze(0) : a).to(work_dtype(a.scalar_type()));
  return b.device().is_cpu() && is_transposed_batch(b) ? b : b.contiguous();
}

}  // namespace

at::ScalarType work_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_transposed_batch(const at::Tensor& a) {
  return a.dim() == 3 && a.stride(1) == 1 && a.stride(2) == a.size(1) && a.stride(0) == a.size(1) * a.size(2);
}

void check_matrix_arg(const at::Tensor& a, const char* op, const char* name) {
  TORCH_CHECK(a.dim() == 2 || a.dim() == 3, op, ": ", name, " must be 2-D [m, n] or 3-D [batch, m, n], got shape ",
              a.sizes());
  TORCH_CHECK_TYPE(is_svd_dtype(a.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", a.scalar_type());
}

void check_sketch_args(const at::Tensor& a, int64_t l) {
  check_matrix_arg(a, "gaussian_sketch", "A");
  TORCH_CHECK(l >= 0, "gaussian_sketch: the number of sketch columns l must be >= 0, got ", l);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_driver(const at::Tensor& a_in, JacobiKernel kernel) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: nothing here is recorded
  check_matrix_arg(a_in, "jacobi_svd", "A");
  const at::Tensor a = as_batched_work(a_in);
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2), p = std::min(m, n);
  const bool wide = m < n;
  const at::Tensor tall = wide ? a.transpose(1, 2) : a;  // [batch, mm, p], mm >= p
  at::Tensor u, s, vh;
  if (p == 0 || batch == 0) {
    u = at::zeros({batch, tall.size(1), p}, a.options());
    s = at::zeros({batch, p}, a.options());
    vh = at::zeros({batch, p, p}, a.options());
  } else {
    // Each matrix is first scaled by a power of two (exact) to a largest |entry| in [0.5, 1), as
    // LAPACK's gesvj does: the rotations' dot products and the column norms then neither
    // overflow nor underflow however large or small A is (fp32 entries of 3e20 or 1e-25 gave
    // S = inf or 0 unscaled); S is scaled back at the end. A matrix holding inf or NaN is run
    // as the identity (no zero columns to complete: the others' bits do not depend on it) and
    // gets NaN factors (as rsvd's do): never finite ones. No host synchronisation.
    const at::Tensor amax = tall.abs().amax({1, 2});  // [batch]: inf or NaN where not finite
    const at::Tensor finite = at::isfinite(amax);
    // amax = mantissa 2^exponent, mantissa in [0.5, 1); the clamp keeps 2^-exponent finite for
    // subnormal amax (whose scaled entries then stay below 0.5)
    const int min_exponent = a.scalar_type() == at::kDouble ? std::numeric_limits<double>::min_exponent
                                                             : std::numeric_limits<float>::min_exponent;
    const at::Tensor exponent = std::get<1>(at::frexp(at::where(finite & (amax > 0), amax, at::ones_like(amax))))
                                    .clamp_min(min_exponent)
                                    .to(a.scalar_type());
    const at::Tensor scale = at::exp2(-exponent).view({-1, 1, 1});
    const at::Tensor scaled =
        at::where(finite.view({-1, 1, 1}), tall * scale, at::eye(tall.size(1), p, tall.options()).unsqueeze(0));
    // A tall matrix is then reduced to its p x p triangle: Jacobi rotates p-long columns.
    at::Tensor q_tall;
    at::Tensor work = scaled;
    if (scaled.size(1) >= 2 * p) std::tie(q_tall, work) = at::linalg_qr(scaled, "reduced");
    at::Tensor cols = work.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // row j = column j; never A itself
    at::Tensor v = at::eye(p, a.options()).unsqueeze(0).repeat({batch, 1, 1});  // row j = column j of V
    kernel(cols, v);
    s = at::linalg_vector_norm(cols, 2, {2}, /*keepdim=*/false, at::kDouble).to(cols.scalar_type());
    // A column this short (the largest |entry| is in [0.5, 1) here) has subnormal fp32 entries,
    // or fp64 entries whose squares are subnormal: the rotations cannot keep it orthogonal to the
    // others (U columns of norm 1.4 overlapping others came out). Its singular value is zero to
    // working range, and U's column is completed like an exact zero's, below.
    const double negligible = a.scalar_type() == at::kDouble
                                  ? std::sqrt(std::numeric_limits<double>::min()) / std::numeric_limits<double>::epsilon()
                                  : std::numeric_limits<float>::min() / std::numeric_limits<float>::epsilon();
    s = at::where(s <= negligible, at::zeros_like(s), s);
    const at::Tensor order = at::argsort(s, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    s = s.gather(1, order);
    cols = cols.gather(1, order.unsqueeze(2).expand_as(cols));
    vh = v.gather(1, order.unsqueeze(2).expand_as(v));
    const at::Tensor nonzero = (s > 0).unsqueeze(2);
    u = at::where(nonzero, cols / at::where(nonzero, s.unsqueeze(2), at::ones_like(s).unsqueeze(2)),
                  at::zeros_like(cols)).transpose(1, 2);
    // Zero singular values leave zero columns: complete U to orthonormal columns with a
    // Householder QR, which keeps the (already orthonormal) others up to sign.
    if (!(s.device().is_cpu()) || (s == 0).any().item<bool>()) {
      auto [qc, rc] = at::linalg_qr(u, "reduced");
      at::Tensor sign = rc.diagonal(0, 1, 2).sign();
      sign = at::where(sign == 0, at::ones_like(sign), sign);
      u = qc * sign.unsqueeze(1);
    }
    if (q_tall.defined()) u = batched_mm(q_tall, u);
    s = s / scale.view({-1, 1});
    nan_where_not_finite(finite, u, s, vh);
  }
  if (wide) {  // A^T = U S Vh  =>  A = Vh^T S U^T
    std::swap(u, vh);
    u = u.transpose(1, 2).contiguous();
    vh = vh.transpose(1, 2).contiguous();
  }
  fix_signs(u, &vh);
  return finish(a_in.dim() == 2, u, s, vh);
}

namespace {

void check_rsvd_args(int64_t m, int64_t n, int64_t k, int64_t oversample, int64_t n_iter, const char* op,
                     at::IntArrayRef shape) {
  TORCH_CHECK(k >= 1 && k <= std::min(m, n), op, ": k must be in [1, min(m, n)] = [1, ", std::min(m, n),
              "] for A of shape ", shape, ", got k = ", k);
  TORCH_CHECK(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
}

// The sketch width: k + oversample, at most min(m, n).
int64_t sketch_columns(int64_t m, int64_t n, int64_t k, int64_t oversample) {
  return k + std::min(oversample, std::min(m, n) - k);  // k <= min(m, n): no overflow
}

// The optional warm start of rsvd: [m, j] for a 2-D A, [b, m, j] for a batch (and for
// batched_rsvd), 1 <= j <= l sketch columns, a float dtype, on A's device. Returned as
// [b, m, j] in the work dtype.
at::Tensor start_arg(const at::Tensor& start, const at::Tensor& a, bool a_batched, int64_t b, int64_t m, int64_t l,
                     const char* op) {
  check_same_device(start, a, op, "start", "A");
  TORCH_CHECK_TYPE(is_svd_dtype(start.scalar_type()), op,
                   ": start must be float32, float16, bfloat16 or float64, got ", start.scalar_type());
  const bool shape_ok = a_batched ? start.dim() == 3 && start.size(0) == b && start.size(1) == m
                                  : start.dim() == 2 && start.size(0) == m;
  TORCH_CHECK(shape_ok, op, ": start must be ", a_batched ? "[batch, m, j] with batch = " : "[m, j] with",
              a_batched ? std::to_string(b) + " and" : std::string(), " m = ", m, " (A's rows), got shape ",
              start.sizes());
  const int64_t j = start.size(-1);
  TORCH_CHECK(j >= 1 && j <= l, op, ": start must have between 1 and l = min(k + oversample, m, n) = ", l,
              " columns, got ", j);
  return (a_batched ? start : start.unsqueeze(0)).to(work_dtype(a.scalar_type()));
}

// rsvd of b matrices [m, n] (in the work dtype): U [b, m, k], S [b, k], Vh [b, k, n].
// `start` (optional, [b, m, j] in the work dtype): a warm start of the range finder (below).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_matrices(const Matrices& a, int64_t m, int64_t n, int64_t k,
                                                             int64_t oversample, int64_t n_iter, int64_t seed,
                                                             const std::optional<at::Tensor>& start) {
  const int64_t l = sketch_columns(m, n, k, oversample);
  // Range finder with power iterations, re-conditioned after every product (Halko et al.,
  // Algorithm 4.4): in fp32 an unorthonormalised (A A^T)^q A Omega loses all but the top
  // directions to rounding. Only the final basis needs to be orthonormal.
  auto sketch = [&](int64_t columns) {
    return a.stacked.defined() ? call_gaussian_sketch(a.stacked, columns, seed)
                               : gaussian_sketch_list_cpu(a.list, columns, seed);
  };
  at::Tensor q;
  if (!start) {
    q = sketch(l);
  } else {
    // Warm start (subspace iteration from a previous basis, as PowerSGD and GaLore refreshes
    // can): the start's j columns, then the first l - j columns of the cold sketch A Omega.
    // Every column is scaled to unit norm first: a previous basis has norm-1 columns and
    // A Omega's are ~||A|| long, and the shifted CholeskyQR (GPUs) conditions a basis relative
    // to its longest columns. The span is unchanged; a zero column stays zero, a non-finite
    // one gives NaN factors.
    const int64_t j = start->size(2);
    q = j == l ? *start : at::cat({*start, sketch(l - j)}, 2);
    const double tiny = std::numeric_limits<float>::min();
    q = q / at::linalg_vector_norm(q, 2, {1}, /*keepdim=*/true).clamp_min(tiny);
  }
  for (int64_t i = 0; i < n_iter; ++i) {
    const at::Tensor z = orthonormalize(product(a, orthonormalize(q, 2).q, /*transpose_a=*/true), 2).q;
    q = product(a, z, /*transpose_a=*/false);
  }
  q = orthonormalize(q).q;
  // A ~ Q Q^T A = Q Z^T with Z = A^T Q = Q2 R, so A ~ Q R^T Q2^T: only the l x l R^T needs an
  // SVD (small_svd), and both factors come out of GEMMs.
  const Orthonormal z = orthonormalize(product(a, q, /*transpose_a=*/true));
  auto [ur, sr, vhr] = small_svd(z.r.transpose(1, 2));
  at::Tensor u = batched_mm(q, ur.narrow(2, 0, k));
  at::Tensor s = sr.narrow(1, 0, k).contiguous();
  // Vh^T = Q2 V_r, formed as that product (MKL's vhr Q2^T, k rows only, rounds differently with
  // the thread count at small k). Bits are still reproducible per thread count only, as the
  // docs say: the GEMMs above split their sums by thread count (3 or 5 threads differ from 1, 2)
  at::Tensor vh = batched_mm(z.q, vhr.narrow(1, 0, k).transpose(1, 2)).transpose(1, 2);
  fix_signs(u, &vh);
  return {u, s, vh};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_driver(const at::Tensor& a_in, int64_t k, int64_t oversample,
                                                           int64_t n_iter, int64_t seed,
                                                           const std::optional<at::Tensor>& start_in) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: nothing here is recorded
  check_matrix_arg(a_in, "rsvd", "A");
  const int64_t m = a_in.size(-2), n = a_in.size(-1);
  check_rsvd_args(m, n, k, oversample, n_iter, "rsvd", a_in.sizes());
  const bool batched = a_in.dim() == 3;
  std::optional<at::Tensor> start;
  if (start_in) {
    start = start_arg(*start_in, a_in, batched, batched ? a_in.size(0) : 1, m, sketch_columns(m, n, k, oversample),
                      "rsvd");
  }
  auto [u, s, vh] = rsvd_matrices(Matrices{as_batched_work(a_in), {}}, m, n, k, oversample, n_iter, seed, start);
  return finish(!batched, u, s, vh);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_rsvd_driver(at::TensorList a_in, int64_t k, int64_t oversample,
                                                                   int64_t n_iter, int64_t seed,
                                                                   const std::optional<at::Tensor>& start_in) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: nothing here is recorded
  const char* op = "batched_rsvd";
  TORCH_CHECK(!a_in.empty(), op, ": needs at least one matrix");
  const at::Tensor& a0 = a_in.front();
  for (size_t i = 0; i < a_in.size(); ++i) {
    const at::Tensor& ai = a_in[i];
    TORCH_CHECK(ai.dim() == 2, op, ": every matrix must be 2-D [m, n], got shape ", ai.sizes(), " at position ", i);
    TORCH_CHECK_TYPE(is_svd_dtype(ai.scalar_type()), op, ": matrices must be float32, float16, bfloat16 or float64, got ",
                     ai.scalar_type(), " at position ", i);
    TORCH_CHECK(ai.sizes() == a0.sizes() && ai.scalar_type() == a0.scalar_type(), op,
                ": the matrices must share one shape and dtype: ", a0.sizes(), " ", a0.scalar_type(), " at 0, ",
                ai.sizes(), " ", ai.scalar_type(), " at ", i, " (batched_rsvd in lowrank_ext.linalg groups them)");
    check_same_device(ai, a0, op, "every matrix", "the first");
  }
  const int64_t m = a0.size(0), n = a0.size(1);
  check_rsvd_args(m, n, k, oversample, n_iter, op, a0.sizes());
  std::optional<at::Tensor> start;
  if (start_in) {
    start = start_arg(*start_in, a0, /*a_batched=*/true, static_cast<int64_t>(a_in.size()), m,
                      sketch_columns(m, n, k, oversample), op);
  }
  const at::ScalarType wt = work_dtype(a0.scalar_type());
  Matrices a;
  if (a0.device().is_cpu()) {
    for (const at::Tensor& ai : a_in) a.list.push_back(ai.to(wt));  // no copy for a work-dtype matrix
  } else {
    a.stacked = at::stack(a_in).to(wt);  // GPUs: one batched GEMM per product; the copy is cheap there
  }
  auto [u, s, vh] = rsvd_matrices(a, m, n, k, oversample, n_iter, seed, start);
  return finish(false, u, s, vh);
}

std::tuple<at::Tensor, at::Tensor> svd_update_driver(const at::Tensor& u_in, const at::Tensor& s_in,
                                                     const at::Tensor& x_in, int64_t k) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: nothing here is recorded
  const char* op = "svd_update";
  TORCH_CHECK(u_in.dim() == 2 && x_in.dim() == 2 && s_in.dim() == 1, op,
              ": U must be [m, k0], S [k0] and X [m, c], got shapes ", u_in.sizes(), ", ", s_in.sizes(), " and ",
              x_in.sizes());
  TORCH_CHECK(u_in.size(0) == x_in.size(0) && s_in.size(0) == u_in.size(1), op, ": U ", u_in.sizes(), ", S ",
              s_in.sizes(), " and X ", x_in.sizes(), " do not fit together (U [m, k0], S [k0], X [m, c])");
  for (const auto* t : {&u_in, &s_in, &x_in})
    TORCH_CHECK_TYPE(is_svd_dtype(t->scalar_type()), op, ": U, S and X must be float tensors, got ",
                     t->scalar_type());
  check_same_device(u_in, x_in, op, "U", "X");
  check_same_device(s_in, x_in, op, "S", "X");
  const int64_t m = x_in.size(0);
  const int64_t k_max = std::min(m, u_in.size(1) + x_in.size(1));
  TORCH_CHECK(k >= 1 && k <= k_max, op, ": k must be in [1, min(m, k0 + c)] = [1, ", k_max, "], got ", k);
  const at::ScalarType wt =
      (u_in.scalar_type() == at::kDouble || x_in.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  at::Tensor u = u_in.to(wt), s = s_in.to(wt);
  const at::Tensor x = x_in.to(wt);
  // Columns are taken in blocks of at most max(64, 2k) (and m): the small SVD is of a matrix of
  // at most (k0 + c)^2.
  const int64_t block = std::min<int64_t>(std::max<int64_t>(64, 2 * k), m);
  // With no new columns (c = 0) the loop still runs once, on an empty block: the result is then
  // the top k of [U diag(S)] in new tensors, as for any other X (not the inputs themselves).
  for (int64_t c0 = 0; c0 == 0 || c0 < x.size(1); c0 += block) {
    const at::Tensor xb = x.narrow(1, c0, std::min(block, x.size(1) - c0));
    const int64_t k0 = u.size(1), c = xb.size(1);
    // Project out the current basis twice (classical Gram-Schmidt twice): C = U^T X and the
    // residual X - U C, orthogonal to U to working precision.
    at::Tensor coef = at::mm(u.t(), xb);
    at::Tensor resid = xb - at::mm(u, coef);
    const at::Tensor coef2 = at::mm(u.t(), resid);
    resid = resid - at::mm(u, coef2);
    coef = coef + coef2;
    // The residual's basis Q must be orthogonal to U whatever its rank: where X lies (nearly) in
    // span(U) the residual is rounding noise, and a QR of it alone gives unit columns anywhere,
    // U's directions included (then [U Q] counts them twice: S doubled, U^T U far from I).
    // The last columns of a Householder QR of [U, residual] are orthonormal and orthogonal to
    // span(U) to working precision in every case; R = Q^T residual is then ~0 for noise. It
    // costs a larger QR (streaming 1024 x 8192, k = 32: ~15% more time), so the CPU takes it
    // only when the residual's own basis fails the check |U^T Q| <= 16 sqrt(m) u (its Gram is
    // read on the host); CUDA always takes it (no host synchronisation).
    // (At most m - k0 columns: with k0 + c > m they complete the basis of R^m.)
    const int64_t cq = std::max<int64_t>(0, std::min(c, m - k0));
    at::Tensor q = at::zeros({m, 0}, x.options()), r;  // resid = Q R
    if (cq == c && cq > 0 && x.device().is_cpu()) {
      const Orthonormal own = orthonormalize(resid.unsqueeze(0));
      const double tol = 16.0 * std::sqrt(static_cast<double>(m)) * unit_roundoff(wt);
      if (k0 == 0 || at::mm(u.t(), own.q.squeeze(0)).abs().max().item<double>() <= tol) {
        q = own.q.squeeze(0);
        r = own.r.squeeze(0);
      }
    }
    if (cq > 0 && !r.defined()) {
      q = std::get<0>(at::linalg_qr(at::cat({u, resid}, 1), "reduced")).narrow(1, k0, cq);
      r = at::mm(q.t(), resid);
    }
    // [U Q] [[diag(S), C], [0, R]] = [U S, X]: the SVD of the small middle matrix updates U, S.
    at::Tensor middle = at::zeros({k0 + cq, k0 + c}, x.options());
    middle.narrow(0, 0, k0).narrow(1, 0, k0).diagonal().copy_(s);
    middle.narrow(0, 0, k0).narrow(1, k0, c).copy_(coef);
    if (cq > 0) middle.narrow(0, k0, cq).narrow(1, k0, c).copy_(r);
    auto [um, sm, vhm] = small_svd(middle);
    const int64_t keep = std::min(k, k0 + cq);
    u = at::mm(at::cat({u, q}, 1), um.narrow(1, 0, keep));
    s = sm.narrow(0, 0, keep).contiguous();
  }
  fix_signs(u, nullptr);
  return {u.contiguous(), s.contiguous()};
}

}  // namespace lowrank::svd
