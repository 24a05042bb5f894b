// Varlen attention over packed sequences: tensor handling, the C++ CPU kernels (forward and
// backward, FlashAttention-2 tiling with online softmax) and torch.library registration.
// Reference (the specification): nvfm/attention.py attention_reference. CUDA kernels:
// attention_cuda.cu.
//
// CPU design: the packed (total, H, D) tensors are used in place (row stride H * D), so a
// tile of one head is a strided matrix that BLAS multiplies directly (at::mm_out on views,
// no packing). Scores live only in a (BQ x BK) scratch tile per thread, so memory is linear
// in the sequence length. Work items are (sequence, head, query tile) in the forward and
// (sequence, head) in the backward, handed out longest-first from an atomic counter so a
// batch whose sequences differ by 100x still keeps every core busy.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "attention.h"

#ifdef NVFM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

// The elementwise softmax loops are compiled twice (AVX2+FMA and baseline x86-64) and picked
// at load time: setup.py builds without -march so the wheel runs anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NVFM_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define NVFM_MULTIVERSION
#endif

namespace nvfm {
namespace {

constexpr int64_t kFwdBQ = 64;    // query rows per forward work item
constexpr int64_t kBK = 256;      // keys per tile
constexpr int64_t kBwdBQ = 128;   // query rows per backward tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for the softmax: Cody-Waite range reduction + degree-6 Taylor polynomial
// (relative error < 2e-7), written branch-free so the loops below vectorize. x < -87 -> 0.
__attribute__((always_inline)) inline float fast_exp(float x) {
  const float xc = std::max(x, -87.0f);
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t >= 0.0f ? t + 0.5f : t - 0.5f);
  const float nf = static_cast<float>(n);
  const float r = (xc - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

// x *= scale; returns max(x).
NVFM_MULTIVERSION float scale_rowmax(float* __restrict__ x, int64_t n, float scale) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    x[i] *= scale;
    mx = std::max(mx, x[i]);
  }
  return mx;
}

// x = exp(x - m); returns sum(x).
NVFM_MULTIVERSION float exp_sub_sum(float* __restrict__ x, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = fast_exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

// x = exp(x * scale - shift)  (probabilities recomputed from the saved log-sum-exp).
NVFM_MULTIVERSION void exp_affine(float* __restrict__ x, int64_t n, float scale, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = fast_exp(x[i] * scale - shift);
}

// ds = p * (dp - d) * scale, in place in dp.
NVFM_MULTIVERSION void softmax_grad(const float* __restrict__ p, float* __restrict__ dp, int64_t n, float d,
                                    float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d) * scale;
}

NVFM_MULTIVERSION void scale_row(float* __restrict__ x, int64_t n, float s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

NVFM_MULTIVERSION float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A (rows x cols) float matrix at p with strides (rs, cs), wrapped without copying.
at::Tensor mat(const float* p, int64_t rows, int64_t cols, int64_t rs, int64_t cs = 1) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {rs, cs}, at::TensorOptions().dtype(at::kFloat));
}

// Run f(item, scratch) for item in [0, n) on all threads, items taken in order from a shared
// counter (callers order them longest first), one scratch vector per thread.
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    std::vector<float> scratch;
    for (int64_t w = b; w < e; ++w)
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i, scratch);
  });
}

// float32 view of a (total, H, D) tensor whose rows BLAS can read in place: any row and head
// stride, unit stride along D (q, k, v are often strided views of one fused QKV output).
at::Tensor rows_of(const at::Tensor& x) {
  at::Tensor f = x.to(at::kFloat);
  return f.stride(2) == 1 ? f : f.contiguous();
}

struct Seq {
  int64_t q0, lq, k0, lk;
};

