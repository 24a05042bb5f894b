// A small SIMT emulator: runs the csrc/*.cu kernels on the CPU, compiled by g++ with
// -DNVFM_SIMT, so their logic (indexing, barriers, warp exchanges, ragged tails) is tested in
// CI without a GPU. Test infrastructure only; never part of the built extension.
//
// Model (what a kernel may rely on, and what is reported when it does not):
// - every CUDA thread of a block is a fiber (ucontext) with its own stack; the blocks of a
//   grid run one after another, so `__shared__` can be a plain static (shared by the fibers
//   of the running block) and dynamic shared memory one buffer, filled with 0xFF (NaN as
//   float, -1 as int) at every block start;
// - a fiber runs until it reaches __syncthreads, a warp collective, or its end; the order in
//   which runnable fibers (and blocks) are taken is the schedule: forward, reverse or
//   random:<seed>, so a missing barrier shows up as a read of a value not yet written; the
//   schedule also decides which ready warps move on and when cp.async data lands. forward:
//   fibers in thread order, every fiber runs until it blocks before any warp collective
//   completes, then all complete (warps in lockstep); data lands at the cp.async wait.
//   reverse: fibers in reverse thread order, and a warp none of whose lanes can run has its
//   collectives completed at once, before the fibers of lower warps run, so the highest warp
//   runs ahead across warp collectives to its next __syncthreads before the lower warps leave
//   their previous one (a warp reading shared memory that other warps write, with no barrier
//   in between, reads it unwritten); data lands at issue. random: fibers in a random order
//   each round, a random subset of the ready warps completes; data lands at the wait or at
//   issue, per copy;
// - __syncthreads is a counting barrier: it opens when every thread of the block waits at
//   the same call site; threads at different sites (divergence), threads that exited while
//   others wait, and states where nothing can proceed (deadlock) are errors;
// - __shfl*_sync / __ballot_sync / __any_sync / __all_sync / __syncwarp complete when every
//   lane named in the mask has reached a collective with the same op and mask; a mask that
//   names an exited lane or a lane past a partial warp, or a source lane outside the mask,
//   is an error (independent thread scheduling, as on sm_70+);
// - launches check grid and block limits and >48 KB dynamic shared memory without
//   cudaFuncSetAttribute; errors make cudaGetLastError() return cudaErrorLaunchFailure and
//   are described by simt::last_message().
// Not modelled: timing, the memory model across blocks (blocks never overlap here), atomics,
// fast-math precision (__expf is expf).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif

// ---- CUDA runtime surface ----------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace simt {

constexpr size_t kDefaultSmem = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kMaxSmem = 227 * 1024;      // H100 opt-in limit per block
constexpr unsigned kFullMask = 0xffffffffu;
#if defined(SIMT_ASAN)
constexpr size_t kStack = 512 * 1024;
#else
constexpr size_t kStack = 128 * 1024;
#endif

enum class State { Runnable, Barrier, Warp, Exited };
enum class Op { Shfl, ShflXor, ShflUp, ShflDown, Ballot, Any, All, Sync };
enum class Schedule { Forward = 0, Reverse = 1, Random = 2 };

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  int linear = 0, lane = 0, warp = 0;
  State state = State::Runnable;
  const char* site_file = nullptr;  // where it waits at __syncthreads
  int site_line = 0;
  Op op = Op::Sync;                 // the warp collective it waits in
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  char* stack = nullptr;
#if defined(SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
  struct Copy { void* dst; const void* src; int bytes, src_bytes, group; };
  std::vector<Copy> async_copies;   // cp.async issued, not yet waited for (data lands at the wait)
  int async_group = 0;              // index of the group being filled
};

struct Runtime {
  std::vector<Thread> threads;
  std::vector<char*> stacks;
  Thread* cur = nullptr;
  ucontext_t sched;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<unsigned char> smem;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  bool failed = false;
  std::string message;             // first error of the last failing launch
  cudaError_t last_error = cudaSuccess;
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  std::map<const void*, int> max_smem;  // cudaFuncSetAttribute
  std::vector<const void*> slots;       // 32 per warp: what each lane hands to a fragment collective
  uint64_t launches = 0, switches = 0;
#if defined(SIMT_ASAN)
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (!r.failed) {
    r.failed = true;
    r.message = what + " (block " + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
                std::to_string(r.block_idx.z) + ")";
  }
}

