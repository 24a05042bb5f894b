// Foreground-masked block sampling (Vol-JEPA context / target split): launcher of the CUDA
// kernel (defined in blocks_cuda.cu). No torch types here: raw pointers, sizes and a stream.
// Specification: nvfm/blocks.py (block_masks_reference and the module docstring).
#pragma once
#include <cstdint>
#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)
#include <cuda_runtime.h>  // launchers exist only in CUDA builds; CPU builds need no CUDA headers
#endif

namespace nvfm {

constexpr int kBlockCounts = 3;  // counts row: n_sel, sel_is_target, n_drop

#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)

// One thread block per volume. coords (N, 3), cu (B+1), centres (M, 3), cu_blocks (B+1),
// aspects (M, 3), keys (2, N), counts (B, 3), cu_ctx / cu_tgt (B+1, computed on the host from
// counts) are device pointers; dist (N floats) and flag (N bytes) are device scratch.
// Writes ctx_index[cu_ctx[b]:cu_ctx[b+1]] and tgt_index[cu_tgt[b]:cu_tgt[b+1]] ascending.
cudaError_t launch_block_masks(const int32_t* coords, const int32_t* cu, int B, const int32_t* centres,
                               const int32_t* cu_blocks, const float* aspects, const int32_t* keys, int64_t N,
                               const int32_t* counts, const int32_t* cu_ctx, const int32_t* cu_tgt, float* dist,
                               uint8_t* flag, int64_t* ctx_index, int64_t* tgt_index, cudaStream_t stream);

#endif  // CUDA

}  // namespace nvfm