void check_cu(const at::Tensor& cu, const char* name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1,
              name, " must be a 1D int32 tensor of B + 1 offsets, got ", cu.scalar_type(), " ", cu.sizes());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
               const at::Tensor& cu_k) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (total, heads, head_dim), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(q.size(1) == k.size(1) && q.size(2) == k.size(2), "q ", q.sizes(), " and k ", k.sizes(),
              " must have the same heads and head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "varlen attention supports float32, float16 and bfloat16, got ", st);
  check_cu(cu_q, "cu_seqlens_q");
  check_cu(cu_k, "cu_seqlens_k");
  TORCH_CHECK(cu_q.size(0) == cu_k.size(0), "cu_seqlens_q has ", cu_q.size(0), " entries but cu_seqlens_k has ",
              cu_k.size(0));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == cu_q.device() &&
                  q.device() == cu_k.device(), "q, k, v, cu_seqlens_q, cu_seqlens_k must be on one device");
}

// Per-sequence offsets, validated against the tensors and the stated maxima.
std::vector<Seq> read_seqs(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k,
                           int64_t max_q, int64_t max_k) {
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* a = cq.data_ptr<int32_t>();
  const int32_t* c = ck.data_ptr<int32_t>();
  const int64_t B = cq.size(0) - 1;
  TORCH_CHECK(a[0] == 0 && c[0] == 0, "cu_seqlens must start at 0");
  TORCH_CHECK(a[B] == total_q, "cu_seqlens_q ends at ", a[B], " but q has ", total_q, " rows");
  TORCH_CHECK(c[B] == total_k, "cu_seqlens_k ends at ", c[B], " but k has ", total_k, " rows");
  std::vector<Seq> seqs(B);
  for (int64_t b = 0; b < B; ++b) {
    seqs[b] = {a[b], a[b + 1] - a[b], c[b], c[b + 1] - c[b]};
    TORCH_CHECK(seqs[b].lq >= 0 && seqs[b].lk >= 0, "cu_seqlens must be non-decreasing (sequence ", b, ")");
    TORCH_CHECK(seqs[b].lq <= max_q && seqs[b].lk <= max_k, "sequence ", b, " has ", seqs[b].lq, " queries and ",
                seqs[b].lk, " keys, more than max_seqlen_q=", max_q, " / max_seqlen_k=", max_k);
  }
  return seqs;
}

