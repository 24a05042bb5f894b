// Foreground-masked block sampling: tensor handling, the C++ CPU kernel, torch.library
// registration. Reference (the specification): nvfm/blocks.py. CUDA kernel: blocks_cuda.cu.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "blocks.h"

#ifdef NVFM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace nvfm {
namespace {

void check_args(const at::Tensor& coords, const at::Tensor& cu, const at::Tensor& centres, const at::Tensor& cu_blocks,
                const at::Tensor& aspects, const at::Tensor& keys, const at::Tensor& counts) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(),
              "block_masks: cu_seqlens must be contiguous int32 (B + 1)");
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(coords.scalar_type() == at::kInt && coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "block_masks: coords must be contiguous (N, 3) int32");
  TORCH_CHECK(cu_blocks.scalar_type() == at::kInt && cu_blocks.dim() == 1 && cu_blocks.size(0) == B + 1 &&
              cu_blocks.is_contiguous(), "block_masks: cu_blocks must be contiguous int32 (B + 1)");
  TORCH_CHECK(centres.scalar_type() == at::kInt && centres.dim() == 2 && centres.size(1) == 3 &&
              centres.is_contiguous(), "block_masks: centres must be contiguous (M, 3) int32");
  TORCH_CHECK(aspects.scalar_type() == at::kFloat && aspects.dim() == 2 && aspects.size(0) == centres.size(0) &&
              aspects.size(1) == 3 && aspects.is_contiguous(),
              "block_masks: aspects must be contiguous (M, 3) float32");
  TORCH_CHECK(keys.scalar_type() == at::kInt && keys.dim() == 2 && keys.size(0) == 2 &&
              keys.size(1) == coords.size(0) && keys.is_contiguous(),
              "block_masks: keys must be contiguous (2, N) int32");
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 2 && counts.size(0) == B &&
              counts.size(1) == kBlockCounts && counts.is_contiguous(),
              "block_masks: counts must be contiguous (B, 3) int32");
  for (const at::Tensor* t : {&cu, &centres, &cu_blocks, &aspects, &keys, &counts})
    TORCH_CHECK(t->device() == coords.device(), "block_masks: every input must be on ", coords.device());
  // a NaN, 0 or negative aspect breaks the distance order, the selection count and so the
  // output offsets (tensor ops on the inputs' device: the CPU and CUDA entry points share this)
  TORCH_CHECK(aspects.numel() == 0 || at::logical_and(at::isfinite(aspects), aspects > 0).all().item<bool>(),
              "block_masks: aspects must be finite and > 0");
}

// Host-side checks of the offsets and counts (host copies); returns the context size per volume.
std::vector<int64_t> check_counts(const int32_t* cu, const int32_t* cb, const int32_t* cnt, int64_t B, int64_t N,
                                  int64_t M) {
  TORCH_CHECK(cu[0] == 0 && cu[B] == N, "block_masks: cu_seqlens must run from 0 to N = ", N);
  TORCH_CHECK(cb[0] == 0 && cb[B] == M, "block_masks: cu_blocks must run from 0 to M = ", M);
  std::vector<int64_t> n_ctx(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b], K = cb[b + 1] - cb[b];
    const int64_t n_sel = cnt[3 * b], sel_target = cnt[3 * b + 1], n_drop = cnt[3 * b + 2];
    TORCH_CHECK(n >= 0 && K >= 0, "block_masks: volume ", b, ": cu_seqlens / cu_blocks must be non-decreasing");
    TORCH_CHECK(n == 0 || K >= 1, "block_masks: volume ", b, ": ", n, " tokens but no block");
    TORCH_CHECK(n_sel >= 0 && n_sel <= n && (sel_target == 0 || sel_target == 1), "block_masks: volume ", b,
                ": n_sel ", n_sel, " not in [0, ", n, "] or sel_is_target ", sel_target, " not 0/1");
    const int64_t n_ctx0 = sel_target ? n - n_sel : n_sel;
    TORCH_CHECK(n_drop >= 0 && n_drop <= n_ctx0, "block_masks: volume ", b, ": n_drop ", n_drop, " not in [0, ",
                n_ctx0, "] (context size)");
    n_ctx[b] = n_ctx0 - n_drop;
  }
  return n_ctx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_outputs(const std::vector<int64_t>& n_ctx,
                                                                        const int32_t* cu, int64_t N,
                                                                        const at::TensorOptions& opt) {
  const int64_t B = n_ctx.size();
  at::Tensor cu_ctx = at::empty({B + 1}, at::kInt), cu_tgt = at::empty({B + 1}, at::kInt);
  int32_t *cc = cu_ctx.data_ptr<int32_t>(), *ct = cu_tgt.data_ptr<int32_t>();
  cc[0] = ct[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    cc[b + 1] = cc[b] + (int32_t)n_ctx[b];
    ct[b + 1] = ct[b] + (int32_t)(cu[b + 1] - cu[b] - n_ctx[b]);
  }
  return {at::empty({cc[B]}, opt.dtype(at::kLong)), cu_ctx, at::empty({N - cc[B]}, opt.dtype(at::kLong)), cu_tgt};
}

