// CPU kernels of the sparse family.
//
// sparse_scatter_add_: a first pass checks every index (and notes whether each adapter's
// indices are sorted) before anything is written. Then each thread owns a contiguous range
// of the weight and applies, adapter by adapter and in entry order, the entries that fall in
// it: repeated indices accumulate exactly as a serial loop would (same order, one rounding
// per entry), with no atomics. Sorted indices (what lowrank_ext's adapters store) let each
// thread binary-search its slice; unsorted ones are scanned by every thread.
//
// sddmm: dv_i = sum_n g[n, rows_i] x[n, cols_i]. Per chunk of tokens, g and x are transposed
// into feature-major buffers (in cache), so each entry is a contiguous dot product; entries
// accumulate chunk by chunk in fp32 (fp64 for fp64). The dense d_out x d_in gradient is never formed.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "sparse/ops.h"

namespace lowrank::sparse {
namespace {

struct IndexScan {
  int64_t bad = -1;  // position of the first out-of-range index, or -1
  bool sorted = true;
};

// One parallel pass: the first index outside [0, limit) and whether the indices ascend.
IndexScan scan_indices(const int64_t* idx, int64_t n, int64_t limit) {
  const int64_t nthreads = at::get_num_threads();
  std::vector<IndexScan> part(static_cast<size_t>(nthreads));
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    IndexScan& mine = part[static_cast<size_t>(at::get_thread_num())];
    for (int64_t i = b; i < e; ++i) {
      if ((idx[i] < 0 || idx[i] >= limit) && (mine.bad < 0 || i < mine.bad)) mine.bad = i;
      if (i > 0 && idx[i] < idx[i - 1]) mine.sorted = false;
    }
  });
  IndexScan all;
  for (const IndexScan& p : part) {
    if (p.bad >= 0 && (all.bad < 0 || p.bad < all.bad)) all.bad = p.bad;
    all.sorted = all.sorted && p.sorted;
  }
  return all;
}

constexpr int64_t kPrefetch = 16;  // entries ahead: about the misses one core keeps in flight

template <typename T, typename V>
void scatter_adapter(T* w, int64_t numel, const int64_t* idx, const V* val, int64_t n, double alpha, bool sorted) {
  using Acc = acc_t<T>;
  const Acc a = static_cast<Acc>(alpha);
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096 + 1));
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = numel * t / nthreads, hi = numel * (t + 1) / nthreads;  // this thread's weight range
      int64_t b = 0, e = n;
      if (sorted) {
        b = std::lower_bound(idx, idx + n, lo) - idx;
        e = std::lower_bound(idx + b, idx + n, hi) - idx;
      }
      for (int64_t i = b; i < e; ++i) {
        // the weight entries are cache misses (1% density: one per line): ask for them early
        if (i + kPrefetch < e) __builtin_prefetch(w + idx[i + kPrefetch], 1);
        const int64_t j = idx[i];
        if (j < lo || j >= hi) continue;
        w[j] = static_cast<T>(static_cast<Acc>(w[j]) + a * static_cast<Acc>(val[i]));
      }
    }
  });
}

void sparse_scatter_add_cpu(const at::Tensor& weight, at::TensorList indices, at::TensorList values,
                            at::ArrayRef<double> alphas) {
  check_scatter_args(weight, indices, values, alphas);
  const int64_t numel = weight.numel();
  std::vector<at::Tensor> idx(indices.size()), val(values.size());
  std::vector<bool> sorted(indices.size());
  for (size_t a = 0; a < indices.size(); ++a) {  // every check before the first write
    idx[a] = indices[a].contiguous();
    val[a] = values[a].contiguous();
    const IndexScan s = scan_indices(idx[a].const_data_ptr<int64_t>(), idx[a].numel(), numel);
    TORCH_CHECK(s.bad < 0, "sparse_scatter_add_: indices[", a, "][", s.bad, "] = ",
                s.bad >= 0 ? idx[a].const_data_ptr<int64_t>()[s.bad] : 0, " is out of range for a weight of ", numel,
                " elements; nothing was written");
    sorted[a] = s.sorted;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_scatter_add_", [&] {
    using W = scalar_t;
    W* w = weight.mutable_data_ptr<W>();
    for (size_t a = 0; a < idx.size(); ++a) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val[a].scalar_type(), "sparse_scatter_add_values",
                                      [&] {
                                        scatter_adapter<W, scalar_t>(w, numel, idx[a].const_data_ptr<int64_t>(),
                                                                     val[a].const_data_ptr<scalar_t>(),
                                                                     idx[a].numel(), alphas[a], sorted[a]);
                                      });
    }
  });
}

