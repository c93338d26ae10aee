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
// into feature-major buffers (in L3), so each entry is a contiguous dot product; entries
// accumulate chunk by chunk in fp32 (fp64 for fp64). The dense d_out x d_in gradient is never
// formed. The entries are visited in (column block, row) order: a thread owns a block of
// x's columns small enough to stay in its L2, and the entries of one row in that block reuse
// g's row from L1, so each entry streams ~one row from L2 instead of two from L3.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_clones.h"
#include "common/cpu_transpose.h"
#include "common/dtype.h"
#include "sparse/ops.h"

namespace lowrank::sparse {
namespace {

struct IndexScan {
  int64_t bad = -1;  // position of the first out-of-range index, or -1
  bool sorted = true;
};

// Whether idx[b, e) has an index outside [0, limit), and whether it descends anywhere from
// idx[b - 1] on: OR-reductions of compares without branches, so they run 8-wide.
struct ScanFlags {
  bool out_of_range, descends;
};
LOWRANK_CPU_CLONES ScanFlags scan_flags(const int64_t* __restrict idx, int64_t b, int64_t e, int64_t limit) {
  uint64_t out = 0, desc = 0;
  for (int64_t i = b; i < e; ++i) out |= static_cast<uint64_t>((idx[i] < 0) | (idx[i] >= limit));
  for (int64_t i = std::max<int64_t>(b, 1); i < e; ++i) desc |= static_cast<uint64_t>(idx[i] < idx[i - 1]);
  return {out != 0, desc != 0};
}

// One parallel pass: the first index outside [0, limit) and whether the indices ascend. The
// position of a bad index is searched for only once one is known to exist (the error path).
IndexScan scan_indices(const int64_t* idx, int64_t n, int64_t limit) {
  std::atomic<bool> out_of_range{false}, descends{false};
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    const ScanFlags f = scan_flags(idx, b, e, limit);
    if (f.out_of_range) out_of_range = true;
    if (f.descends) descends = true;
  });
  IndexScan all;
  all.sorted = !descends;
  if (out_of_range) {
    for (int64_t i = 0; i < n && all.bad < 0; ++i)
      if (idx[i] < 0 || idx[i] >= limit) all.bad = i;
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

// check_indices is not read: the CPU checks every index anyway (one pass over them, no
// synchronisation to save), so an out-of-range one always raises before anything is written.
void sparse_scatter_add_cpu(const at::Tensor& weight, at::TensorList indices, at::TensorList values,
                            at::ArrayRef<double> alphas, bool /*check_indices*/) {
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

// acc[j] += <g_buf + g_off[j], x_buf + x_off[j]> over len elements, for j in [j0, j1): each
// dot product with 8 independent partial sums (vectorizable; AVX2 where the CPU has it).
template <typename Acc>
LOWRANK_CPU_CLONES void accumulate_dots(const Acc* g_buf, const Acc* x_buf, const int64_t* g_off,
                                        const int64_t* x_off, int64_t j0, int64_t j1, int64_t len, Acc* acc) {
  for (int64_t j = j0; j < j1; ++j) {
    const Acc* a = g_buf + g_off[j];
    const Acc* b = x_buf + x_off[j];
    Acc s[8] = {};
    int64_t k = 0;
    for (; k + 8 <= len; k += 8)
      for (int u = 0; u < 8; ++u) s[u] += a[k + u] * b[k + u];
    for (; k < len; ++k) s[0] += a[k] * b[k];
    acc[j] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

constexpr int64_t kTokens = 256;  // tokens per chunk: the feature-major buffers stay in L2/L3
// Row stride of those buffers: padded so that the 32 rows a transpose block writes do not
// all map to the same few L1 sets (a power-of-two stride of 1 KiB would).
constexpr int64_t kLd = kTokens + 16;

// dst[f * kLd + t] = src[(n0 + t) * cols + f] for the chunk's tokens (common/cpu_transpose.h:
// AVX2 16 x 16 tiles for fp32), in parallel over blocks of 64 features, src read along its rows.
template <typename T, typename Acc>
void transpose_chunk(const T* src, int64_t n0, int64_t rows, int64_t cols, Acc* dst) {
  constexpr int64_t kF = 64;
  at::parallel_for(0, (cols + kF - 1) / kF, 1, [&](int64_t b0, int64_t b1) {
    const int64_t f0 = b0 * kF, f1 = std::min(b1 * kF, cols);
    transpose_matrix(src + n0 * cols + f0, cols, rows, f1 - f0, dst + f0 * kLd, kLd);
  });
}

// The entries in visiting order: sorted by (column block, row) with a stable counting sort,
// and where each column block's entries start.
struct EntryOrder {
  std::vector<int64_t> perm;        // perm[j] = entry visited j-th
  std::vector<int64_t> block_start;  // entries of column block b: [block_start[b], block_start[b + 1])
};

// Two stable counting sorts (by row, then by column block): memory O(nnz + d_out + blocks).
EntryOrder order_entries(const int64_t* rows, const int64_t* cols, int64_t nnz, int64_t d_out, int64_t d_in,
                         int64_t col_block) {
  const int64_t nblocks = (d_in + col_block - 1) / col_block;
  std::vector<int64_t> by_row(static_cast<size_t>(nnz));
  {
    std::vector<int64_t> next(static_cast<size_t>(d_out + 1), 0);
    for (int64_t i = 0; i < nnz; ++i) ++next[rows[i] + 1];
    for (int64_t r = 0; r < d_out; ++r) next[r + 1] += next[r];
    for (int64_t i = 0; i < nnz; ++i) by_row[next[rows[i]]++] = i;
  }
  EntryOrder o;
  o.block_start.assign(static_cast<size_t>(nblocks + 1), 0);
  for (int64_t i = 0; i < nnz; ++i) ++o.block_start[cols[i] / col_block + 1];
  for (int64_t b = 0; b < nblocks; ++b) o.block_start[b + 1] += o.block_start[b];
  std::vector<int64_t> next(o.block_start.begin(), o.block_start.end() - 1);
  o.perm.resize(static_cast<size_t>(nnz));
  for (int64_t i : by_row) o.perm[next[cols[i] / col_block]++] = i;
  return o;
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
  if (nnz == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sddmm", [&] {
    using Acc = acc_t<scalar_t>;
    // a column block's rows of the x buffer take ~256 KiB: half of a core's L2 on the dev
    // machines (Zen 3), the other half for g's rows and the accumulators
    const int64_t col_block = std::max<int64_t>(1, (int64_t{256} << 10) / (kLd * static_cast<int64_t>(sizeof(Acc))));
    const EntryOrder order = order_entries(rp, cp, nnz, d_out, d_in, col_block);
    const int64_t nblocks = static_cast<int64_t>(order.block_start.size()) - 1;
    std::vector<int64_t> g_off(static_cast<size_t>(nnz)), x_off(static_cast<size_t>(nnz));  // in visiting order
    for (int64_t j = 0; j < nnz; ++j) {
      g_off[j] = rp[order.perm[j]] * kLd;
      x_off[j] = cp[order.perm[j]] * kLd;
    }
    // tasks: column blocks, a block with many entries split in consecutive pieces (so that a
    // small d_in still keeps every thread busy)
    const int64_t piece = std::max<int64_t>(256, nnz / (4 * at::get_num_threads()) + 1);
    std::vector<std::pair<int64_t, int64_t>> tasks;
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t j0 = order.block_start[b]; j0 < order.block_start[b + 1]; j0 += piece)
        tasks.emplace_back(j0, std::min(order.block_start[b + 1], j0 + piece));
    std::vector<Acc> acc(static_cast<size_t>(nnz), Acc(0));  // in visiting order
    std::vector<Acc> gt(static_cast<size_t>(d_out * kLd)), xt(static_cast<size_t>(d_in * kLd));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < n; n0 += kTokens) {
      const int64_t rows_in_chunk = std::min(kTokens, n - n0);
      transpose_chunk(gp, n0, rows_in_chunk, d_out, gt.data());
      transpose_chunk(xp, n0, rows_in_chunk, d_in, xt.data());
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          accumulate_dots(gt.data(), xt.data(), g_off.data(), x_off.data(), tasks[t].first, tasks[t].second,
                          rows_in_chunk, acc.data());
      });
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < nnz; ++j) op[order.perm[j]] = static_cast<scalar_t>(acc[j]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sparse_scatter_add_", TORCH_FN(sparse_scatter_add_cpu));
  m.impl("sddmm", TORCH_FN(sddmm_cpu));
}

}  // namespace lowrank::sparse