// Volume b on the CPU: box-norm distances, the n_sel smallest by (d, key0, index), the n_drop
// smallest context tokens by (key1, index), then both lists written in ascending order.
void volume_cpu(const int32_t* coords, int64_t s, int64_t n, const int32_t* centres, const float* aspects, int64_t K,
                const int32_t* key0, const int32_t* key1, const int32_t* cnt, int64_t* ctx_out, int64_t* tgt_out) {
  if (n == 0) return;
  std::vector<float> d(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* c = coords + 3 * (s + i);
    float best = INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      float m = 0.f;
      for (int a = 0; a < 3; ++a)  // |c - centre| is an exact integer; one IEEE division, as the reference
        m = std::max(m, static_cast<float>(std::abs((int64_t)c[a] - centres[3 * k + a])) / aspects[3 * k + a]);
      best = std::min(best, m);
    }
    d[i] = best;
  }
  const int64_t n_sel = cnt[0], n_drop = cnt[2];
  const bool sel_target = cnt[1] != 0;
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (n_sel > 0 && n_sel < n)
    std::nth_element(idx.begin(), idx.begin() + n_sel, idx.end(), [&](int32_t a, int32_t b) {
      return d[a] < d[b] || (d[a] == d[b] && (key0[a] < key0[b] || (key0[a] == key0[b] && a < b)));
    });
  std::vector<uint8_t> is_ctx(n, sel_target ? 1 : 0);
  for (int64_t j = 0; j < n_sel; ++j) is_ctx[idx[j]] = sel_target ? 0 : 1;
  if (n_drop > 0) {
    std::vector<int32_t> ctx0;
    for (int32_t i = 0; i < n; ++i)
      if (is_ctx[i]) ctx0.push_back(i);
    if (n_drop < (int64_t)ctx0.size())
      std::nth_element(ctx0.begin(), ctx0.begin() + n_drop, ctx0.end(), [&](int32_t a, int32_t b) {
        return key1[a] < key1[b] || (key1[a] == key1[b] && a < b);
      });
    for (int64_t j = 0; j < n_drop; ++j) is_ctx[ctx0[j]] = 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (is_ctx[i]) *ctx_out++ = s + i;
    else *tgt_out++ = s + i;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_masks_cpu(
    const at::Tensor& coords, const at::Tensor& cu_seqlens, const at::Tensor& centres, const at::Tensor& cu_blocks,
    const at::Tensor& aspects, const at::Tensor& keys, const at::Tensor& counts) {
  check_args(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts);
  const int64_t B = cu_seqlens.size(0) - 1, N = coords.size(0), M = centres.size(0);
  const int32_t *cu = cu_seqlens.data_ptr<int32_t>(), *cb = cu_blocks.data_ptr<int32_t>();
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const std::vector<int64_t> n_ctx = check_counts(cu, cb, cnt, B, N, M);
  const float* asp = aspects.data_ptr<float>();
  auto [ctx, cu_ctx, tgt, cu_tgt] = make_outputs(n_ctx, cu, N, coords.options());
  const int32_t *cc = cu_ctx.data_ptr<int32_t>(), *ct = cu_tgt.data_ptr<int32_t>();
  const int32_t *xyz = coords.data_ptr<int32_t>(), *ctr = centres.data_ptr<int32_t>(), *k = keys.data_ptr<int32_t>();
  int64_t *ctx_p = ctx.data_ptr<int64_t>(), *tgt_p = tgt.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      volume_cpu(xyz, cu[b], cu[b + 1] - cu[b], ctr + 3 * cb[b], asp + 3 * cb[b], cb[b + 1] - cb[b], k + cu[b],
                 k + N + cu[b], cnt + 3 * b, ctx_p + cc[b], tgt_p + ct[b]);
  });
  return {ctx, cu_ctx, tgt, cu_tgt};
}

#ifdef NVFM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_masks_cuda(
    const at::Tensor& coords, const at::Tensor& cu_seqlens, const at::Tensor& centres, const at::Tensor& cu_blocks,
    const at::Tensor& aspects, const at::Tensor& keys, const at::Tensor& counts) {
  check_args(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts);
  c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = cu_seqlens.size(0) - 1, N = coords.size(0), M = centres.size(0);
  // offsets and counts are tiny: check them and size the outputs on the host (one sync)
  const at::Tensor cu_h = cu_seqlens.cpu(), cb_h = cu_blocks.cpu(), cnt_h = counts.cpu();
  const int32_t* cu = cu_h.data_ptr<int32_t>();
  const std::vector<int64_t> n_ctx = check_counts(cu, cb_h.data_ptr<int32_t>(), cnt_h.data_ptr<int32_t>(), B, N, M);
  auto [ctx, cu_ctx, tgt, cu_tgt] = make_outputs(n_ctx, cu, N, coords.options());
  cu_ctx = cu_ctx.to(coords.device());
  cu_tgt = cu_tgt.to(coords.device());
  at::Tensor dist = at::empty({N}, coords.options().dtype(at::kFloat));
  at::Tensor flag = at::empty({N}, coords.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_block_masks(coords.data_ptr<int32_t>(), cu_seqlens.data_ptr<int32_t>(), (int)B,
                                    centres.data_ptr<int32_t>(), cu_blocks.data_ptr<int32_t>(),
                                    aspects.data_ptr<float>(), keys.data_ptr<int32_t>(), N, counts.data_ptr<int32_t>(),
                                    cu_ctx.data_ptr<int32_t>(), cu_tgt.data_ptr<int32_t>(), dist.data_ptr<float>(),
                                    flag.data_ptr<uint8_t>(), ctx.data_ptr<int64_t>(), tgt.data_ptr<int64_t>(),
                                    at::cuda::getCurrentCUDAStream()));
  return {ctx, cu_ctx, tgt, cu_tgt};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("block_masks(Tensor coords, Tensor cu_seqlens, Tensor centres, Tensor cu_blocks, Tensor aspects, "
        "Tensor keys, Tensor counts) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) { m.impl("block_masks", &block_masks_cpu); }

#ifdef NVFM_WITH_CUDA
TORCH_LIBRARY_IMPL(nvfm, CUDA, m) { m.impl("block_masks", &block_masks_cuda); }
#endif

}  // namespace nvfm
