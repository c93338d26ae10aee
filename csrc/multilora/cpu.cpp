// CPU kernels of the multilora family. The tokens are grouped by adapter once per call (a
// stable counting sort over the ids, which also checks every id and rank before anything is
// written). lora_shrink / lora_expand_ then run each adapter's rows through BLAS with its
// slice of the stack, in cache-sized gathered chunks (see plan_work; in fp32, on CPUs with
// AVX2 and FMA and for R <= 64, the register-blocked kernel of common/cpu_blas.h reads the
// shrink's x rows and writes the expand's y rows in place instead); lora_grouped_outer
// (the stacks' gradients, a reduction over each group) runs one BLAS product per adapter on
// its rows: many small groups in parallel, one group per thread, a few large ones one after
// another, each on every thread (the BLAS call is then the parallel part).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/aten_gemm.h"
#include "common/cpu_blas.h"
#include "common/cpu_parallel.h"
#include "common/cpu_transpose.h"
#include "common/dtype.h"
#include "multilora/ops.h"

namespace lowrank::multilora {
namespace {

// Token indices grouped by adapter: tokens of adapter a are order[offsets[a] .. offsets[a+1]),
// in batch order; tokens with id -1 are left out.
struct TokenGroups {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;
  at::Tensor order_tensor;  // `order` as an int64 tensor (for index_select / index_copy_)

  int64_t begin(int64_t a) const { return offsets[a]; }
  int64_t count(int64_t a) const { return offsets[a + 1] - offsets[a]; }
  // the group's tokens form one contiguous range of the batch: use a view, not a gather
  bool contiguous(int64_t a) const {
    const int64_t c = count(a);
    return c > 0 && order[offsets[a] + c - 1] - order[offsets[a]] == c - 1;
  }
  int64_t first_token(int64_t a) const { return order[offsets[a]]; }
  at::Tensor index(int64_t a) const { return order_tensor.narrow(0, begin(a), count(a)); }
};

TokenGroups group_tokens(const at::Tensor& ids, int64_t num_adapters, const char* op) {
  const at::Tensor c = ids.contiguous();
  const int64_t n = c.size(0);
  TokenGroups g;
  g.offsets.assign(num_adapters + 2, 0);
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "multilora_group_tokens", [&] {
    const index_t* p = c.const_data_ptr<index_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = p[i];
      TORCH_CHECK_INDEX(id >= -1 && id < num_adapters, op, ": token_adapter_ids[", i, "] = ", id,
                        " is out of range for a stack of ", num_adapters, " adapters (valid: -1 .. ",
                        num_adapters - 1, ")");
      if (id >= 0) ++g.offsets[id + 2];
    }
    for (int64_t a = 0; a < num_adapters; ++a) g.offsets[a + 2] += g.offsets[a + 1];
    g.order.resize(g.offsets[num_adapters + 1]);
    for (int64_t i = 0; i < n; ++i)  // offsets[a + 1] is the next free slot of adapter a
      if (p[i] >= 0) g.order[g.offsets[p[i] + 1]++] = i;
  });
  g.offsets.pop_back();
  g.order_tensor = at::from_blob(g.order.data(), {static_cast<int64_t>(g.order.size())}, at::kLong);
  return g;
}

std::vector<int64_t> read_ranks(const std::optional<at::Tensor>& ranks, int64_t num_adapters, int64_t max_rank,
                                const char* op) {
  std::vector<int64_t> out(num_adapters, max_rank);
  if (!ranks) return out;
  const at::Tensor c = ranks->to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t a = 0; a < num_adapters; ++a) {
    TORCH_CHECK(p[a] >= 0 && p[a] <= max_rank, op, ": ranks[", a, "] = ", p[a], " is outside [0, R] = [0, ",
                max_rank, "]");
    out[a] = p[a];
  }
  return out;
}

