// CPU kernels of the multilora family. The tokens are grouped by adapter once per call (a
// stable counting sort over the ids, which also checks every id and rank before anything is
// written); then each adapter's rows go through one BLAS product with its slice of the stack:
// a view of the rows when they are contiguous in the batch (per-sequence adapters), a gather
// otherwise. Many small groups run in parallel, one group per thread; a few large ones run
// one after another, each on every thread (the BLAS call is then the parallel part).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <vector>

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
    at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
      const at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
      for (int64_t i = b; i < e; ++i) fn(busy[i]);
    });
  } else {
    for (int64_t a : busy) fn(a);
  }
}

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& ids,
                           const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  constexpr const char* op = "lora_shrink";
  const at::NoGradGuard no_grad;
  const StackShapes s = check_shrink_args(x, a_stack, ids, ranks, scales, op);
  const auto acc = accumulate_type(x.scalar_type());
  const TokenGroups g = group_tokens(ids, s.num_adapters, op);
  const std::vector<int64_t> rk = read_ranks(ranks, s.num_adapters, s.max_rank, op);
  const std::vector<double> sc = read_scales(scales, s.num_adapters);
  at::Tensor xa = at::zeros({s.n, s.max_rank}, x.options().dtype(acc));
  for_each_group(g, s.num_adapters, [&](int64_t a) {
    if (rk[a] == 0) return;
    const at::Tensor rows = rows_of(x, g, a).to(acc);
    const at::Tensor w = a_stack.select(0, a).narrow(0, 0, rk[a]).to(acc);  // [rank, d_in]
    if (g.contiguous(a)) {
      at::Tensor dst = xa.narrow(0, g.first_token(a), g.count(a)).narrow(1, 0, rk[a]);
      dst.addmm_(rows, w.t(), /*beta=*/0, /*alpha=*/sc[a]);
    } else {
      at::Tensor prod = at::mm(rows, w.t());
      if (sc[a] != 1.0) prod.mul_(sc[a]);
      xa.narrow(1, 0, rk[a]).index_copy_(0, g.index(a), prod);
    }
  });
  return xa;
}

// y[rows of a] += scale * xa[rows, :rank] B[a, :, :rank]^T for every adapter, in place on y.
void expand_into(at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack, const at::Tensor& ids,
                 const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales, const char* op) {
  const at::NoGradGuard no_grad;
  const StackShapes s = check_expand_args(y, xa, b_stack, ids, ranks, scales, op);
  const auto acc = accumulate_type(y.scalar_type());
  const TokenGroups g = group_tokens(ids, s.num_adapters, op);
  const std::vector<int64_t> rk = read_ranks(ranks, s.num_adapters, s.max_rank, op);
  const std::vector<double> sc = read_scales(scales, s.num_adapters);
  const bool y_is_acc = y.scalar_type() == acc;
  for_each_group(g, s.num_adapters, [&](int64_t a) {
    if (rk[a] == 0) return;
    const at::Tensor rows = rows_of(xa, g, a).narrow(1, 0, rk[a]).to(acc);
    const at::Tensor w = b_stack.select(0, a).narrow(1, 0, rk[a]).to(acc);  // [d_out, rank]
    if (g.contiguous(a)) {
      at::Tensor dst = y.narrow(0, g.first_token(a), g.count(a));
      if (y_is_acc) dst.addmm_(rows, w.t(), /*beta=*/1, /*alpha=*/sc[a]);
      else dst.add_(at::mm(rows, w.t()), sc[a]);  // computed in fp32, one rounding into y's dtype
    } else if (y_is_acc) {
      y.index_add_(0, g.index(a), at::mm(rows, w.t()), sc[a]);
    } else {
      at::Tensor sum = at::index_select(y, 0, g.index(a)).to(acc).add_(at::mm(rows, w.t()), sc[a]);
      y.index_copy_(0, g.index(a), sum.to(y.scalar_type()));
    }
  });
}

void lora_expand_inplace_cpu(at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack, const at::Tensor& ids,
                             const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  at::assert_no_internal_overlap(y);  // rows of a broadcast y would alias
  expand_into(y, xa, b_stack, ids, ranks, scales, "lora_expand_");
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
    dst.addmm_(rows_of(left, g, a).to(acc).t(), rows_of(right, g, a).to(acc), /*beta=*/0, /*alpha=*/sc[a]);
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