std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                       int64_t max_k, double scale_d) {
  check_qkv(q, k, v, cu_q, cu_k);
  const at::Tensor qf = rows_of(q), kf = rows_of(k), vf = rows_of(v);
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2), HD = H * D;
  const int64_t qs0 = qf.stride(0), qs1 = qf.stride(1), ks0 = kf.stride(0), ks1 = kf.stride(1);
  const int64_t vs0 = vf.stride(0), vs1 = vf.stride(1);
  const std::vector<Seq> seqs = read_seqs(cu_q, cu_k, Tq, k.size(0), max_q, max_k);
  at::Tensor out = at::zeros({Tq, H, D}, qf.options());  // rows of a sequence without keys stay 0
  at::Tensor lse = at::full({H, Tq}, kNegInf, qf.options());
  const float scale = static_cast<float>(scale_d);

  struct Item { int64_t b, h, i0; };
  std::vector<Item> items;
  for (int64_t b = 0; b < (int64_t)seqs.size(); ++b)
    if (seqs[b].lk > 0)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i0 = 0; i0 < seqs[b].lq; i0 += kFwdBQ) items.push_back({b, h, i0});
  std::stable_sort(items.begin(), items.end(), [&](const Item& x, const Item& y) { return seqs[x.b].lk > seqs[y.b].lk; });

  const float* qp0 = qf.data_ptr<float>();
  const float* kp0 = kf.data_ptr<float>();
  const float* vp0 = vf.data_ptr<float>();
  float* op0 = out.data_ptr<float>();
  float* lp0 = lse.data_ptr<float>();
  parallel_dynamic((int64_t)items.size(), [&](int64_t it, std::vector<float>& scratch) {
    const Item w = items[it];
    const Seq s = seqs[w.b];
    const int64_t bq = std::min(kFwdBQ, s.lq - w.i0);
    scratch.resize(kFwdBQ * kBK + 2 * kFwdBQ);
    float* S = scratch.data();
    float* m = S + kFwdBQ * kBK;
    float* l = m + kFwdBQ;
    std::fill(m, m + bq, kNegInf);
    std::fill(l, l + bq, 0.0f);
    const int64_t row0 = (s.q0 + w.i0) * HD + w.h * D;
    at::Tensor Q = mat(qp0 + (s.q0 + w.i0) * qs0 + w.h * qs1, bq, D, qs0), O = mat(op0 + row0, bq, D, HD);
    for (int64_t j0 = 0; j0 < s.lk; j0 += kBK) {
      const int64_t bk = std::min(kBK, s.lk - j0);
      at::Tensor St = mat(S, bq, bk, bk);
      at::mm_out(St, Q, mat(kp0 + (s.k0 + j0) * ks0 + w.h * ks1, D, bk, 1, ks0));  // Q K^T
      for (int64_t r = 0; r < bq; ++r) {
        float* row = S + r * bk;
        const float mnew = std::max(m[r], scale_rowmax(row, bk, scale));
        // a row all -inf so far: shift by 0 so its probabilities are 0, not exp(-inf + inf) = NaN
        const float sum = exp_sub_sum(row, bk, mnew == kNegInf ? 0.0f : mnew);
        const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - mnew);
        if (j0 > 0 && alpha != 1.0f) scale_row(op0 + row0 + r * HD, D, alpha);
        l[r] = l[r] * alpha + sum;
        m[r] = mnew;
      }
      O.addmm_(St, mat(vp0 + (s.k0 + j0) * vs0 + w.h * vs1, bk, D, vs0));  // O += P V
    }
    for (int64_t r = 0; r < bq; ++r) {
      scale_row(op0 + row0 + r * HD, D, 1.0f / l[r]);
      lp0[w.h * Tq + s.q0 + w.i0 + r] = m[r] + std::log(l[r]);
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
    double scale_d, const std::optional<at::Tensor>& dlse) {
  check_qkv(q, k, v, cu_q, cu_k);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout ", dout.sizes(), " and out ", out.sizes(),
              " must match q ", q.sizes());
  const int64_t Tq = q.size(0), Tk = k.size(0), H = q.size(1), D = q.size(2), HD = H * D;
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == H && lse.size(1) == Tq,
              "lse must be float32 (heads, total_q) = (", H, ", ", Tq, "), got ", lse.scalar_type(), " ", lse.sizes());
  const std::vector<Seq> seqs = read_seqs(cu_q, cu_k, Tq, Tk, max_q, max_k);
  const bool has_dlse = dlse.has_value() && dlse->defined();
  if (has_dlse)
    TORCH_CHECK(dlse->is_floating_point() && dlse->dim() == 2 && dlse->size(0) == H && dlse->size(1) == Tq &&
                dlse->device() == q.device(), "dlse must be a float (heads, total_q) = (", H, ", ", Tq,
                ") tensor on ", q.device(), ", got ", dlse->scalar_type(), " ", dlse->sizes());
  // d lse_i / d s_ij = p_ij, so a gradient into lse shifts the softmax backward's row term:
  // dS = P * (dP - (rowsum(dO * O) - dlse)).
  const at::Tensor dlf = has_dlse ? dlse->to(at::kFloat).contiguous() : at::Tensor();
  const float* dlp0 = has_dlse ? dlf.data_ptr<float>() : nullptr;
  const at::Tensor qf = rows_of(q), kf = rows_of(k), vf = rows_of(v), of = out.to(at::kFloat).contiguous(),
                   dof = dout.to(at::kFloat).contiguous(), lf = lse.contiguous();
  at::Tensor dq = at::zeros({Tq, H, D}, qf.options()), dk = at::zeros({Tk, H, D}, qf.options()),
             dv = at::zeros({Tk, H, D}, qf.options());
  const int64_t qs0 = qf.stride(0), qs1 = qf.stride(1), ks0 = kf.stride(0), ks1 = kf.stride(1);
  const int64_t vs0 = vf.stride(0), vs1 = vf.stride(1);
  const float scale = static_cast<float>(scale_d);

  struct Item { int64_t b, h; };
  std::vector<Item> items;
  for (int64_t b = 0; b < (int64_t)seqs.size(); ++b)
    if (seqs[b].lq > 0 && seqs[b].lk > 0)
      for (int64_t h = 0; h < H; ++h) items.push_back({b, h});
  std::stable_sort(items.begin(), items.end(), [&](const Item& x, const Item& y) {
    return seqs[x.b].lq * seqs[x.b].lk > seqs[y.b].lq * seqs[y.b].lk;
  });

  const float *qp0 = qf.data_ptr<float>(), *kp0 = kf.data_ptr<float>(), *vp0 = vf.data_ptr<float>(),
              *op0 = of.data_ptr<float>(), *dop0 = dof.data_ptr<float>(), *lp0 = lf.data_ptr<float>();
  float *dqp0 = dq.data_ptr<float>(), *dkp0 = dk.data_ptr<float>(), *dvp0 = dv.data_ptr<float>();
  parallel_dynamic((int64_t)items.size(), [&](int64_t it, std::vector<float>& scratch) {
    const Item w = items[it];
    const Seq s = seqs[w.b];
    scratch.resize(2 * kBwdBQ * kBK + s.lq);
    float* P = scratch.data();
    float* dP = P + kBwdBQ * kBK;
    float* dvec = dP + kBwdBQ * kBK;  // rowsum(dO * O) per query
    const int64_t qrow = s.q0 * HD + w.h * D, krow = s.k0 * HD + w.h * D;
    for (int64_t i = 0; i < s.lq; ++i) dvec[i] = dot(dop0 + qrow + i * HD, op0 + qrow + i * HD, D);
    if (dlp0 != nullptr)
      for (int64_t i = 0; i < s.lq; ++i) dvec[i] -= dlp0[w.h * Tq + s.q0 + i];
    const float* lse_h = lp0 + w.h * Tq + s.q0;
    for (int64_t j0 = 0; j0 < s.lk; j0 += kBK) {
      const int64_t bk = std::min(kBK, s.lk - j0);
      const int64_t kr = krow + j0 * HD;
      at::Tensor K = mat(kp0 + (s.k0 + j0) * ks0 + w.h * ks1, bk, D, ks0);
      at::Tensor V = mat(vp0 + (s.k0 + j0) * vs0 + w.h * vs1, bk, D, vs0);
      at::Tensor dK = mat(dkp0 + kr, bk, D, HD), dV = mat(dvp0 + kr, bk, D, HD);
      for (int64_t i0 = 0; i0 < s.lq; i0 += kBwdBQ) {
        const int64_t bq = std::min(kBwdBQ, s.lq - i0);
        const int64_t qr = qrow + i0 * HD;
        at::Tensor Q = mat(qp0 + (s.q0 + i0) * qs0 + w.h * qs1, bq, D, qs0);
        at::Tensor dO = mat(dop0 + qr, bq, D, HD), dQ = mat(dqp0 + qr, bq, D, HD);
        at::Tensor Pt = mat(P, bq, bk, bk), dPt = mat(dP, bq, bk, bk);
        at::mm_out(Pt, Q, K.t());
        for (int64_t r = 0; r < bq; ++r) exp_affine(P + r * bk, bk, scale, lse_h[i0 + r]);
        dV.addmm_(Pt.t(), dO);
        at::mm_out(dPt, dO, V.t());
        for (int64_t r = 0; r < bq; ++r) softmax_grad(P + r * bk, dP + r * bk, bk, dvec[i0 + r], scale);
        dK.addmm_(dPt.t(), Q);
        dQ.addmm_(dPt, K);
      }
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

#ifdef NVFM_WITH_CUDA
AttnDtype attn_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return AttnDtype::kFloat32;
    case at::kHalf: return AttnDtype::kFloat16;
    case at::kBFloat16: return AttnDtype::kBFloat16;
    default: TORCH_CHECK(false, "varlen attention supports float32, float16 and bfloat16, got ", st);
  }
  return AttnDtype::kFloat32;
}

VarlenAttnArgs cuda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale) {
  check_qkv(q, k, v, cu_q, cu_k);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && cu_q.is_contiguous() &&
                  cu_k.is_contiguous(), "varlen attention on CUDA needs contiguous q, k, v, cu_seqlens");
  TORCH_CHECK(varlen_attn_cuda_supports_head_dim((int)q.size(2)), "CUDA varlen attention supports head_dim 64 and "
              "128; got ", q.size(2));
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "CUDA varlen attention takes float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q < INT32_MAX && max_k < INT32_MAX, "bad max_seqlen");
  TORCH_CHECK(cu_q.size(0) - 1 <= 65535, "at most 65535 sequences per call on CUDA");
  VarlenAttnArgs a;
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.cu_q = cu_q.data_ptr<int32_t>(); a.cu_k = cu_k.data_ptr<int32_t>();
  a.B = (int)cu_q.size(0) - 1; a.H = (int)q.size(1); a.D = (int)q.size(2);
  a.max_q = (int)max_q; a.max_k = (int)max_k;
  a.total_q = q.size(0); a.total_k = k.size(0);
  a.scale = (float)scale;
  a.dtype = attn_dtype(q.scalar_type());
  return a;
}