std::vector<double> read_scales(const std::optional<at::Tensor>& scales, int64_t num_adapters) {
  std::vector<double> out(num_adapters, 1.0);
  if (!scales) return out;
  const at::Tensor c = scales->to(at::kDouble).contiguous();
  for (int64_t a = 0; a < num_adapters; ++a) out[a] = c.const_data_ptr<double>()[a];
  return out;
}

// The rows of adapter a of t: a view when they are contiguous, else a gathered copy.
at::Tensor rows_of(const at::Tensor& t, const TokenGroups& g, int64_t a) {
  return g.contiguous(a) ? t.narrow(0, g.first_token(a), g.count(a)) : at::index_select(t, 0, g.index(a));
}

// Runs fn(a) for every adapter with tokens: in parallel over adapters when there are many
// small groups (BLAS on a few rows does not use several threads well), else one at a time.
template <typename Fn>
void for_each_group(const TokenGroups& g, int64_t num_adapters, Fn&& fn) {
  std::vector<int64_t> busy;
  for (int64_t a = 0; a < num_adapters; ++a)
    if (g.count(a) > 0) busy.push_back(a);
  const int64_t tokens = static_cast<int64_t>(g.order.size()), groups = static_cast<int64_t>(busy.size());
  constexpr int64_t kSmallGroup = 128;  // rows below which one BLAS call per thread beats a shared one
  if (groups >= 2 * at::get_num_threads() && tokens < kSmallGroup * groups) {
    parallel_for_as_caller(0, groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(busy[i]);
    });
  } else {
    for (int64_t a : busy) fn(a);
  }
}

// Work of the token-parallel passes (shrink, expand). A group whose tokens are one long
// contiguous range of the batch (per-sequence adapters, or one adapter for all) is one BLAS
// call on views of x / y, threaded by BLAS. Every other group is split into chunks of up to
// chunk_rows tokens whose rows are gathered into (or produced in) a per-thread buffer that
// stays in cache, so a shuffled batch streams x and y once, as a single-adapter batch does;
// the chunks of all adapters run in one parallel loop (BLAS single-threaded inside), so many
// small groups and a few large ones are both spread over the threads.
struct Chunk {
  int64_t adapter, begin, rows;  // tokens g.order[begin .. begin + rows) of `adapter`
};

// Rows per chunk: a BLAS call repacks the adapter's [rank, d] slice each time, so chunks
// grow with the rank (32 rows = 512 KiB of fp32 at d = 4096, up to 128 for rank 64).
int64_t chunk_rows(int64_t max_rank) { return std::clamp<int64_t>(2 * max_rank, 32, 128); }

// The chunk's tokens are consecutive rows of the batch (per-sequence adapters): read in place.
bool chunk_is_contiguous(const TokenGroups& g, const Chunk& c) {
  return g.order[c.begin + c.rows - 1] - g.order[c.begin] == c.rows - 1;
}

struct Work {
  std::vector<Chunk> chunks;   // gathered, in the parallel loop
  std::vector<int64_t> whole;  // adapters done as one call on their contiguous rows
};

// whole_ok: the dtype lets a group's rows be used in place (x, y already the accumulate dtype)
Work plan_work(const TokenGroups& g, const std::vector<int64_t>& rk, int64_t rows_per_chunk, bool whole_ok) {
  Work w;
  for (int64_t a = 0; a < static_cast<int64_t>(rk.size()); ++a) {
    if (rk[a] == 0 || g.count(a) == 0) continue;
    if (whole_ok && g.count(a) >= 4 * rows_per_chunk && g.contiguous(a)) {
      w.whole.push_back(a);
      continue;
    }
    for (int64_t b = g.begin(a); b < g.begin(a) + g.count(a); b += rows_per_chunk)
      w.chunks.push_back({a, b, std::min(rows_per_chunk, g.begin(a) + g.count(a) - b)});
  }
  return w;
}

