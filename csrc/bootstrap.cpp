// Study-level (or subject-level cluster) bootstrap of per-class AUROC and threshold counts: the
// C++ CPU kernel and its torch.library registration. Reference (the specification):
// nvfm/metrics.py (`bootstrap(..., backend="reference")`, `_bootstrap_counts_reference`). No CUDA
// kernel: device=cuda runs the reference.
//
// One replicate = multinomial counts w (n,) over studies; every statistic is a weighted
// statistic of the original data. Per class the studies are sorted by score once (a "plan").
// Replicates go in chunks of 64 (kLanes): a thread draws the chunk's counts into an (n, 64)
// uint8 buffer (one 64-byte row per study; 3.2 MB at n = 50k, in L3), then walks each class's
// plan once in score order, prefetching the (random) rows ahead, keeping all 64 replicates'
// running negative weight. At a positive i, w_i x (negative weight below i) goes into a double
// accumulator; a tie group holding both labels counts its own negatives half. All of it is
// integer arithmetic (exact in double below 2^53), so the results do not depend on the thread
// count or the chunking. "score >= threshold" is a suffix of the sorted order, so TP and TN
// come from the same walk.
//
// Counts come from a counter-based generator (SplitMix64's finalizer mix64): replicate r has
//   key_r = mix64(seed + (r + 1) * 0x9E3779B97F4A7C15)
// and its draws 2p, 2p + 1 are the high and low 32 bits u of mix64(key_r + (p + 1) *
// 0xD1B54A32D192ED03), each mapped to study (u * n) >> 32 (bias below n / 2^32). The same
// numbers whatever the thread count, chunk or slice of replicates asked for; nvfm/metrics.py
// implements the same generator in torch (`_bootstrap_counts_reference`).
//
// Cluster bootstrap (groups given: study i belongs to group groups[i] in 0..G-1): a replicate
// draws G group counts with the same generator (n replaced by G) and study i weighs its group's
// count. The plans then hold group numbers instead of study numbers, so the count buffer is
// (G, 64) and the walk is unchanged. A group count still fits uint8 (it is a multinomial(G, 1/G)
// count like a study's), but a replicate's total weight sum_g count_g x size_g is no longer n:
// it is checked against 2^27 per replicate, below which the int32 sums and the double AUROC
// numerator (<= W^2 / 2 < 2^53) stay exact.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

// Build flags have no -march: compile the hot loop twice, AVX2 and baseline, picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NVFM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NVFM_CLONES
#endif

