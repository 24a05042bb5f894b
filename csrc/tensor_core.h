// Tensor-core primitives (sm_80+) as small inline functions: an inline-PTX body for nvcc and an
// emulator body (csrc/simt/simt.h, the PTX ISA's fragment layouts) so the kernels that use them
// run in CI. Plain CUDA: no torch headers.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_compat.h"

namespace nvfm {
namespace tc {

// 16-bit storage bits of a half / bfloat16 value, and two of them packed (lo first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return (uint32_t)(*reinterpret_cast<const uint16_t*>(&lo)) | ((uint32_t)(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}

#ifdef NVFM_SIMT
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::simt::ldmatrix<4, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) { ::simt::ldmatrix<2, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { ::simt::ldmatrix<2, true>(r, row); }
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __half>::value) ::simt::mma_m16n8k16<::simt::f16_bits_to_float>(d, a, b);
  else ::simt::mma_m16n8k16<::simt::bf16_bits_to_float>(d, a, b);
}
// 16 bytes global -> shared, asynchronous; valid == false zero-fills the 16 bytes.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::simt::cp_async(smem, gmem, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::simt::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::simt::cp_async_wait(N); }
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

}  // namespace tc
}  // namespace nvfm