// Matrix `a` of a stack [S, P, Q] as the B operand of rm_gemm with op(B) = stack[a]^T [Q, P],
// read through the stack's strides when BLAS can (the backward passes transposed stacks):
// tb = true reads stack[a] row-major ([P, Q], ld >= Q), tb = false reads its transpose
// row-major ([Q, P], ld >= P). A stack in another dtype than Acc is converted first, only the
// matrices of adapters that have tokens (the others stay zero and are never read).
struct StackOperand {
  at::Tensor held;  // the tensor read (the stack itself or its converted copy)
  int64_t stride_s, ld;
  bool tb;
};

StackOperand transposed_operand(const at::Tensor& stack, const TokenGroups& g, at::ScalarType acc) {
  at::Tensor t = stack;
  if (t.scalar_type() != acc) {
    t = at::zeros(stack.sizes(), stack.options().dtype(acc));
    for (int64_t a = 0; a < stack.size(0); ++a)
      if (g.count(a) > 0) t.select(0, a).copy_(stack.select(0, a));
  }
  const int64_t P = t.size(1), Q = t.size(2);
  if ((t.stride(2) == 1 || Q == 1) && (P == 1 || t.stride(1) >= Q))
    return {t, t.stride(0), P == 1 ? std::max<int64_t>(Q, 1) : t.stride(1), true};
  if ((t.stride(1) == 1 || P == 1) && (Q == 1 || t.stride(2) >= P))
    return {t, t.stride(0), Q == 1 ? std::max<int64_t>(P, 1) : t.stride(2), false};
  t = t.contiguous();  // e.g. an expanded (stride 0) stack
  return {t, t.stride(0), std::max<int64_t>(Q, 1), true};
}

// A shrink chunk in fp32 through small_gemm_f32 (common/cpu_blas.h), which reads the chunk's
// x rows where they lie (no gather into a buffer, no packing): out [rows, rank] = x rows A[a]^T
// (measured, 4096 tokens, d = 4096, shuffled: 8-30% faster than gather + BLAS for 64-512
// adapters, 2.2x for 8).
// A[a]^T must be row-major [d_in, rank]: the backward's transposed stacks already are; the
// forward's are transposed once per adapter and thread into `at_buf` (cached: consecutive
// chunks are mostly one adapter's), or a k-panel at a time when `reused` says no later chunk
// of this thread takes the same A. Returns false where the kernel does not apply.
template <typename T, typename Acc>
bool shrink_chunk_small_gemm(const Chunk& c, const int64_t* tok, const T* x, int64_t d_in, const Acc* stack,
                             const StackOperand& a_op, int64_t rank, Acc* out, std::vector<Acc>& at_buf,
                             int64_t& at_adapter, bool reused) {
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<T, float> && std::is_same_v<Acc, float>) {
    if (!small_gemm_available()) return false;
    const float* a = stack + c.adapter * a_op.stride_s;
    const float* a_t = a;
    int64_t ld = a_op.ld;
    if (a_op.tb && !reused && at_adapter != c.adapter) {
      // A[a] serves this chunk alone (many adapters: one chunk each): transpose it a k-panel
      // at a time into an L2-sized buffer, each panel used right away, instead of writing the
      // whole [d_in, rank] A^T out to L3 and reading it back (64 adapters, rank 64: shrink
      // 11% faster; the same sums in the same order as the small_gemm_f32 call below)
      constexpr int64_t kPanel = 256;  // small_gemm_f32's own k-panel
      at_buf.resize(static_cast<size_t>(kPanel * rank));
      for (int64_t k0 = 0; k0 < d_in; k0 += kPanel) {
        const int64_t kk = std::min(kPanel, d_in - k0);
        transpose_matrix(a + k0, a_op.ld, rank, kk, at_buf.data(), rank);
        small_gemm_f32(c.rows, rank, kk, x + k0, d_in, 1, at_buf.data(), rank, out, rank, /*accumulate=*/k0 > 0, tok);
      }
      at_adapter = -1;  // at_buf holds a panel now
      return true;
    }
    if (a_op.tb) {  // A[a] stored [rank.., d_in] row-major
      if (at_adapter != c.adapter) {
        at_buf.resize(static_cast<size_t>(d_in * rank));
        transpose_matrix(a, a_op.ld, rank, d_in, at_buf.data(), rank);
        at_adapter = c.adapter;
      }
      a_t = at_buf.data(), ld = rank;
    }
    small_gemm_f32(c.rows, rank, d_in, x, d_in, 1, a_t, ld, out, rank, /*accumulate=*/false, tok);
    return true;
  }