namespace nvfm {
namespace {

constexpr int kLanes = 64;                         // replicates per chunk (one uint8 cache line per study)
constexpr uint64_t kGammaRep = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kGammaDraw = 0xD1B54A32D192ED03ull;
constexpr uint32_t kIndexMask = (1u << 30) - 1;    // plan entry: bits 30-31 kind, bits 0-29 study index
constexpr uint32_t kNeg = 0u, kPos = 1u, kGroup = 2u;  // kGroup: header of a tie group with both labels;
                                                       // low bits = member count, members follow

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline uint64_t replicate_key(uint64_t seed, int64_t r) { return mix64(seed + (uint64_t)(r + 1) * kGammaRep); }
// Draws 2p and 2p + 1 of a replicate: the high and low halves of one hash, scaled to 0..n-1.
inline uint64_t draw_pair(uint64_t key, int64_t p) { return mix64(key + (uint64_t)(p + 1) * kGammaDraw); }
inline int64_t scale(uint64_t u32, uint64_t n) { return (int64_t)((u32 * n) >> 32); }

// Counts of one replicate into h (n,) uint8, which must start at zero. Returns false if a
// study was drawn more than 255 times (never in practice: P ~ 1 / 256! at n >= 256, impossible
// below), leaving that count saturated.
inline bool replicate_counts(uint8_t* h, int64_t n, uint64_t key) {
  bool ok = true;
  auto bump = [&](int64_t i) {
    if (h[i] == 255) ok = false;
    else ++h[i];
  };
  for (int64_t p = 0; p < n / 2; ++p) {
    const uint64_t u = draw_pair(key, p);
    bump(scale(u >> 32, n));
    bump(scale(u & 0xFFFFFFFFu, n));
  }
  if (n % 2) bump(scale(draw_pair(key, n / 2) >> 32, n));
  return ok;
}

// Counts of replicates r0 .. r0 + lanes - 1 into C (n, kLanes) uint8 (unused lanes 0), eight
// replicates at a time through per-replicate histograms H (8, n) that stay in L2 (scattering
// straight into C's 64-byte rows misses cache on every draw).
bool fill_counts(uint8_t* C, uint8_t* H, int64_t n, uint64_t seed, int64_t r0, int lanes) {
  bool ok = true;
  for (int g = 0; g < kLanes / 8; ++g) {
    std::memset(H, 0, (size_t)8 * n);
    for (int q = 0; q < 8 && g * 8 + q < lanes; ++q)
      ok &= replicate_counts(H + q * n, n, replicate_key(seed, r0 + g * 8 + q));
    for (int64_t i = 0; i < n; ++i) {
      uint64_t w = 0;
      for (int q = 0; q < 8; ++q) w |= (uint64_t)H[q * n + i] << (8 * q);
      std::memcpy(C + i * kLanes + g * 8, &w, 8);
    }
  }
  return ok;
}

constexpr int64_t kPrefetch = 32;  // entries ahead: the count rows are random reads, mostly from L3

struct Plan {
  std::vector<uint32_t> code;  // sorted walk (ascending score), see kNeg/kPos/kGroup; + kPrefetch zeros
  int64_t len = 0;             // entries without the padding
  int64_t thr = 0;             // first entry with score >= threshold (a group boundary)
};

// y, s: one class's column (n,), contiguous; grp (n,) each study's group (its count row) or null.
Plan make_plan(const uint8_t* y, const double* s, const int64_t* grp, int64_t n, double thr) {
  std::vector<std::pair<double, int32_t>> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = {s[i], (int32_t)i};
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  auto label = [&](int64_t e) { return y[order[e].second] != 0; };
  Plan p;
  p.code.reserve(n + kPrefetch + 16);
  p.thr = -1;
  for (int64_t g0 = 0; g0 < n;) {
    const double v = order[g0].first;
    int64_t g1 = g0 + 1, npos = label(g0);
    for (; g1 < n && order[g1].first == v; ++g1) npos += label(g1);
    if (p.thr < 0 && v >= thr) p.thr = (int64_t)p.code.size();
    if (npos > 0 && npos < g1 - g0) p.code.push_back(kGroup << 30 | (uint32_t)(g1 - g0));
    for (int64_t e = g0; e < g1; ++e) {
      const int64_t i = order[e].second;
      p.code.push_back((label(e) ? kPos : kNeg) << 30 | (uint32_t)(grp ? grp[i] : i));
    }
    g0 = g1;
  }
  p.len = (int64_t)p.code.size();
  if (p.thr < 0) p.thr = p.len;
  p.code.resize(p.len + kPrefetch, 0);
  return p;
}

struct Lanes {             // one class, kLanes replicates
  double num2[kLanes];     // 2 x AUROC numerator (sum over positives of w_i x negative weight below, ties half)
  int32_t P[kLanes], N[kLanes], TP[kLanes], TN[kLanes];
};

// Walk one class's plan over one chunk of counts C (n, kLanes). Runs of negatives (the common
// case) add into uint16 partial sums that the compiler keeps in vector registers, flushed into
// int32 at most every 256 entries (255 x 256 < 65536) and before every positive.
NVFM_CLONES void walk(const uint32_t* code, int64_t len, int64_t thr, const uint8_t* C, Lanes& o) {
  alignas(64) int32_t run[kLanes] = {}, prun[kLanes] = {}, fn[kLanes], tneg[kLanes];
  alignas(64) double acc[kLanes] = {};
  auto row = [&](int64_t e) { return C + (int64_t)(code[e] & kIndexMask) * kLanes; };
  int64_t e = 0;
  for (int seg = 0; seg < 2; ++seg) {
    const int64_t end = seg == 0 ? thr : len;
    while (e < end) {
      const uint32_t kind = code[e] >> 30;
      if (kind == kNeg) {
        alignas(64) uint16_t part[kLanes] = {};
        for (const int64_t stop = std::min(end, e + 256); e < stop && (code[e] >> 30) == kNeg; ++e) {
          __builtin_prefetch(row(e + kPrefetch));
          const uint8_t* c = row(e);
          for (int b = 0; b < kLanes; ++b) part[b] += c[b];
        }
        for (int b = 0; b < kLanes; ++b) run[b] += part[b];
      } else if (kind == kPos) {
        __builtin_prefetch(row(e + kPrefetch));
        const uint8_t* c = row(e);
        for (int b = 0; b < kLanes; ++b) {
          acc[b] += (double)c[b] * (double)(2 * run[b]);
          prun[b] += c[b];
        }
        ++e;
      } else {                           // tie group with both labels: its negatives count half
        const int64_t L = code[e] & kIndexMask;
        std::memset(tneg, 0, sizeof tneg);
        for (int64_t m = e + 1; m <= e + L; ++m) {
          __builtin_prefetch(row(m + kPrefetch));
          if ((code[m] >> 30) == kNeg) {
            const uint8_t* c = row(m);
            for (int b = 0; b < kLanes; ++b) tneg[b] += c[b];
          }
        }
        for (int64_t m = e + 1; m <= e + L; ++m)
          if ((code[m] >> 30) == kPos) {
            const uint8_t* c = row(m);
            for (int b = 0; b < kLanes; ++b) {
              acc[b] += (double)c[b] * (double)(2 * run[b] + tneg[b]);
              prun[b] += c[b];
            }
          }
        for (int b = 0; b < kLanes; ++b) run[b] += tneg[b];
        e += L + 1;
      }
    }
    if (seg == 0) {                      // below the threshold: true negatives, false negatives
      std::memcpy(o.TN, run, sizeof o.TN);
      std::memcpy(fn, prun, sizeof fn);
    }
  }
  for (int b = 0; b < kLanes; ++b) {
    o.num2[b] = acc[b];
    o.N[b] = run[b];
    o.P[b] = prun[b];
    o.TP[b] = prun[b] - fn[b];
  }
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : p((uint8_t*)std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64))) {
    TORCH_CHECK(p != nullptr, "bootstrap: out of memory (", bytes, " bytes)");
  }
  ~AlignedBuffer() { std::free(p); }
  uint8_t* p;
};

