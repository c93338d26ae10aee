// Every schema of the `lowrank` namespace, grouped by family: this file is the table of
// contents of the library. Kernels are registered per device in <family>/cpu.cpp and
// <family>/cuda.cu; fake (meta) and autograd registrations live in lowrank_ext/ops/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <vector>

namespace {

// The ADInplaceOrView kernel of the mutating ops: bumps the version counter of every argument
// the schema marks as written (Tensor(a!), Tensor(a!)[], Tensor(a!)?), then runs the op below
// this key. Without it a tensor saved for backward and then updated by one of these ops would
// go unnoticed (torch's own in-place ops raise "modified by an inplace operation" then).
// The bump comes after the op (as in torch's own ADInplaceOrView kernels): a call refused by
// its argument checks writes nothing and leaves the counters, and the saved tensors, alone.
void bump_written_args(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) {
      written.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) written.push_back(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

// The Autocast kernel of every op: the kernels compose ATen calls (GEMMs, QR, conversions) that
// autocast, left on, would run in fp16/bf16 inside an autocast region, changing the ops' output
// dtypes (rsvd's U came back bf16 for an fp32 A, galore_project's fp32 result bf16). The ops
// compute in their inputs' dtypes; casting inputs under autocast is the Python layers' job
// (lora_linear and the nn layers cast as nn.Linear does). Autocast is excluded for the kernel
// and everything it calls, as torch's own autocast wrappers do for the ops they cast.
void run_without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.redispatchBoxed(keys - c10::autocast_dispatch_keyset, stack);
}

// The Autograd kernel of the in-place adapter ops (lora_merge_, lora_expand_,
// sparse_scatter_add_). They have no derivative, so with grad mode on they refuse what autograd
// could not record, as torch's index_add_ does: writing a leaf that requires grad (a weight
// outside torch.no_grad()), or reading a tensor that requires grad (its gradient would be
// silently lost; the differentiable forms are lora_expand and the layers). A non-leaf that
// requires grad may be written when nothing read requires grad: the added term is a constant
// to autograd (multi_lora_linear adds into a base output this way). The optimizer steps
// (adamw_step_*_, galore_apply_) update leaves in place under any grad mode, as torch's
// _fused_adamw_ does.
void refuse_what_autograd_cannot_record(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                        torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const auto* alias = args[i].alias_info();
      const bool written = alias != nullptr && alias->isWrite();
      const c10::IValue& v = (*stack)[first + i];
      std::vector<at::Tensor> tensors;
      if (v.isTensor()) {
        tensors.push_back(v.toTensor());
      } else if (v.isTensorList()) {
        tensors = v.toTensorList().vec();
      }
      for (const at::Tensor& t : tensors) {
        if (!t.defined() || !t.requires_grad()) continue;
        TORCH_CHECK(!written || !t.is_leaf(), op.schema().name(), ": ", args[i].name(),
                    " is a leaf tensor that requires grad and would be written in place; call the op under "
                    "torch.no_grad() (as optimizers and adapter merges do)");
        // a view of such a leaf (W[:], W.view(...)) writes the leaf itself, as torch's in-place ops refuse
        TORCH_CHECK(!written || !t.is_view() || !t._base().is_leaf(), op.schema().name(), ": ", args[i].name(),
                    " is a view of a leaf tensor that requires grad and would be written in place; call the op "
                    "under torch.no_grad()");
        TORCH_CHECK(written, op.schema().name(), ": ", args[i].name(),
                    " requires grad, but the op has no derivative and its gradient would be lost; call it under "
                    "torch.no_grad(), or use a differentiable form");
      }
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY(lowrank, m) {
  // ---- quant: block-wise 8-bit / 4-bit quantization with a 2^bits-entry code ----
  // x (any shape, fp32/fp16/bf16) -> q uint8 [numel] or [ceil(numel/2)], absmax fp32 [ceil(numel/blocksize)]
  m.def("quantize_blockwise(Tensor x, Tensor code, int blocksize, int bits, bool stochastic_rounding=False, "
        "int seed=0, int offset=0) -> (Tensor q, Tensor absmax)");
  // (q, absmax, code) -> tensor of `shape` and `dtype`: code[q] * absmax of each block
  m.def("dequantize_blockwise(Tensor q, Tensor absmax, Tensor code, int blocksize, int bits, SymInt[] shape, "
        "ScalarType dtype) -> Tensor");

  // ---- optim: fused multi-tensor AdamW steps, in place, one pass over memory ----
  // moments block-wise quantized (8/4-bit, re-quantized with a fresh absmax every step)
  m.def("adamw_step_quantized_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_q, "
        "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_q, Tensor(e!)[] exp_avg_sq_absmax, "
        "Tensor code_exp_avg, Tensor code_exp_avg_sq, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, int step, int bits, int blocksize_exp_avg, int blocksize_exp_avg_sq, "
        "bool stochastic_rounding=False, int seed=0, bool stochastic_exp_avg=False, "
        "bool stochastic_exp_avg_sq=False) -> ()");
  // the second moment rank-1 normalised instead (Li et al. 2023): each param viewed as
  // [rows, cols] = [exp_avg_sq_row.numel(), exp_avg_sq_col.numel()], entry (i, j) quantized as
  // v_ij / min(row max i, column max j); the first moment block-wise as above. CPU only.
  m.def("adamw_step_rank1_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_q, "
        "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_q, Tensor(e!)[] exp_avg_sq_row, "
        "Tensor(f!)[] exp_avg_sq_col, Tensor code_exp_avg, Tensor code_exp_avg_sq, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, int step, int bits, int blocksize_exp_avg, "
        "bool stochastic_rounding=False, int seed=0, bool stochastic_exp_avg=False, "
        "bool stochastic_exp_avg_sq=False) -> ()");
  // the same update with fp32 moments (small tensors; the comparison point)
  m.def("adamw_step_fp32_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
        "bool stochastic_rounding=False, int seed=0) -> ()");

  // ---- lora: fused LoRA forward/backward, y = x W^T + b + scale * h B^T ----
  // h = ((drop(x) A^T) * rank_scale) core^T; x [N, d_in], weight [d_out, d_in], lora_a [r, d_in],
  // lora_b [d_out, r], core [r, r]? (LoRA-XS/SB), rank_scale [r]? (AdaLoRA); dropout mask from
  // Philox(seed), never stored; seed_tensor (a CPU int64 scalar) overrides seed, so a compiled graph
  // can draw it. Returns y [N, d_out] and xa = drop(x) A^T [N, r] (saved for backward)
  m.def("lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? core, "
        "Tensor? rank_scale, float scale, float dropout_p=0., int seed=0, Tensor? seed_tensor=None) "
        "-> (Tensor y, Tensor xa)");
  // grads of x, lora_a, lora_b, core, rank_scale as output_mask asks (the others come back empty)
  m.def("lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? core, "
        "Tensor? rank_scale, Tensor xa, float scale, float dropout_p, int seed, Tensor? seed_tensor, "
        "bool[5] output_mask) "
        "-> (Tensor grad_x, Tensor grad_a, Tensor grad_b, Tensor grad_core, Tensor grad_rank_scale)");
  // weight += scale * B core diag(rank_scale) A, in weight's dtype with fp32 accumulation (unmerge: -scale)
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor? core, Tensor? rank_scale, "
        "float scale) -> ()");

  // ---- multilora: many adapters in one batch (S-LoRA / Punica): token n uses adapter ids[n], -1 none ----
  // Stacks padded to the largest rank R: a_stack [S, R, d_in], b_stack [S, d_out, R]; ranks [S] int (None:
  // every adapter has rank R; rows / columns past an adapter's rank are never read); scales [S] float
  // (None: 1); token_adapter_ids int32/int64 [N] in any order. No host synchronisation on CUDA.
  // xa [N, R] fp32 (fp64 for fp64 x): xa[n, :rank] = scale * x[n] A[ids[n], :rank]^T, zero elsewhere
  m.def("lora_shrink(Tensor x, Tensor a_stack, Tensor token_adapter_ids, Tensor? ranks=None, "
        "Tensor? scales=None) -> Tensor");
  // y[n] += scale * xa[n, :rank] B[ids[n], :, :rank]^T in place, y [N, d_out]; rows with id -1 untouched
  m.def("lora_expand_(Tensor(a!) y, Tensor xa, Tensor b_stack, Tensor token_adapter_ids, Tensor? ranks=None, "
        "Tensor? scales=None) -> ()");
  // the same out of place (the differentiable form): returns a new y + the products
  m.def("lora_expand(Tensor y, Tensor xa, Tensor b_stack, Tensor token_adapter_ids, Tensor? ranks=None, "
        "Tensor? scales=None) -> Tensor");
  // per-adapter sums of outer products (the stacks' gradients): out[a] = scale[a] * sum over the
  // tokens n of adapter a of left[n]^T right[n]; left [N, P], right [N, Q] -> out [S, P, Q] fp32 (fp64)
  m.def("lora_grouped_outer(Tensor left, Tensor right, Tensor token_adapter_ids, int num_adapters, "
        "Tensor? scales=None) -> Tensor");

  // ---- monarch: block-diagonal products, y = P L P R x (R = blockdiag(w1), L = blockdiag(w2)) ----
  // x [N, nblocks*in_bs], w1 [nblocks, mid, in_bs], w2 [nblocks, out_bs, mid] -> y [N, nblocks*out_bs];
  // stage 2 reads h[r*nblocks + l] and writes y[s*nblocks + l] (the permutation P, applied by
  // indexing). h = R x feature-major [nblocks*mid, N] when save_intermediate (for backward), else empty
  m.def("monarch_forward(Tensor x, Tensor w1, Tensor w2, bool save_intermediate=False) -> (Tensor y, Tensor h)");
  // grads of x, w1, w2 as output_mask asks (the others come back empty); h None: recomputed
  m.def("monarch_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor? h, bool[3] output_mask) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_w2)");
  // one block-diagonal factor (BOFT / Bone style): x [N, nblocks*in_bs], w [nblocks, out_bs, in_bs]
  m.def("blockdiag_forward(Tensor x, Tensor w) -> Tensor");
  m.def("blockdiag_backward(Tensor grad_y, Tensor x, Tensor w, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_w)");

  // ---- sparse: sparse adapters (SHiRA, SLTrain) on a dense weight ----
  // weight.view(-1)[indices[a][i]] += alphas[a] * values[a][i] for each adapter a, in place; repeated
  // indices accumulate; every index is checked before anything is written. check_indices=False: the
  // caller has checked them (lowrank_ext.sparse.apply does, once for all weights): CUDA then skips its
  // host synchronisation and an out-of-range index trips a device assertion; the CPU checks anyway
  m.def("sparse_scatter_add_(Tensor(a!) weight, Tensor[] indices, Tensor[] values, float[] alphas, "
        "bool check_indices=True) -> ()");
  // SDDMM: grad_values[i] = sum_n grad_out[n, rows[i]] * x[n, cols[i]]; never the dense d_out x d_in gradient
  m.def("sddmm(Tensor grad_out, Tensor x, Tensor rows, Tensor cols) -> Tensor");

  // ---- svd: randomized and streaming SVD, batched small SVD (fp16/bf16 computed and returned in fp32) ----
  // Y = A Omega for A [m, n] or [b, m, n]; Omega [n, l] standard normal from Philox(seed), never stored
  m.def("gaussian_sketch(Tensor A, int l, int seed) -> Tensor");
  // one-sided Jacobi SVD of small matrices A [.., m, n] (min(m, n) up to a few hundred):
  // U [.., m, p], S [.., p] descending, Vh [.., p, n], p = min(m, n); U's columns sign-fixed
  m.def("jacobi_svd(Tensor A) -> (Tensor U, Tensor S, Tensor Vh)");
  // randomized SVD, top k of A [.., m, n]: sketch of l = k + oversample columns, n_iter power
  // iterations (orthonormalised by Householder QR on CPU, shifted CholeskyQR3 with a
  // Householder fallback on CUDA), the small factor's SVD (LAPACK on CPU, Jacobi on CUDA).
  // start [.., m, j] (j <= l): a warm start, the first basis's first j columns (the rest: the
  // first l - j of the Gaussian sketch)
  m.def("rsvd(Tensor A, int k, int oversample=10, int n_iter=2, int seed=0, Tensor? start=None) "
        "-> (Tensor U, Tensor S, Tensor Vh)");
  // rsvd of the stack of b matrices [m, n] of one shape, dtype and device (U [b, m, k], S [b, k],
  // Vh [b, k, n]), without forming the stack on CPU: each matrix is read where it lies; start [b, m, j]
  m.def("batched_rsvd(Tensor[] A, int k, int oversample=10, int n_iter=2, int seed=0, Tensor? start=None) "
        "-> (Tensor U, Tensor S, Tensor Vh)");
  // incremental SVD: the top k of [U diag(S), X] for new columns X [m, c]
  m.def("svd_update(Tensor U, Tensor S, Tensor X, int k) -> (Tensor U_new, Tensor S_new)");

  // ---- galore: the projections of the GaLore-family optimizers (GaLoreAdamW) ----
  // P is proj [m, rank] (left: R = P^T G [rank, n]) or [rank, n] (right: R = G P^T [m, rank]), in fp32 or
  // in quantize_blockwise form (uint8 q, absmax, a code of 256 / 16 entries, blocksize): dequantized as
  // the kernels load it. grad [m, n] fp32/fp16/bf16; R fp32
  m.def("galore_project(Tensor grad, Tensor proj, Tensor? proj_absmax, Tensor? proj_code, int rank, int blocksize, "
        "bool right) -> Tensor");
  // param <- (1 - lr wd) (param - lr scale back(direction) - the residual step), in place, computed in fp32;
  // back(X) = P X (left) or X P (right). residual_mode 0 galore: no residual; 1 fira: lr scale (G - back(low))
  // times ||direction|| / ||low|| per column (left) or row (right), its norm limited to residual_growth x
  // residual_prev_norm (updated in place; 0: no limit); 2 frugal: lr sign(G - back(low))
  m.def("galore_apply_(Tensor(a!) param, Tensor direction, Tensor proj, Tensor? proj_absmax, Tensor? proj_code, "
        "int rank, int blocksize, bool right, float lr, float scale, float weight_decay, int residual_mode=0, "
        "Tensor? grad=None, Tensor? low=None, Tensor(b!)? residual_prev_norm=None, float residual_growth=1.01) -> ()");
}

// Non-differentiable ops (integer outputs, in-place optimizer updates): autograd passes
// straight through to the kernels, so outputs never require grad and torch does not warn
// about a missing autograd kernel.
TORCH_LIBRARY_IMPL(lowrank, Autograd, m) {
  m.impl("quantize_blockwise", torch::CppFunction::makeFallthrough());
  m.impl("dequantize_blockwise", torch::CppFunction::makeFallthrough());
  m.impl("lora_grouped_outer", torch::CppFunction::makeFallthrough());
  m.impl("sddmm", torch::CppFunction::makeFallthrough());
  m.impl("gaussian_sketch", torch::CppFunction::makeFallthrough());
  m.impl("jacobi_svd", torch::CppFunction::makeFallthrough());
  m.impl("rsvd", torch::CppFunction::makeFallthrough());
  m.impl("batched_rsvd", torch::CppFunction::makeFallthrough());
  m.impl("svd_update", torch::CppFunction::makeFallthrough());
  m.impl("galore_project", torch::CppFunction::makeFallthrough());
  m.impl("galore_apply_", torch::CppFunction::makeFallthrough());
}

// The in-place adapter ops (lora_expand is lora_expand_'s differentiable form).
TORCH_LIBRARY_IMPL(lowrank, Autograd, m) {
  for (const char* name : {"lora_merge_", "lora_expand_", "sparse_scatter_add_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_what_autograd_cannot_record>());
}

// Version counters of the tensors the mutating ops write (see bump_written_args).
TORCH_LIBRARY_IMPL(lowrank, ADInplaceOrView, m) {
  for (const char* name : {"adamw_step_quantized_", "adamw_step_rank1_", "adamw_step_fp32_", "lora_merge_", "lora_expand_",
                           "sparse_scatter_add_", "galore_apply_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_args>());
}

// Every op runs with autocast off inside (see run_without_autocast). The ops are read from the
// dispatcher: the TORCH_LIBRARY block above has defined them by now (static initialisers of one
// file run in order), so an op added there gets these kernels without a second list.
namespace {
void register_without_autocast(torch::Library& m) {
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    constexpr std::string_view kPrefix = "lowrank::";
    if (op.name.rfind(kPrefix, 0) != 0) continue;
    std::string name = op.name.substr(kPrefix.size());
    if (!op.overload_name.empty()) name += "." + op.overload_name;
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>());
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) { register_without_autocast(m); }

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) { register_without_autocast(m); }