#endif
  return false;
}

at::Tensor lora_shrink_cpu(const at::Tensor& x_in, const at::Tensor& a_stack, const at::Tensor& ids,
                           const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  constexpr const char* op = "lora_shrink";
  const at::NoGradGuard no_grad;
  const StackShapes s = check_shrink_args(x_in, a_stack, ids, ranks, scales, op);
  const auto acc = accumulate_type(x_in.scalar_type());
  const TokenGroups g = group_tokens(ids, s.num_adapters, op);
  const std::vector<int64_t> rk = read_ranks(ranks, s.num_adapters, s.max_rank, op);
  const std::vector<double> sc = read_scales(scales, s.num_adapters);
  const int64_t R = s.max_rank, rows_per_chunk = chunk_rows(R);
  const Work work = plan_work(g, rk, rows_per_chunk, x_in.scalar_type() == acc);
  const at::Tensor x = x_in.contiguous();
  const int64_t d_in = x.size(1);
  at::Tensor xa = at::zeros({s.n, R}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using Acc = acc_t<scalar_t>;
    const StackOperand a_op = transposed_operand(a_stack, g, acc);  // A[a] [R, d_in]
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Acc* ap = a_op.held.const_data_ptr<Acc>();
    Acc* xap = xa.mutable_data_ptr<Acc>();
    // xa rows [rows, rank] = scale x rows A[a, :rank]^T
    for (int64_t a : work.whole) {
      const int64_t t0 = g.first_token(a);
      rm_gemm<Acc>(false, a_op.tb, g.count(a), rk[a], d_in, reinterpret_cast<const Acc*>(xp) + t0 * d_in, d_in,
                   ap + a * a_op.stride_s, a_op.ld, Acc(0), xap + t0 * R, R, static_cast<Acc>(sc[a]));
    }
    at::parallel_for(0, static_cast<int64_t>(work.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      std::vector<Acc> xbuf, out(static_cast<size_t>(rows_per_chunk * R)), at_buf;
      int64_t at_adapter = -1;  // whose A^T at_buf holds
      for (int64_t ci = c0; ci < c1; ++ci) {
        const Chunk& c = work.chunks[ci];
        const int64_t* tok = g.order.data() + c.begin;
        const int64_t rank = rk[c.adapter];
        const bool reused = ci + 1 < c1 && work.chunks[ci + 1].adapter == c.adapter;
        if (shrink_chunk_small_gemm(c, tok, xp, d_in, ap, a_op, rank, out.data(), at_buf, at_adapter, reused)) {
          const Acc scale = static_cast<Acc>(sc[c.adapter]);
          for (int64_t i = 0; i < c.rows; ++i)
            for (int64_t j = 0; j < rank; ++j) xap[tok[i] * R + j] = scale * out[i * rank + j];
          continue;
        }
        xbuf.resize(static_cast<size_t>(rows_per_chunk * d_in));
        const Acc* rows = xbuf.data();  // the chunk's rows of x, [rows, d_in]
        if (std::is_same_v<scalar_t, Acc> && chunk_is_contiguous(g, c)) {
          rows = reinterpret_cast<const Acc*>(xp) + tok[0] * d_in;
        } else {
          for (int64_t i = 0; i < c.rows; ++i)
            std::transform(xp + tok[i] * d_in, xp + (tok[i] + 1) * d_in, xbuf.data() + i * d_in,
                           [](scalar_t v) { return static_cast<Acc>(v); });
        }
        rm_gemm<Acc>(false, a_op.tb, c.rows, rank, d_in, rows, d_in, ap + c.adapter * a_op.stride_s, a_op.ld, Acc(0),
                     out.data(), rank, static_cast<Acc>(sc[c.adapter]));
        for (int64_t i = 0; i < c.rows; ++i) std::copy_n(out.data() + i * rank, rank, xap + tok[i] * R);
      }
    });
  });
  return xa;
}

