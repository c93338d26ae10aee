// The op boundary of the quant family, shared by the CPU and CUDA registrations: checks
// every argument, makes inputs contiguous once, allocates outputs and fills the plain
// params struct. Nothing here depends on the device a kernel runs on.
#include "quant/ops.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"

namespace lowrank::quant {
namespace {

void check_bits_and_blocksize(int64_t bits, int64_t blocksize, const char* op) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize && (blocksize & (blocksize - 1)) == 0,
              op, ": blocksize must be a power of two in [", kMinBlocksize, ", ", kMaxBlocksize, "], got ",
              blocksize);
}


int64_t packed_bytes(int64_t numel, int64_t bits) { return bits == 8 ? numel : (numel + 1) / 2; }

}  // namespace

// code: float32, 1-D, 2^bits entries, on the data's device; a CPU code is also checked to
// be finite and ascending. A CUDA code's values are not read here: that would cost a
// device synchronisation per call and break CUDA-graph capture. An unsorted code cannot
// make a kernel read or write out of bounds (both searches stay in [0, 2^bits)); it only
// gives meaningless indices. lowrank_ext.quant.get_code checks user codes on any device.
at::Tensor check_code(const at::Tensor& code, int64_t bits, const at::Device& device, const char* op,
                      const char* arg) {
  check_dtype(code, at::kFloat, op, arg);
  check_dim(code, 1, op, arg);
  TORCH_CHECK(code.device() == device, op, ": ", arg, " is on ", code.device(), " but the data is on ", device,
              "; all tensors must be on one device");
  TORCH_CHECK(code.numel() == (int64_t{1} << bits), op, ": ", arg, " must have 2^bits = ", int64_t{1} << bits,
              " entries for bits=", bits, ", got ", code.numel());
  at::Tensor c = code.contiguous();
  if (!c.is_cpu()) return c;
  const float* v = c.const_data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(std::isfinite(v[i]), op, ": ", arg, " entries must be finite, entry ", i, " = ", v[i]);
    TORCH_CHECK(i == 0 || v[i - 1] <= v[i], op, ": ", arg, " must be sorted ascending, but entry ", i - 1, " = ",
                v[i - 1], " > entry ", i, " = ", v[i]);
  }
  return c;
}

PreparedQuantize prepare_quantize(const at::Tensor& x, const at::Tensor& code, int64_t blocksize, int64_t bits,
                                  bool stochastic_rounding, int64_t seed, int64_t offset) {
  constexpr const char* op = "quantize_blockwise";
  const FloatKind kind = float_kind(x.scalar_type(), op, "x");
  check_bits_and_blocksize(bits, blocksize, op);
  PreparedQuantize out;
  out.code = check_code(code, bits, x.device(), op, "code");
  out.x = x.contiguous();
  const int64_t numel = x.numel();
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  out.q = at::empty({packed_bytes(numel, bits)}, x.options().dtype(at::kByte));
  out.absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));

  QuantizeParams& p = out.params;
  p.x = out.x.const_data_ptr();
  p.x_kind = kind;
  p.numel = numel;
  p.code = out.code.const_data_ptr<float>();
  p.bits = static_cast<int>(bits);
  p.blocksize = blocksize;
  p.nblocks = nblocks;
  p.q = out.q.mutable_data_ptr<uint8_t>();
  p.absmax = out.absmax.mutable_data_ptr<float>();
  p.stochastic = stochastic_rounding;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  return out;
}

PreparedDequantize prepare_dequantize(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize, int64_t bits, c10::SymIntArrayRef shape,
                                      at::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  const FloatKind kind = float_kind(dtype, op, "dtype");
  check_bits_and_blocksize(bits, blocksize, op);
  std::vector<int64_t> sizes;
  int64_t numel = 1;
  for (const c10::SymInt& s : shape) {
    const int64_t d = s.expect_int();
    TORCH_CHECK(d >= 0, op, ": shape entries must be >= 0, got ", shape);
    TORCH_CHECK(d == 0 || numel <= std::numeric_limits<int64_t>::max() / d, op, ": shape ", shape,
                " has more elements than int64 can count");
    sizes.push_back(d);
    numel *= d;
  }
  check_dtype(q, at::kByte, op, "q");
  check_dim(q, 1, op, "q");
  check_numel(q, packed_bytes(numel, bits), op, "q");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_dim(absmax, 1, op, "absmax");
  check_numel(absmax, (numel + blocksize - 1) / blocksize, op, "absmax");
  check_same_device(absmax, q, op, "absmax", "q");

  PreparedDequantize out;
  out.code = check_code(code, bits, q.device(), op, "code");
  out.q = q.contiguous();
  out.absmax = absmax.contiguous();
  out.out = at::empty(sizes, q.options().dtype(dtype));

  DequantizeParams& p = out.params;
  p.q = out.q.const_data_ptr<uint8_t>();
  p.absmax = out.absmax.const_data_ptr<float>();
  p.code = out.code.const_data_ptr<float>();
  p.bits = static_cast<int>(bits);
  p.blocksize = blocksize;
  p.numel = numel;
  p.out = out.out.mutable_data_ptr();
  p.out_kind = kind;
  return out;
}

}  // namespace lowrank::quant
