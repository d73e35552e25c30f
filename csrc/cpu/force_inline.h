// Forced inlining for the small vector helpers of the CPU kernels.
//
// The kernels' fused loops are large, and GCC stops inlining into a function past its growth
// limits: it called sigmoid and tanh_fast out of line from the recurrent step's epilogue (five
// calls per vector of units, each spilling its vectors to the stack), and a no-op workspace store
// lambda behind a vzeroupper. A helper that is a handful of vector instructions is always inlined.
#pragma once

#if defined(__GNUC__)
#define BIGNLP_FAST_VEC_INLINE inline __attribute__((always_inline))  // a function
#define BIGNLP_FAST_LAMBDA_INLINE __attribute__((always_inline))      // a lambda: [&](...) BIGNLP_FAST_LAMBDA_INLINE {}
#else
#define BIGNLP_FAST_VEC_INLINE inline
#define BIGNLP_FAST_LAMBDA_INLINE
#endif