constexpr int64_t kMaxWeight = int64_t(1) << 27;   // a replicate's total weight: exact sums below it

// labels (n, K) uint8 0/1, scores (n, K) float64, thresholds (K,) float64; replicates r0 .. r0 + n_rep - 1.
// groups: None (study counts) or (n,) int64 group of each study in 0..n_groups-1 (group counts).
// Returns (n_rep, K, 5) float64: AUROC numerator (ties half), P, N, TP, TN (weights = counts);
// AUROC = num / (P N), sensitivity = TP / P, specificity = TN / N.
at::Tensor bootstrap_stats_cpu(const at::Tensor& labels, const at::Tensor& scores, const at::Tensor& thresholds,
                               int64_t r0, int64_t n_rep, int64_t seed, const c10::optional<at::Tensor>& groups,
                               int64_t n_groups) {
  TORCH_CHECK(labels.scalar_type() == at::kByte && labels.dim() == 2 && labels.is_contiguous(),
              "bootstrap_stats: labels must be contiguous (n, K) uint8, got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kDouble && scores.sizes() == labels.sizes() && scores.is_contiguous(),
              "bootstrap_stats: scores must be contiguous float64 of the labels' shape ", labels.sizes());
  TORCH_CHECK(thresholds.scalar_type() == at::kDouble && thresholds.dim() == 1 && thresholds.size(0) == labels.size(1) &&
              thresholds.is_contiguous(), "bootstrap_stats: thresholds must be contiguous (K,) float64");
  TORCH_CHECK(r0 >= 0 && n_rep >= 0, "bootstrap_stats: r0 and n_rep must be >= 0");
  const int64_t n = labels.size(0), K = labels.size(1);
  TORCH_CHECK(n <= (int64_t)kIndexMask, "bootstrap_stats: at most 2^30 - 1 studies, got ", n);
  const at::Tensor yT = labels.t().contiguous(), sT = scores.t().contiguous();  // (K, n): columns contiguous
  const uint8_t* y = yT.data_ptr<uint8_t>();
  const double* s = sT.data_ptr<double>();
  TORCH_CHECK(std::all_of(s, s + n * K, [](double v) { return std::isfinite(v); }),
              "bootstrap_stats: scores contain NaN or inf");
  const double* t = thresholds.data_ptr<double>();
  const int64_t* grp = nullptr;
  std::vector<int64_t> size;   // studies per group
  if (groups.has_value()) {
    const at::Tensor& g = *groups;
    TORCH_CHECK(g.scalar_type() == at::kLong && g.dim() == 1 && g.size(0) == n && g.is_contiguous(),
                "bootstrap_stats: groups must be contiguous (n,) int64 (n = ", n, "), got ", g.scalar_type(), " ",
                g.sizes());
    TORCH_CHECK(n_groups >= 1 && n_groups <= (int64_t)kIndexMask,
                "bootstrap_stats: n_groups must be in 1..2^30 - 1, got ", n_groups);
    grp = g.data_ptr<int64_t>();
    size.assign(n_groups, 0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(grp[i] >= 0 && grp[i] < n_groups, "bootstrap_stats: study ", i, " has group ", grp[i],
                  ", not in 0..", n_groups - 1);
      ++size[grp[i]];
    }
  } else {
    TORCH_CHECK(n_groups == 0, "bootstrap_stats: n_groups given without groups");
  }
  const int64_t m = grp ? n_groups : n;   // units drawn per replicate (rows of the count buffer)
  std::vector<Plan> plans(K);
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) plans[k] = make_plan(y + k * n, s + k * n, grp, n, t[k]);
  });
  at::Tensor out = at::zeros({n_rep, K, 5}, scores.options());
  double* o = out.data_ptr<double>();
  const int64_t nchunks = (n_rep + kLanes - 1) / kLanes;
  std::atomic<bool> overflow{false}, heavy{false};
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    AlignedBuffer C((size_t)m * kLanes), H((size_t)8 * m);
    Lanes st;
    for (int64_t ch = c0; ch < c1 && !overflow.load() && !heavy.load(); ++ch) {
      const int64_t b0 = ch * kLanes;
      const int lanes = (int)std::min<int64_t>(kLanes, n_rep - b0);
      if (!fill_counts(C.p, H.p, m, (uint64_t)seed, r0 + b0, lanes)) overflow = true;
      if (grp) {
        int64_t W[kLanes] = {};
        for (int64_t g = 0; g < m; ++g)
          for (int b = 0; b < kLanes; ++b) W[b] += (int64_t)C.p[g * kLanes + b] * size[g];
        if (*std::max_element(W, W + kLanes) >= kMaxWeight) heavy = true;
      }
      for (int64_t k = 0; k < K; ++k) {
        walk(plans[k].code.data(), plans[k].len, plans[k].thr, C.p, st);
        for (int b = 0; b < lanes; ++b) {
          double* d = o + ((b0 + b) * K + k) * 5;
          d[0] = 0.5 * st.num2[b];
          d[1] = st.P[b];
          d[2] = st.N[b];
          d[3] = st.TP[b];
          d[4] = st.TN[b];
        }
      }
    }
  });
  TORCH_CHECK(!overflow.load(), "bootstrap_stats: a ", grp ? "group" : "study", " was drawn more than 255 times in "
              "one replicate (", m, grp ? " groups" : " studies", "); uint8 counts cannot hold it");
  TORCH_CHECK(!heavy.load(), "bootstrap_stats: a replicate's studies weigh 2^27 or more in all (", n_groups,
              " groups of up to ", *std::max_element(size.begin(), size.end()),
              " studies); its sums would not be exact");
  return out;
}

