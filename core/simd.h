// Function multiversioning for hot loops.
//
// The build targets baseline x86-64 (no -march=native), so that one binary runs
// everywhere. A function marked INTRAIN_CLONES is compiled three times (baseline,
// AVX2 and AVX-512) and the loader picks the best at start-up. Templates cannot
// be cloned directly, so kernels are written as always-inline template bodies
// and instantiated from small cloned wrappers.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INTRAIN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define INTRAIN_CLONES
#endif
#define INTRAIN_INLINE [[gnu::always_inline]] inline
