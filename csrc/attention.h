// Varlen (packed) attention: launchers of the CUDA kernels (defined in attention_cuda.cu).
// No torch types here: raw pointers, sizes and a stream, so the .cu compiles with plain nvcc.
//
// Layout (FlashAttention varlen): q (total_q, H, D), k and v (total_k, H, D), contiguous;
// cu_q / cu_k int32 (B + 1) prefix sums of the per-sequence lengths (on the device);
// out like q; lse float32 (H, total_q) natural-log sum-exp of the scaled scores of each
// query row (-inf for a query whose sequence has no keys; its output row is 0).
#pragma once
#include <cstdint>
#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)
#include <cuda_runtime.h>  // launchers exist only in CUDA builds; CPU builds need no CUDA headers
#endif

namespace nvfm {

enum class AttnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct VarlenAttnArgs {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* cu_q;  // (B + 1), device memory
  const int32_t* cu_k;  // (B + 1), device memory
  int B, H, D;          // sequences, heads, head dim (64 or 128 on CUDA)
  int max_q, max_k;     // upper bounds of the per-sequence lengths (grid sizes)
  int64_t total_q, total_k;
  float scale;          // softmax scale, usually D ** -0.5
  AttnDtype dtype;      // element type of q, k, v, out, dout, dq, dk, dv
};

#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)

// True when the CUDA kernels exist for this head dim.
bool varlen_attn_cuda_supports_head_dim(int D);

// out = softmax(q k^T * scale) v per sequence; lse saved for the backward pass.
cudaError_t launch_varlen_attn_fwd(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream);

// The same forward on tensor cores (mma.sync m16n8k16, sm_80+); its lse feeds the backward below.
cudaError_t launch_varlen_attn_fwd_tc(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream);

// dq, dk, dv of the forward above. dvec: float workspace of H * total_q elements.
cudaError_t launch_varlen_attn_bwd(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse,
                                   float* dvec, void* dq, void* dk, void* dv, cudaStream_t stream);

// The same backward on tensor cores (sm_80+).
cudaError_t launch_varlen_attn_bwd_tc(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse,
                                      float* dvec, void* dq, void* dk, void* dv, cudaStream_t stream);

#endif  // CUDA

}  // namespace nvfm