// The generator on its own: (n, n_rep) int32 counts of replicates r0 .. r0 + n_rep - 1 (columns sum to n).
at::Tensor bootstrap_counts_cpu(int64_t n, int64_t r0, int64_t n_rep, int64_t seed) {
  TORCH_CHECK(n >= 0 && r0 >= 0 && n_rep >= 0, "bootstrap_counts: n, r0, n_rep must be >= 0");
  at::Tensor h = at::zeros({n_rep, n}, at::kByte);
  uint8_t* o = h.data_ptr<uint8_t>();
  std::atomic<bool> overflow{false};
  at::parallel_for(0, n_rep, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      if (!replicate_counts(o + b * n, n, replicate_key((uint64_t)seed, r0 + b))) overflow = true;
  });
  TORCH_CHECK(!overflow.load(), "bootstrap_counts: a study was drawn more than 255 times in one replicate (n = ", n, ")");
  return h.t().to(at::kInt).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("bootstrap_stats(Tensor labels, Tensor scores, Tensor thresholds, int r0, int n_rep, int seed, "
        "Tensor? groups=None, int n_groups=0) -> Tensor");
  // no tensor inputs to dispatch on: one kernel for every device (it allocates on the CPU)
  m.def("bootstrap_counts(int n, int r0, int n_rep, int seed) -> Tensor", &bootstrap_counts_cpu);
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) { m.impl("bootstrap_stats", &bootstrap_stats_cpu); }

}  // namespace nvfm