inline void configure(Schedule s, uint64_t seed) {
  rt().schedule = s;
  rt().seed = seed;
  rt().rng.seed(seed);
}
inline const char* last_message() { return rt().message.c_str(); }

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
inline void yield_to_scheduler(bool exiting = false) {
  Runtime& r = rt();
  Thread* t = r.cur;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fake_stack, r.sched_bottom, r.sched_size);
#else
  (void)exiting;
#endif
  swapcontext(&t->ctx, &r.sched);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &rt().sched_bottom, &rt().sched_size);
#endif
  Runtime& r = rt();
  r.body(r.body_arg);
  r.cur->state = State::Exited;
  yield_to_scheduler(true);
}

inline void resume(Thread& t) {
  Runtime& r = rt();
  r.cur = &t;
  ++r.switches;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(&r.sched_fake, t.stack, kStack);
#endif
  swapcontext(&r.sched, &t.ctx);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
}

// ---- device-side primitives ---------------------------------------------------------------
inline void syncthreads(const char* file, int line) {
  Thread* t = rt().cur;
  t->state = State::Barrier;
  t->site_file = file;
  t->site_line = line;
  yield_to_scheduler();
}

inline uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width) {
  Thread* t = rt().cur;
  if (!(mask >> t->lane & 1u)) {
    fail("lane " + std::to_string(t->lane) + " of warp " + std::to_string(t->warp) +
         " calls a warp collective with a mask that does not name it");
    yield_to_scheduler();
  }
  t->state = State::Warp;
  t->op = op;
  t->mask = mask;
  t->value = value;
  t->arg = arg;
  t->width = width;
  yield_to_scheduler();
  return t->result;
}

template <typename T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T of_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The warp collectives of one warp whose lanes all wait: complete the groups whose mask is
// fully present. Returns true when some lane was released.
inline bool release_warp(int w, int nthreads) {
  Runtime& r = rt();
  const int first = w * 32, lanes = std::min(32, nthreads - first);
  bool released = false;
  for (int l = 0; l < lanes; ++l) {
    Thread& t = r.threads[first + l];
    if (t.state != State::Warp) continue;
    bool ready = true;
    for (int j = 0; j < 32 && ready; ++j) {
      if (!(t.mask >> j & 1u)) continue;
      if (j >= lanes) {
        fail("warp collective mask names lane " + std::to_string(j) + " past the partial warp " + std::to_string(w) +
             " (" + std::to_string(lanes) + " lanes)");
        return false;
      }
      const Thread& o = r.threads[first + j];
      if (o.state == State::Exited) {
        fail("warp collective in warp " + std::to_string(w) + " names lane " + std::to_string(j) + ", which exited");
        return false;
      }
      if (o.state != State::Warp) { ready = false; break; }
      if (o.op != t.op || o.mask != t.mask) {
        fail("lanes " + std::to_string(l) + " and " + std::to_string(j) + " of warp " + std::to_string(w) +
             " wait in different warp collectives (op or mask differ)");
        return false;
      }
    }
    if (!ready) continue;
    uint64_t ballot = 0;
    bool any = false, all = true;
    for (int j = 0; j < 32; ++j)
      if (t.mask >> j & 1u) {
        const bool p = r.threads[first + j].value != 0;
        ballot |= (uint64_t)p << j;
        any = any || p;
        all = all && p;
      }
    for (int j = 0; j < 32; ++j) {
      if (!(t.mask >> j & 1u)) continue;
      Thread& o = r.threads[first + j];
      const int width = o.width, base = j & ~(width - 1);
      int src = j;
      switch (o.op) {
        case Op::Shfl: src = base + (o.arg % width + width) % width; break;
        case Op::ShflXor: src = j ^ o.arg; if (src >= base + width) src = j; break;
        case Op::ShflUp: src = j - o.arg < base ? j : j - o.arg; break;
        case Op::ShflDown: src = j + o.arg >= base + width ? j : j + o.arg; break;
        default: break;
      }
      switch (o.op) {
        case Op::Shfl: case Op::ShflXor: case Op::ShflUp: case Op::ShflDown:
          if (src >= lanes || !(t.mask >> src & 1u)) {
            fail("lane " + std::to_string(j) + " of warp " + std::to_string(w) + " shuffles from lane " +
                 std::to_string(src) + ", not in the mask");
            return false;
          }
          o.result = r.threads[first + src].value;
          break;
        case Op::Ballot: o.result = ballot; break;
        case Op::Any: o.result = any; break;
        case Op::All: o.result = all; break;
        case Op::Sync: o.result = 0; break;
      }
    }
    for (int j = 0; j < 32; ++j)
      if (t.mask >> j & 1u) r.threads[first + j].state = State::Runnable;
    released = true;
  }
  return released;
}