// The fp32 expand of the chunked groups through small_gemm_f32 (common/cpu_blas.h), straight
// into y's scattered rows: no product buffer and no second pass over it. Work items are
// (adapter, up to kRows of its tokens, a column panel of y); the panel of B[a]^T [rank, width]
// is transposed (and scaled) once per item into a 32 KiB buffer sized for L1 while the
// item's tokens go through it in 6-row blocks, each y row segment read and written once.
// Measured (4096 tokens, d = 4096, shuffled, shrink + expand, interleaved against the BLAS
// chunks): 64 adapters 12-22% faster at ranks 16-32, 5% at rank 64; panels of 64-256 KiB
// were slower than 16-32 KiB. Returns false where the kernel does not apply (then BLAS).
template <typename Acc>
bool expand_chunks_small_gemm(const TokenGroups& g, const Work& work, const std::vector<int64_t>& rk,
                              const std::vector<double>& sc, const Acc* xap, int64_t R, const Acc* bp,
                              const StackOperand& b_op, Acc* yp, int64_t d_out) {
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<Acc, float>) {
    if (!small_gemm_available() || R < 1 || R > kSmallGemmMaxK || d_out == 0) return false;  // 0: nothing to write
    constexpr int64_t kPanelBytes = 32 << 10;  // B^T panel sized for L1 (R <= 64: >= 128 columns)
    const int64_t width = std::min(d_out, kPanelBytes / (4 * R) / 16 * 16);
    const int64_t panels = (d_out + width - 1) / width;
    // Up to 256 rows per item amortise the panel's transpose (1 / 256 of its FMAs), but never
    // so few items that threads idle (one large shuffled group, few panels)
    int64_t total_rows = 0;
    for (const Chunk& c : work.chunks) total_rows += c.rows;
    int64_t max_rows = 256;
    while (max_rows > 32 && (total_rows + max_rows - 1) / max_rows * panels < 4 * at::get_num_threads()) max_rows /= 2;
    struct Item {
      int64_t adapter, begin, rows, col;
    };
    std::vector<Item> items;  // each adapter's consecutive chunks merged up to max_rows
    for (const Chunk& c : work.chunks) {
      const bool extends = !items.empty() && items.back().adapter == c.adapter &&
                           items.back().begin + items.back().rows == c.begin;  // one range of g.order
      if (extends && items.back().rows + c.rows <= max_rows) {
        items.back().rows += c.rows;
        continue;
      }
      items.push_back({c.adapter, c.begin, c.rows, 0});
    }
    std::vector<Item> all;
    for (const Item& it : items)
      for (int64_t j0 = 0; j0 < d_out; j0 += width) all.push_back({it.adapter, it.begin, it.rows, j0});
    at::parallel_for(0, static_cast<int64_t>(all.size()), 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> bt(static_cast<size_t>(R * width));
      for (int64_t ii = i0; ii < i1; ++ii) {
        const Item& it = all[ii];
        const int64_t rank = rk[it.adapter], w = std::min(width, d_out - it.col);
        const float scale = static_cast<float>(sc[it.adapter]);
        const float* b = bp + it.adapter * b_op.stride_s;
        if (b_op.tb) {  // B[a] stored [d_out, R]: its panel rows, transposed to [rank, w]
          transpose_matrix(b + it.col * b_op.ld, b_op.ld, w, rank, bt.data(), w);
        } else {  // stored as B[a]^T [R, d_out] already
          for (int64_t k = 0; k < rank; ++k) std::copy_n(b + k * b_op.ld + it.col, w, bt.data() + k * w);
        }
        if (scale != 1.f)
          for (int64_t k = 0; k < rank; ++k)
            for (int64_t e = 0; e < w; ++e) bt[k * w + e] *= scale;
        const int64_t* tok = g.order.data() + it.begin;
        // The next item's B panel is mostly another adapter's, a DRAM read that its transpose
        // would wait on: its lines are requested into L2 a slice per 6-row block of this item
        // (64 adapters, rank 64: expand 4-6% faster; 1-2% at rank 16)
        const Item* nx = ii + 1 < i1 && b_op.tb ? &all[ii + 1] : nullptr;
        const float* nb = nx ? bp + nx->adapter * b_op.stride_s + nx->col * b_op.ld : nullptr;
        const int64_t nb_rows = nx ? std::min(width, d_out - nx->col) : 0, nb_rank = nx ? rk[nx->adapter] : 0;
        const int64_t per_block = (nb_rows + (it.rows + 5) / 6 - 1) / std::max<int64_t>((it.rows + 5) / 6, 1);
        for (int64_t i = 0, block = 0; i < it.rows; i += 6, ++block) {
          for (int64_t r = block * per_block; r < std::min(nb_rows, (block + 1) * per_block); ++r)
            for (int64_t e = 0; e < nb_rank; e += 16) __builtin_prefetch(nb + r * b_op.ld + e, 0, 2);
          small_gemm_f32(std::min<int64_t>(6, it.rows - i), w, rank, xap, R, 1, bt.data(), w, yp + it.col, d_out,
                         /*accumulate=*/true, tok + i, tok + i);
        }
      }
    });
    return true;
  }
