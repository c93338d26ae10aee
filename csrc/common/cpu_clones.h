#pragma once
// LOWRANK_CPU_CLONES: compile a CPU loop twice on x86-64 with GCC, for AVX2 and for the
// baseline the build targets, the version picked at load time (target_clones, an ifunc).
// The clones run the same IEEE operations (no FMA contraction: -ffp-contract=off), so
// results do not depend on which CPU runs them; the AVX2 one just runs 8-wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWRANK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOWRANK_CPU_CLONES
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWRANK_X86_AVX2_PATHS 1
namespace lowrank {
// For hand-written AVX2 paths (target("avx2") functions) that need an explicit choice.
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
}  // namespace lowrank
#endif