// Dot product of two contiguous spans with 8 independent partial sums (vectorizable).
template <typename Acc>
Acc dot(const Acc* a, const Acc* b, int64_t n) {
  Acc s[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[k + u] * b[k + u];
  for (; k < n; ++k) s[0] += a[k] * b[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

constexpr int64_t kTokens = 256;  // tokens per chunk: the feature-major buffers stay in L2/L3
// Row stride of those buffers: padded so that the 32 rows a transpose block writes do not
// all map to the same few L1 sets (a power-of-two stride of 1 KiB would).
constexpr int64_t kLd = kTokens + 16;

// dst[f * kLd + t] = src[(n0 + t) * cols + f] for the chunk's tokens: 32 x 32 blocks, reading
// src along its rows (its row stride is often a multiple of 4 KiB: striding it would hit one
// L1 set), in parallel over feature blocks.
template <typename T, typename Acc>
void transpose_chunk(const T* src, int64_t n0, int64_t rows, int64_t cols, Acc* dst) {
  constexpr int64_t kB = 32;
  at::parallel_for(0, (cols + kB - 1) / kB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t fb = b0; fb < b1; ++fb) {
      const int64_t f0 = fb * kB, f1 = std::min(f0 + kB, cols);
      for (int64_t t0 = 0; t0 < rows; t0 += kB) {
        const int64_t t1 = std::min(t0 + kB, rows);
        for (int64_t t = t0; t < t1; ++t) {
          const T* s = src + (n0 + t) * cols;
          for (int64_t f = f0; f < f1; ++f) dst[f * kLd + t] = static_cast<Acc>(s[f]);
        }
      }
    }
  });
}

at::Tensor sddmm_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& rows_in,
                     const at::Tensor& cols_in) {
  check_sddmm_args(grad_out_in, x_in, rows_in, cols_in);
  const at::Tensor g = grad_out_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const int64_t n = x.size(0), d_out = g.size(1), d_in = x.size(1), nnz = rows.numel();
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  const IndexScan sr = scan_indices(rp, nnz, d_out), sc = scan_indices(cp, nnz, d_in);
  TORCH_CHECK(sr.bad < 0, "sddmm: rows[", sr.bad, "] = ", sr.bad >= 0 ? rp[sr.bad] : 0,
              " is out of range for grad_out's ", d_out, " columns");
  TORCH_CHECK(sc.bad < 0, "sddmm: cols[", sc.bad, "] = ", sc.bad >= 0 ? cp[sc.bad] : 0,
              " is out of range for x's ", d_in, " columns");
  at::Tensor out = at::empty({nnz}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sddmm", [&] {
    using Acc = acc_t<scalar_t>;
    std::vector<Acc> acc(static_cast<size_t>(nnz), Acc(0));
    std::vector<Acc> gt(static_cast<size_t>(d_out * kLd)), xt(static_cast<size_t>(d_in * kLd));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < n; n0 += kTokens) {
      const int64_t rows_in_chunk = std::min(kTokens, n - n0);
      transpose_chunk(gp, n0, rows_in_chunk, d_out, gt.data());
      transpose_chunk(xp, n0, rows_in_chunk, d_in, xt.data());
      at::parallel_for(0, nnz, 1024, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) acc[i] += dot(gt.data() + rp[i] * kLd, xt.data() + cp[i] * kLd, rows_in_chunk);
      });
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < nnz; ++i) op[i] = static_cast<scalar_t>(acc[i]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sparse_scatter_add_", TORCH_FN(sparse_scatter_add_cpu));
  m.impl("sddmm", TORCH_FN(sddmm_cpu));
}

}  // namespace lowrank::sparse
