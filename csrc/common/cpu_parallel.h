#pragma once
// parallel_for_as_caller: at::parallel_for whose workers run ATen ops with the calling
// thread's thread-local state (grad mode, inference mode, ...). Worker threads start from
// the defaults: there an ATen op that updates a tensor the caller made under
// torch.inference_mode fails ("Inplace update to inference tensor outside InferenceMode"),
// and one on a tensor that requires grad would record a graph. Loops that only touch raw
// pointers can use at::parallel_for itself.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace lowrank {

template <typename F>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard as_caller(caller);
    f(b, e);
  });
}

}  // namespace lowrank