// Note: max_seqlen_q/k must bound the true lengths (not checked here: it would need a sync).
// If one does not, the query rows past the grid are left as zeros with lse = -inf, and the
// backward kernels give them no gradient (dK/dV treat lse = -inf as p = 0): wrong, never NaN.
std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                        int64_t max_k, double scale) {
  c10::cuda::CUDAGuard guard(q.device());
  VarlenAttnArgs a = cuda_args(q, k, v, cu_q, cu_k, max_q, max_k, scale);
  at::Tensor out = at::zeros_like(q);
  at::Tensor lse = at::full({q.size(1), q.size(0)}, kNegInf, q.options().dtype(at::kFloat));
  // NVFM_ATTN_KERNEL=tc: the tensor-core kernels (sm_80+; unmeasured until a GPU run, hence opt-in)
  const char* kernel = std::getenv("NVFM_ATTN_KERNEL");
  const bool tc = kernel != nullptr && std::strcmp(kernel, "tc") == 0;
  C10_CUDA_CHECK((tc ? launch_varlen_attn_fwd_tc : launch_varlen_attn_fwd)(a, out.data_ptr(), lse.data_ptr<float>(),
                                                                           at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
    double scale, const std::optional<at::Tensor>& dlse) {
  c10::cuda::CUDAGuard guard(q.device());
  VarlenAttnArgs a = cuda_args(q, k, v, cu_q, cu_k, max_q, max_k, scale);
  // The CUDA kernels compute rowsum(dO * O) on the device and take no dlse term: refuse a
  // gradient into lse rather than drop it (one sync, only when a gradient reaches lse).
  if (dlse.has_value() && dlse->defined())
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->device() == lse.device() &&
                    !at::logical_and(*dlse != 0, at::isfinite(lse)).any().item<bool>(),
                "varlen_attn_bwd on CUDA: gradients through lse are not supported by the CUDA kernels "
                "(the CPU kernel supports them); detach lse or use impl='sdpa'");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(1) &&
              lse.size(1) == q.size(0), "lse must be float32 (heads, total_q)");
  const at::Tensor d_out = dout.to(q.scalar_type()).contiguous(), o = out.contiguous(), l = lse.contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor dvec = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  const char* kernel = std::getenv("NVFM_ATTN_KERNEL");  // tc: the tensor-core kernels (see the forward)
  const bool tc = kernel != nullptr && std::strcmp(kernel, "tc") == 0;
  C10_CUDA_CHECK((tc ? launch_varlen_attn_bwd_tc : launch_varlen_attn_bwd)(
      a, d_out.data_ptr(), o.data_ptr(), l.data_ptr<float>(), dvec.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
      dv.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("varlen_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, float scale) -> (Tensor, Tensor)");
  m.def("varlen_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, Tensor? dlse=None) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cpu);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cpu);
}

#ifdef NVFM_WITH_CUDA
TORCH_LIBRARY_IMPL(nvfm, CUDA, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cuda);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cuda);
}
#endif

}  // namespace nvfm