#endif
  return false;
}

// y[rows of a] += scale * xa[rows, :rank] B[a, :, :rank]^T for every adapter, in place on y.
void expand_into(at::Tensor& y_out, const at::Tensor& xa_in, const at::Tensor& b_stack, const at::Tensor& ids,
                 const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales, const char* op) {
  const at::NoGradGuard no_grad;
  const StackShapes s = check_expand_args(y_out, xa_in, b_stack, ids, ranks, scales, op);
  const auto acc = accumulate_type(y_out.scalar_type());
  const TokenGroups g = group_tokens(ids, s.num_adapters, op);
  const std::vector<int64_t> rk = read_ranks(ranks, s.num_adapters, s.max_rank, op);
  const std::vector<double> sc = read_scales(scales, s.num_adapters);
  const int64_t R = s.max_rank, rows_per_chunk = chunk_rows(R);
  const Work work = plan_work(g, rk, rows_per_chunk, y_out.scalar_type() == acc);
  if (work.chunks.empty() && work.whole.empty()) return;
  at::Tensor y = y_out.is_contiguous() ? y_out : y_out.contiguous();
  const at::Tensor xa = xa_in.to(acc).contiguous();
  const int64_t d_out = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand", [&] {
    using Acc = acc_t<scalar_t>;
    const StackOperand b_op = transposed_operand(b_stack, g, acc);  // B[a] [d_out, R]
    const Acc* bp = b_op.held.const_data_ptr<Acc>();
    const Acc* xap = xa.const_data_ptr<Acc>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    // y rows += scale xa rows [rows, rank] B[a, :, :rank]^T
    for (int64_t a : work.whole) {
      const int64_t t0 = g.first_token(a);
      rm_gemm<Acc>(false, b_op.tb, g.count(a), d_out, rk[a], xap + t0 * R, R, bp + a * b_op.stride_s, b_op.ld, Acc(1),
                   reinterpret_cast<Acc*>(yp) + t0 * d_out, d_out, static_cast<Acc>(sc[a]));
    }
    if (std::is_same_v<scalar_t, Acc> &&
        expand_chunks_small_gemm<Acc>(g, work, rk, sc, xap, R, bp, b_op, reinterpret_cast<Acc*>(yp), d_out))
      return;
    at::parallel_for(0, static_cast<int64_t>(work.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      std::vector<Acc> left(static_cast<size_t>(rows_per_chunk * R)), prod(static_cast<size_t>(rows_per_chunk * d_out));
      for (int64_t ci = c0; ci < c1; ++ci) {
        const Chunk& c = work.chunks[ci];
        const int64_t* tok = g.order.data() + c.begin;
        const int64_t rank = rk[c.adapter];
        const Acc scale = static_cast<Acc>(sc[c.adapter]);
        for (int64_t i = 0; i < c.rows; ++i) std::copy_n(xap + tok[i] * R, rank, left.data() + i * rank);
        if (std::is_same_v<scalar_t, Acc> && chunk_is_contiguous(g, c)) {  // straight into y's rows
          rm_gemm<Acc>(false, b_op.tb, c.rows, d_out, rank, left.data(), rank, bp + c.adapter * b_op.stride_s,
                       b_op.ld, Acc(1), reinterpret_cast<Acc*>(yp) + tok[0] * d_out, d_out, scale);
          continue;
        }
        // prod [rows, d_out] in cache, then each y row += scale * its prod row (one rounding)
        rm_gemm<Acc>(false, b_op.tb, c.rows, d_out, rank, left.data(), rank, bp + c.adapter * b_op.stride_s, b_op.ld,
                     Acc(0), prod.data(), d_out);
        for (int64_t i = 0; i < c.rows; ++i) {
          scalar_t* yr = yp + tok[i] * d_out;
          const Acc* pr = prod.data() + i * d_out;
          for (int64_t k = 0; k < d_out; ++k) yr[k] = static_cast<scalar_t>(static_cast<Acc>(yr[k]) + scale * pr[k]);
        }
      }
    });
  });
  if (!y.is_same(y_out)) y_out.copy_(y);
}

