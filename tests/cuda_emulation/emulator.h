// A CPU emulator of the CUDA built-ins that ssd_post's kernels use, so that the
// kernel headers (csrc/cuda/*_kernels.cuh) run, unchanged, on a machine with no
// GPU. Every CUDA thread of a block is a fiber (ucontext) on the calling thread;
// __syncthreads and the warp primitives are barriers at which a fiber yields
// until all running threads of its block (or warp) have arrived; blocks run one
// after another. Between barriers the threads run in a shuffled order (a fixed
// seed, so runs repeat), so a kernel that reads another thread's write without a
// barrier in between gets stale data here, as it may on the device; a barrier
// that not every running thread reaches is reported as a deadlock.
//
// What it checks: the kernels' indexing, their barriers and warp exchanges, the
// radix select, the chunked NMS and the key packing, with the same arithmetic
// headers as the CPU kernels. What it cannot check: anything of the real device
// (expf's rounding, memory limits, launch configuration, CUB's device-wide sort,
// timing). Float arithmetic takes the host path of csrc/common (std::exp), so
// scores match the CPU kernels to a few ULPs, as the device's do.
#pragma once

#define SSD_POST_CUDA_EMULATION 1

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
// Blocks run one at a time, so a function-local static is exactly one block's
// shared variable: every thread of the block sees the same object.
#define __shared__ static

struct EmulatedDim3 {
  unsigned x = 0, y = 1, z = 1;
};
// Set by the scheduler before it resumes a thread's fiber.
inline EmulatedDim3 threadIdx, blockIdx, blockDim;

struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

namespace cuda_emulation {

void yield_to_scheduler();

// A barrier over the threads of a block (or of a warp) that are still running:
// a thread that returns from the kernel stops counting, as exited threads do on
// the GPU. arrive_and_wait also sums one int over the arrivals, which gives
// __syncthreads_count and __any_sync.
class Barrier {
 public:
  void reset(int participants) {
    participants_ = participants;
    arrived_ = 0;
    total_ = 0;
  }

  int arrive_and_wait(int contribution) {
    const uint64_t generation = generation_;
    total_ += contribution;
    if (++arrived_ == participants_) release();
    while (generation_ == generation) yield_to_scheduler();
    // Stable until this thread arrives again: no later generation can complete
    // without it.
    return released_total_;
  }

  void drop() {
    --participants_;
    if (arrived_ > 0 && arrived_ == participants_) release();
  }

 private:
  void release();