inline std::string site(const Thread& t) { return std::string(t.site_file) + ":" + std::to_string(t.site_line); }

// Run one block to completion (or to the first error).
inline void run_block(int nthreads) {
  Runtime& r = rt();
  std::vector<int> order(nthreads);
  for (int i = 0; i < nthreads; ++i) order[i] = r.schedule == Schedule::Reverse ? nthreads - 1 - i : i;
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = r.threads[i];
    t.state = State::Runnable;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  const int warps = (nthreads + 31) / 32;
  while (!r.failed) {
    if (r.schedule == Schedule::Random) std::shuffle(order.begin(), order.end(), r.rng);
    bool ran = false;
    for (int i : order) {
      if (r.threads[i].state != State::Runnable) continue;
      resume(r.threads[i]);
      ran = true;
      if (r.failed) return;
      // reverse: a warp none of whose lanes can run is released at once (its state cannot change
      // until then, so this is what release_warp would decide later), and the pass restarts, so
      // it runs ahead of the lower warps across warp collectives up to its next __syncthreads
      if (r.schedule == Schedule::Reverse) {
        const int w = r.threads[i].warp, first = 32 * w, last = std::min(first + 32, nthreads);
        bool blocked = true;
        for (int j = first; j < last && blocked; ++j) blocked = r.threads[j].state != State::Runnable;
        if (blocked && release_warp(w, nthreads)) break;
        if (r.failed) return;
      }
    }
    if (ran) continue;
    // every fiber waits or has exited: open what can open. Forward releases every ready warp
    // (warps in lockstep); reverse only the last ready one (its warps were released as soon as
    // they were ready, see above); random each ready warp with probability 1/2.
    bool released = false;
    for (int i = 0; i < warps && !r.failed; ++i) {
      const int w = r.schedule == Schedule::Reverse ? warps - 1 - i : i;
      if (r.schedule == Schedule::Random && (r.rng() & 1) && i + 1 < warps) continue;
      released = release_warp(w, nthreads) || released;
      if (released && r.schedule == Schedule::Reverse) break;
    }
    if (!released && !r.failed && r.schedule == Schedule::Random)
      for (int w = 0; w < warps && !released && !r.failed; ++w) released = release_warp(w, nthreads);
    if (r.failed) return;
    if (released) continue;
    int at_barrier = 0, exited = 0, at_warp = 0;
    const Thread* first = nullptr;
    for (const Thread& t : r.threads) {
      if (t.state == State::Barrier) {
        ++at_barrier;
        if (!first) first = &t;
        else if (t.site_line != first->site_line || std::strcmp(t.site_file, first->site_file) != 0) {
          fail("divergent __syncthreads: thread " + std::to_string(first->linear) + " waits at " + site(*first) +
               ", thread " + std::to_string(t.linear) + " at " + site(t));
          return;
        }
      } else if (t.state == State::Exited) {
        ++exited;
      } else if (t.state == State::Warp) {
        ++at_warp;
      }
    }
    if (exited == nthreads) return;
    if (at_barrier == nthreads) {
      for (Thread& t : r.threads) t.state = State::Runnable;
      continue;
    }
    if (at_barrier > 0 && at_warp == 0) {
      fail("divergent __syncthreads at " + site(*first) + ": " + std::to_string(exited) + " of " +
           std::to_string(nthreads) + " threads exited while " + std::to_string(at_barrier) + " wait");
      return;
    }
    fail("deadlock: " + std::to_string(at_warp) + " threads wait in warp collectives that cannot complete, " +
         std::to_string(at_barrier) + " at __syncthreads, " + std::to_string(exited) + " exited");
    return;
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, void (*body)(void*), void* arg) {
  Runtime& r = rt();
  ++r.launches;
  auto reject = [&](const std::string& why) {
    r.failed = true;
    r.message = "launch rejected: " + why;
    r.last_error = cudaErrorInvalidConfiguration;
  };
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0) return reject("a zero grid or block dimension");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) return reject("grid dims over (2^31-1, 65535, 65535)");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || nthreads > 1024) return reject("block over 1024 threads");
  auto it = r.max_smem.find(kernel);
  const size_t limit = it == r.max_smem.end() ? kDefaultSmem : (size_t)it->second;
  if (smem > limit)
    return reject(std::to_string(smem) + " B of dynamic shared memory over the " + std::to_string(limit) +
                  " B allowed" + (it == r.max_smem.end() ? " (no cudaFuncSetAttribute)" : ""));
  while (r.stacks.size() < nthreads) r.stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  r.threads.assign(nthreads, Thread());
  for (unsigned i = 0; i < nthreads; ++i) {
    Thread& t = r.threads[i];
    t.linear = i;
    t.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t.lane = i % 32;
    t.warp = i / 32;
    t.stack = r.stacks[i];
  }
  r.slots.assign(32 * ((nthreads + 31) / 32), nullptr);
  r.block_dim = block;
  r.grid_dim = grid;
  r.body = body;
  r.body_arg = arg;
  r.smem.assign(smem, 0xff);
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint64_t> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = r.schedule == Schedule::Reverse ? nblocks - 1 - i : i;
  if (r.schedule == Schedule::Random) std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (uint64_t bi : blocks) {
    r.block_idx = dim3(bi % grid.x, (bi / grid.x) % grid.y, bi / ((uint64_t)grid.x * grid.y));
    std::memset(r.smem.data(), 0xff, smem);
    run_block((int)nthreads);
    if (r.failed) {
      r.last_error = cudaErrorLaunchFailure;
      return;
    }
  }
}

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(rt().smem.data());
}