void lora_expand_inplace_cpu(at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack, const at::Tensor& ids,
                             const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  expand_into(y, inplace_expand_xa(y, xa, b_stack), b_stack, ids, ranks, scales, "lora_expand_");
}

at::Tensor lora_expand_cpu(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack,
                           const at::Tensor& ids, const std::optional<at::Tensor>& ranks,
                           const std::optional<at::Tensor>& scales) {
  constexpr const char* op = "lora_expand";
  check_expand_args(y, xa, b_stack, ids, ranks, scales, op);  // before the copy
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  expand_into(out, xa, b_stack, ids, ranks, scales, op);
  return out;
}

at::Tensor lora_grouped_outer_cpu(const at::Tensor& left, const at::Tensor& right, const at::Tensor& ids,
                                  int64_t num_adapters, const std::optional<at::Tensor>& scales) {
  constexpr const char* op = "lora_grouped_outer";
  const at::NoGradGuard no_grad;
  check_outer_args(left, right, ids, num_adapters, scales, op);
  const auto acc = (left.scalar_type() == at::kDouble || right.scalar_type() == at::kDouble) ? at::kDouble
                                                                                              : at::kFloat;
  const TokenGroups g = group_tokens(ids, num_adapters, op);
  const std::vector<double> sc = read_scales(scales, num_adapters);
  at::Tensor out = at::zeros({num_adapters, left.size(1), right.size(1)}, left.options().dtype(acc));
  for_each_group(g, num_adapters, [&](int64_t a) {
    at::Tensor dst = out.select(0, a);
    addmm_carrying_nan_(dst, rows_of(left, g, a).to(acc).t(), rows_of(right, g, a).to(acc), /*beta=*/0,
                        /*alpha=*/sc[a]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_shrink", TORCH_FN(lora_shrink_cpu));
  m.impl("lora_expand_", TORCH_FN(lora_expand_inplace_cpu));
  m.impl("lora_expand", TORCH_FN(lora_expand_cpu));
  m.impl("lora_grouped_outer", TORCH_FN(lora_grouped_outer_cpu));
}

}  // namespace lowrank::multilora
