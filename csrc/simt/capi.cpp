// C entry points of the emulated kernels for tests/simt_kernels.py (ctypes). Compiled with one
// csrc/<op>_cuda.cu into lib<op>.so: -DNVFM_SIMT -DSIMT_OP_<OP>. Pointers are host memory here
// (the emulator's "device"); the wrappers mirror the .cpp entry points' allocation rules
// (pre-zeroed outputs, lse pre-filled with -inf) but do no validation of their own.
#include "simt.h"

#if defined(SIMT_OP_PATCHIFY)
#include "../patchify.h"
#elif defined(SIMT_OP_ATTENTION)
#include "../attention.h"
#elif defined(SIMT_OP_GATHER)
#include "../gather.h"
#elif defined(SIMT_OP_BLOCKS)
#include "../blocks.h"
#endif

extern "C" {

// schedule: 0 forward, 1 reverse, 2 random(seed). Clears the error state.
void simt_configure(int schedule, uint64_t seed) {
  simt::configure(static_cast<simt::Schedule>(schedule), seed);
  simt::rt().failed = false;
  simt::rt().message.clear();
  simt::rt().max_smem.clear();
  (void)cudaGetLastError();
}
const char* simt_message() { return simt::last_message(); }
uint64_t simt_switches() { return simt::rt().switches; }

#if defined(SIMT_OP_PATCHIFY)
static nvfm::PatchGeom geom(const int* s) {
  nvfm::PatchGeom g{s[0], s[1], s[2], s[3], s[4], s[5], 0, 0, 0};
  g.gz = (g.D + g.pd - 1) / g.pd; g.gy = (g.H + g.ph - 1) / g.ph; g.gx = (g.W + g.pw - 1) / g.pw;
  return g;
}
// shape6 = (D, H, W, pd, ph, pw)
int simt_token_fg_count(const uint8_t* mask, const int* shape6, int32_t* counts) {
  return nvfm::launch_token_fg_count(mask, geom(shape6), counts, nullptr);
}
int simt_patch_gather(const uint8_t* vol, const int* shape6, const int32_t* coords, int64_t n, uint8_t* out) {
  return nvfm::launch_patch_gather(vol, geom(shape6), coords, n, out, nullptr);
}
int simt_patch_scatter(const uint8_t* tokens, const int* shape6, const int32_t* coords, int64_t n, uint8_t* vol) {
  return nvfm::launch_patch_scatter(tokens, geom(shape6), coords, n, vol, nullptr);
}
#endif

#if defined(SIMT_OP_ATTENTION)
// ints = (B, H, D, max_q, max_k, dtype), totals = (total_q, total_k)
static nvfm::VarlenAttnArgs attn_args(const void* q, const void* k, const void* v, const int32_t* cu_q,
                                      const int32_t* cu_k, const int* ints, const int64_t* totals, float scale) {
  nvfm::VarlenAttnArgs a;
  a.q = q; a.k = k; a.v = v; a.cu_q = cu_q; a.cu_k = cu_k;
  a.B = ints[0]; a.H = ints[1]; a.D = ints[2]; a.max_q = ints[3]; a.max_k = ints[4];
  a.dtype = static_cast<nvfm::AttnDtype>(ints[5]);
  a.total_q = totals[0]; a.total_k = totals[1];
  a.scale = scale;
  return a;
}
int simt_attn_fwd(const void* q, const void* k, const void* v, const int32_t* cu_q, const int32_t* cu_k,
                  const int* ints, const int64_t* totals, float scale, void* out, float* lse) {
  return nvfm::launch_varlen_attn_fwd(attn_args(q, k, v, cu_q, cu_k, ints, totals, scale), out, lse, nullptr);
}
int simt_attn_fwd_tc(const void* q, const void* k, const void* v, const int32_t* cu_q, const int32_t* cu_k,
                     const int* ints, const int64_t* totals, float scale, void* out, float* lse) {
  return nvfm::launch_varlen_attn_fwd_tc(attn_args(q, k, v, cu_q, cu_k, ints, totals, scale), out, lse, nullptr);
}
int simt_attn_bwd(const void* q, const void* k, const void* v, const int32_t* cu_q, const int32_t* cu_k,
                  const int* ints, const int64_t* totals, float scale, const void* dout, const void* out,
                  const float* lse, float* dvec, void* dq, void* dk, void* dv) {
  return nvfm::launch_varlen_attn_bwd(attn_args(q, k, v, cu_q, cu_k, ints, totals, scale), dout, out, lse, dvec,
                                      dq, dk, dv, nullptr);
}
int simt_attn_bwd_tc(const void* q, const void* k, const void* v, const int32_t* cu_q, const int32_t* cu_k,
                     const int* ints, const int64_t* totals, float scale, const void* dout, const void* out,
                     const float* lse, float* dvec, void* dq, void* dk, void* dv) {
  return nvfm::launch_varlen_attn_bwd_tc(attn_args(q, k, v, cu_q, cu_k, ints, totals, scale), dout, out, lse, dvec,
                                         dq, dk, dv, nullptr);
}
#endif

#if defined(SIMT_OP_GATHER)
// datas[b]: channel 0 of volume b; dims: (B, 4) = (C, D, H, W)
int simt_gather_tokens(const uint8_t* const* datas, const int32_t* dims, const int32_t* params, const int32_t* cu,
                       int B, const int32_t* coords, int64_t n, const float* table, int pd, int ph, int pw,
                       void* out, int out_type) {
  std::vector<nvfm::GatherVolume> vols(B);
  for (int b = 0; b < B; ++b) vols[b] = {datas[b], dims[4 * b], dims[4 * b + 1], dims[4 * b + 2], dims[4 * b + 3]};
  return nvfm::launch_gather_tokens(vols.data(), params, cu, B, coords, n, table, pd, ph, pw, out,
                                    static_cast<nvfm::GatherOut>(out_type), nullptr);
}
#endif

#if defined(SIMT_OP_BLOCKS)
int simt_block_masks(const int32_t* coords, const int32_t* cu, int B, const int32_t* centres,
                     const int32_t* cu_blocks, const float* aspects, const int32_t* keys, int64_t N,
                     const int32_t* counts, const int32_t* cu_ctx, const int32_t* cu_tgt, float* dist, uint8_t* flag,
                     int64_t* ctx_index, int64_t* tgt_index) {
  return nvfm::launch_block_masks(coords, cu, B, centres, cu_blocks, aspects, keys, N, counts, cu_ctx, cu_tgt, dist,
                                  flag, ctx_index, tgt_index, nullptr);
}
#endif

}  // extern "C"

// Conversions of the emulator's half / bfloat16 types, compared with torch's in the tests.
extern "C" void simt_to_half(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __float2half_rn(x[i]).x;
}
extern "C" void simt_to_bf16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __float2bfloat16_rn(x[i]).x;
}
extern "C" void simt_from_half(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __half2float(__half{x[i]});
}