// kernel<<<grid, block, smem, stream>>>(args...) is written NVFM_LAUNCH(grid, block, smem, stream, kernel)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<P...> params(static_cast<P>(std::forward<A>(args))...);
    struct Call {
      void (*k)(P...);
      std::tuple<P...>* p;
    } call{kernel, &params};
    run_grid(grid, block, smem, reinterpret_cast<const void*>(kernel),
             [](void* c) { Call* x = static_cast<Call*>(c); std::apply(x->k, *x->p); }, &call);
  }
};
template <typename... P>
inline Launch<P...> launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace simt

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::rt().last_error;
  simt::rt().last_error = cudaSuccess;
  return e;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || (size_t)value > simt::kMaxSmem)
    return cudaErrorInvalidValue;
  simt::rt().max_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

#define threadIdx (::simt::rt().cur->idx)
#define blockIdx (::simt::rt().block_idx)
#define blockDim (::simt::rt().block_dim)
#define gridDim (::simt::rt().grid_dim)
#define warpSize 32
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt::of_bits<T>(simt::warp_op(simt::Op::Shfl, mask, simt::bits_of(v), src, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt::of_bits<T>(simt::warp_op(simt::Op::ShflXor, mask, simt::bits_of(v), lane_mask, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::of_bits<T>(simt::warp_op(simt::Op::ShflUp, mask, simt::bits_of(v), (int)delta, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::of_bits<T>(simt::warp_op(simt::Op::ShflDown, mask, simt::bits_of(v), (int)delta, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)simt::warp_op(simt::Op::Ballot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return (int)simt::warp_op(simt::Op::Any, mask, pred != 0, 0, 32); }
inline int __all_sync(unsigned mask, int pred) { return (int)simt::warp_op(simt::Op::All, mask, pred != 0, 0, 32); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { simt::warp_op(simt::Op::Sync, mask, 0, 0, 32); }

// ---- math ------------------------------------------------------------------------------------
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, as on the GPU
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __int_as_float(int x) { return simt::of_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)simt::bits_of(x); }

// ---- half and bfloat16: storage types with round-to-nearest-even conversions --------------
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float __half2float(__half h) {
  const uint32_t s = (uint32_t)(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  if (e == 0) return s ? -std::ldexp((float)m, -24) : std::ldexp((float)m, -24);
  if (e == 31) return simt::of_bits<float>(s | 0x7f800000u | (m << 13));
  return simt::of_bits<float>(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  uint32_t x = (uint32_t)simt::bits_of(f);
  const uint16_t s = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return {(uint16_t)(s | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return {(uint16_t)(s | 0x7c00u)};  // rounds to >= 65536: inf
  if (x <= 0x33000000u) return {s};                        // <= 2^-25: rounds to 0 (ties to even)
  if (x < 0x38800000u) {                                   // subnormal half
    const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return {(uint16_t)(s | r)};
  }
  uint32_t r = (((x >> 23) - 112) << 10) | ((x & 0x7fffffu) >> 13);
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is right
  return {(uint16_t)(s | r)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return simt::of_bits<float>((uint32_t)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = (uint32_t)simt::bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((x >> 16) | 0x40u)};  // quiet NaN
  return {(uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

// ---- tensor-core primitives (csrc/tensor_core.h): the PTX ISA's documented fragment layouts ----
namespace simt {

// Every lane of the (full) warp hands `mine` over; then compute(lane, slots) runs for each lane
// while all lanes' data are readable; a second __syncwarp keeps the data alive until all are done.
template <typename F>
inline void warp_fragment_op(const void* mine, F compute) {
  Thread* t = rt().cur;
  const void** slots = rt().slots.data() + 32 * t->warp;
  slots[t->lane] = mine;
  __syncwarp();
  compute(t->lane, slots);
  __syncwarp();
}

inline uint16_t half_at(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8m..8m+7 give the row addresses of
// matrix m; lane t receives, of matrix m, row t/4 elements (t%4)*2 and +1 (with .trans: rows
// (t%4)*2 and +1 of column t/4), packed low half first.
template <int N, bool Trans>
inline void ldmatrix(uint32_t* r, const void* row_addr) {
  warp_fragment_op(row_addr, [&](int t, const void** rows) {
    for (int m = 0; m < N; ++m) {
      uint16_t lo, hi;
      if (Trans) {
        lo = half_at(rows[8 * m + (t % 4) * 2], t / 4);
        hi = half_at(rows[8 * m + (t % 4) * 2 + 1], t / 4);
      } else {
        lo = half_at(rows[8 * m + t / 4], (t % 4) * 2);
        hi = half_at(rows[8 * m + t / 4], (t % 4) * 2 + 1);
      }
      r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
  });
}

struct MmaOperands { const uint32_t* a; const uint32_t* b; };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32: d += A (16x16) B (16x8), fp32 accumulate.
// Fragments (g = lane / 4, c = lane % 4): A regs {a0a1: (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..),
// (g+8, 2c+8..)}; B regs {(k 2c..2c+1, n g), (k 2c+8.., n g)}; C/D {(g, 2c), (g, 2c+1),
// (g+8, 2c), (g+8, 2c+1)}. ToFloat converts one 16-bit element.
template <float (*ToFloat)(uint16_t)>
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b) {
  MmaOperands mine{a, b};
  float acc[4] = {d[0], d[1], d[2], d[3]};
  warp_fragment_op(&mine, [&](int t, const void** slots) {
    auto A = [&](int row, int k) {
      const MmaOperands* o = static_cast<const MmaOperands*>(slots[(row % 8) * 4 + (k % 8) / 2]);
      const uint32_t reg = o->a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      return ToFloat((uint16_t)(k % 2 ? reg >> 16 : reg & 0xffffu));
    };
    auto B = [&](int k, int col) {
      const MmaOperands* o = static_cast<const MmaOperands*>(slots[col * 4 + (k % 8) / 2]);
      const uint32_t reg = o->b[k >= 8 ? 1 : 0];
      return ToFloat((uint16_t)(k % 2 ? reg >> 16 : reg & 0xffffu));
    };
    const int g = t / 4, c = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * c + (e % 2);
      float s = acc[e];
      for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
      acc[e] = s;
    }
  });
  for (int e = 0; e < 4; ++e) d[e] = acc[e];
}

// cp.async.cg.shared.global 16 bytes (src_bytes < 16: the rest zero-filled). When the data lands
// depends on the schedule: forward: at the cp.async.wait_group that covers it (a missing wait
// reads stale shared memory); reverse: at issue (a buffer refilled before every warp is done
// with it is overwritten early); random: either, per copy.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Runtime& r = rt();
  Thread* t = r.cur;
  const bool now = r.schedule == Schedule::Reverse || (r.schedule == Schedule::Random && (r.rng() & 1));
  if (now) {
    std::memset(dst, 0, bytes);
    if (src_bytes > 0) std::memcpy(dst, src, src_bytes);
  } else {
    t->async_copies.push_back({dst, src, bytes, src_bytes, t->async_group});
  }
}
inline void cp_async_commit() { ++rt().cur->async_group; }
inline void cp_async_wait(int pending) {  // complete all but the newest `pending` committed groups
  Thread* t = rt().cur;
  std::vector<Thread::Copy> keep;
  for (const Thread::Copy& c : t->async_copies) {
    if (c.group < t->async_group - pending) {
      std::memset(c.dst, 0, c.bytes);
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
    } else {
      keep.push_back(c);
    }
  }
  t->async_copies.swap(keep);
}

inline float f16_bits_to_float(uint16_t x) { return __half2float(__half{x}); }
inline float bf16_bits_to_float(uint16_t x) { return __bfloat162float(__nv_bfloat16{x}); }

}  // namespace simt