  int participants_ = 0;
  int arrived_ = 0;
  int total_ = 0;
  int released_total_ = 0;
  uint64_t generation_ = 0;
};

constexpr int kWarpLanes = 32;
constexpr size_t kFiberStackBytes = 64 * 1024;

struct Warp {
  Barrier barrier;
  uint64_t lanes[kWarpLanes];
};

// The running launch: its block's barriers and dynamic shared memory, and the
// fibers of the block's threads.
struct Launch {
  std::function<void()> kernel;
  unsigned threads = 0;
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_shared;
  std::vector<ucontext_t> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<bool> finished;
  ucontext_t scheduler;
  unsigned current = 0;
  uint64_t progress = 0;  // releases and exits; a round without any is a deadlock
};

inline Launch*& active_launch() {
  static Launch* launch = nullptr;
  return launch;
}

inline void Barrier::release() {
  released_total_ = total_;
  total_ = 0;
  arrived_ = 0;
  ++generation_;
  ++active_launch()->progress;
}

inline void yield_to_scheduler() {
  Launch& launch = *active_launch();
  swapcontext(&launch.fibers[launch.current], &launch.scheduler);
}

inline void fiber_main() {
  Launch& launch = *active_launch();
  const unsigned t = launch.current;
  launch.kernel();
  launch.warps[t / kWarpLanes].barrier.drop();
  launch.barrier.drop();
  launch.finished[t] = true;
  ++launch.progress;
  // Returning resumes uc_link, the scheduler.
}

inline int lane_id() { return static_cast<int>(threadIdx.x % kWarpLanes); }
inline Warp& this_warp() { return active_launch()->warps[threadIdx.x / kWarpLanes]; }

// Every lane publishes `value`, then reads the value of lane source_lane(lane).
template <typename T, typename SourceLane>
T exchange_in_warp(T value, SourceLane source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one 64-bit word per lane");
  Warp& warp = this_warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.lanes[lane_id()] = bits;
  warp.barrier.arrive_and_wait(0);
  const uint64_t source_bits = warp.lanes[source_lane(lane_id())];
  warp.barrier.arrive_and_wait(0);  // no lane overwrites its word before all have read
  T out;
  std::memcpy(&out, &source_bits, sizeof(T));
  return out;
}

// Runs one block: every thread from the start of the kernel to its return.
inline void run_block(Launch& launch, std::mt19937& shuffle) {
  launch.barrier.reset(static_cast<int>(launch.threads));
  for (Warp& warp : launch.warps) warp.barrier.reset(kWarpLanes);
  // Shared memory starts as garbage on the device; a poison byte here.
  std::fill(launch.dynamic_shared.begin(), launch.dynamic_shared.end(), 0xAB);
  for (unsigned t = 0; t < launch.threads; ++t) {
    launch.finished[t] = false;
    getcontext(&launch.fibers[t]);
    launch.fibers[t].uc_stack.ss_sp = launch.stacks[t].data();
    launch.fibers[t].uc_stack.ss_size = launch.stacks[t].size();
    launch.fibers[t].uc_link = &launch.scheduler;
    makecontext(&launch.fibers[t], &fiber_main, 0);
  }
  std::vector<unsigned> order(launch.threads);
  std::iota(order.begin(), order.end(), 0u);
  unsigned remaining = launch.threads;
  while (remaining > 0) {
    const uint64_t progress_before = launch.progress;
    std::shuffle(order.begin(), order.end(), shuffle);
    for (unsigned t : order) {
      if (launch.finished[t]) continue;
      launch.current = t;
      threadIdx = {t, 0, 0};
      swapcontext(&launch.scheduler, &launch.fibers[t]);
      if (launch.finished[t]) --remaining;
    }
    if (remaining > 0 && launch.progress == progress_before) {
      throw std::runtime_error("emulated kernel deadlock: the running threads of block " +
                               std::to_string(blockIdx.x) + " wait at barriers that never fill");
    }
  }
}

// Runs kernel(args...) on a grid of `grid` blocks of `threads` threads.
template <typename... Params, typename... Args>
void launch(unsigned grid, unsigned threads, size_t dynamic_shared_bytes,
            void (*kernel)(Params...), Args... args) {
  if (grid == 0 || threads == 0 || threads % kWarpLanes != 0 || threads > 1024) {
    throw std::invalid_argument(
        "emulated launch: grid and block must be > 0, the block a multiple of 32 up to 1024");
  }
  Launch launch;
  launch.kernel = [kernel, args...] { kernel(args...); };
  launch.threads = threads;
  launch.warps = std::vector<Warp>(threads / kWarpLanes);
  launch.dynamic_shared.resize(dynamic_shared_bytes);
  launch.fibers.resize(threads);
  launch.stacks.assign(threads, std::vector<char>(kFiberStackBytes));
  launch.finished.assign(threads, false);
  blockDim = {threads, 1, 1};
  std::mt19937 shuffle(12345);
  active_launch() = &launch;
  try {
    for (unsigned b = 0; b < grid; ++b) {
      blockIdx = {b, 0, 0};
      run_block(launch, shuffle);
    }
  } catch (...) {
    active_launch() = nullptr;
    throw;
  }
  active_launch() = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::active_launch()->barrier.arrive_and_wait(0); }
inline int __syncthreads_count(int predicate) {
  return cuda_emulation::active_launch()->barrier.arrive_and_wait(predicate != 0);
}

// The kernels only use full-warp masks; the mask is not checked.
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  return cuda_emulation::exchange_in_warp(value, [lane_mask](int lane) { return lane ^ lane_mask; });
}
template <typename T>
T __shfl_up_sync(unsigned /*mask*/, T value, int delta) {
  return cuda_emulation::exchange_in_warp(
      value, [delta](int lane) { return lane >= delta ? lane - delta : lane; });
}
inline bool __any_sync(unsigned /*mask*/, bool predicate) {
  return cuda_emulation::this_warp().barrier.arrive_and_wait(predicate ? 1 : 0) > 0;
}

namespace ssd_post {
namespace gpu {
template <typename T>
T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(cuda_emulation::active_launch()->dynamic_shared.data());
}
}  // namespace gpu
}  // namespace ssd_post

// The one piece of CUB the kernels use, with CUB's contract: the temp storage may
// be reused only after a __syncthreads, so a kernel that forgets one reads
// overwritten inputs here as it would on the device.
namespace cub {
template <typename T, int kBlockThreads>
class BlockScan {
 public:
  struct TempStorage {
    T inputs[kBlockThreads];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    storage_.inputs[threadIdx.x] = input;
    __syncthreads();
    T before{}, total{};
    for (int i = 0; i < kBlockThreads; ++i) {
      if (i < static_cast<int>(threadIdx.x)) before += storage_.inputs[i];
      total += storage_.inputs[i];
    }
    output = before;
    block_aggregate = total;
  }

 private:
  TempStorage& storage_;
};
}  // namespace cub
