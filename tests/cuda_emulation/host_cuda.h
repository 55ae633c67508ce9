// host_cuda.h: the CUDA execution model on the CPU, so that CI machines without a GPU can run diffkern's
// kernels (csrc/) and compare them with the reference backend.
//
// tests/cuda_emulation/build.py compiles every csrc/*.cu as C++ with
//     g++ -std=c++20 -pthread -DDIFFKERN_HOST_EMULATION -include host_cuda.h -x c++ file.cu
// This header turns the CUDA dialect the kernels use into ordinary C++ and provides run_grid, the launcher of
// csrc/platform.cuh's emulated platform layer (see "Host emulation" there). Nothing else in csrc/ changes.
//
// What is emulated, and how:
//   - __global__, __device__, __host__, __forceinline__, __launch_bounds__: erased (plain inline functions).
//   - A launch: synchronous. The grid's blocks run one after another, each on one std::thread per CUDA thread,
//     all of a block's threads concurrently (threads are created once per launch and reused by every block).
//     Launches from several host threads run one at a time: the grid state (gridDim, blockDim, the running
//     block, static __shared__ storage) is process-wide, as one GPU's would be for one kernel at a time.
//   - threadIdx (per thread), blockIdx, blockDim, gridDim: as in CUDA.
//   - __syncthreads(): a barrier over the block's threads. A thread that returns from the kernel leaves every
//     barrier, as an exited thread stops counting on the hardware.
//   - __shfl_xor_sync, __shfl_down_sync (full width of 32): each lane publishes its value in its warp's slots
//     and waits at a barrier over the warp's 32 threads; then it reads its source lane. Lanes whose source is
//     outside the warp (shfl_down past lane 31) get their own value, as in CUDA.
//   - Dynamic shared memory: one 16-byte aligned buffer per launch, filled with 0xCD before each block, so a
//     read of bytes the block did not write yields garbage (and a wrong result) rather than a stale value.
//   - Static __shared__ variables: `static`, i.e. one instance shared by the block's threads (blocks never
//     overlap in time, so one instance serves every block).
//   - __uint_as_float / __float_as_uint; fp16/bf16 conversions come from the CUDA headers' host paths.
//   - Launch checks: a block must be whole warps (the shuffles need them; a restriction of the emulator, not
//     of CUDA) of at most 1024 threads; grid.x < 2^31, grid.y and grid.z <= 65535, every dimension >= 1;
//     dynamic shared memory at most the emulated device's opt-in limit. A refused launch runs nothing and is
//     reported through take_launch_error(), which platform.cuh's check_launch turns into a RuntimeError.
//
// Not emulated (bugs of these kinds can pass here; they need a GPU run, e.g. scripts/gpu_check.sh):
//   - Concurrency between blocks: blocks never overlap, so inter-block races and any reliance on block order
//     go unseen.
//   - The GPU memory model: threads share host memory with x86's strong ordering. Threads do run concurrently,
//     so a missing __syncthreads often gives wrong results here too, but not reliably.
//   - Lockstep warps: lanes meet only at shuffles. Code that assumes warp-synchronous execution without a
//     shuffle or barrier is not checked, shuffle masks are ignored (full warps assumed), and a shuffle reached
//     by only part of a warp deadlocks (the test's timeout reports it) instead of returning garbage.
//   - Poisoning of static __shared__ variables: they keep the previous block's values.
//   - Device arithmetic: host libm (expf, sqrtf) and no fused multiply-add contraction, so results may differ
//     from the GPU's in the last bits; the comparisons use the project's tolerance table, not bitwise equality.
//   - Out-of-bounds accesses: they touch host memory (crash or silent) rather than fault.
//   - Streams, asynchrony, CUDA graphs, occupancy, registers, timing: nothing of these.
//
// Launch recording (scripts/kernel_report.py): with DIFFKERN_EMU_LAUNCH_LOG=<file>, a launch runs nothing; it
// appends one line to <file> (name, the kernel function's offset in its shared object, grid, block, dynamic
// shared memory) and is checked as above. The ops' host code (checks, planner, allocations, grid) runs as it
// would before a real launch, so the report sees the real grids at full-size shapes without computing anything
// (outputs are garbage then).
#pragma once
#define DIFFKERN_HOST_CUDA_H 1

// The CUDA headers' host paths: dim3, uint3, uint4, float2, make_*, __half, __nv_bfloat16 and conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <dlfcn.h>

#include <barrier>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// The CUDA headers define these as attributes g++ does not know; the emulated kernels are plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline thread_local uint3 threadIdx;

namespace diffkern_emu {

constexpr int kWarpSize = 32;

struct Warp {
  std::barrier<> meet{kWarpSize};
  uint64_t slot[kWarpSize];
};

// The barriers of the running block (rebuilt for each block: threads that exit drop out of them).
struct Block {
  explicit Block(int threads) : sync(threads) {
    for (int w = 0; w < threads / kWarpSize; ++w) warps.push_back(std::make_unique<Warp>());
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* running_block = nullptr;
inline unsigned char* running_smem = nullptr;
inline thread_local int linear_tid = 0;                 // threadIdx, linearised
inline thread_local const char* launch_error = nullptr;  // of the host thread that launched

inline unsigned char* dynamic_shared_memory() { return running_smem; }

// The error of the last refused launch on this host thread, cleared (like cudaGetLastError), or nullptr.
inline const char* take_launch_error() {
  const char* err = launch_error;
  launch_error = nullptr;
  return err;
}

inline int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

inline const char* launch_config_error(dim3 grid, dim3 block, size_t smem_bytes, size_t smem_limit) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) return "invalid configuration: a block has 1 to 1024 threads";
  if (threads % kWarpSize != 0) return "invalid configuration: the emulator needs whole warps (32 threads)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "invalid configuration: empty grid";
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) {
    return "invalid configuration: grid dimensions beyond (2^31 - 1, 65535, 65535)";
  }
  if (smem_bytes > smem_limit) return "too much dynamic shared memory for the device";
  return nullptr;
}

// Launch recording (see the header comment): true when DIFFKERN_EMU_LAUNCH_LOG is set, the launch then recorded
// (and its configuration checked) instead of run.
inline bool record_launch(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                          size_t smem_limit) {
  const char* path = std::getenv("DIFFKERN_EMU_LAUNCH_LOG");
  if (path == nullptr || *path == '\0') return false;
  static std::mutex log_lock;
  const std::lock_guard<std::mutex> lock(log_lock);
  Dl_info info{};
  const uintptr_t base = dladdr(kernel, &info) != 0 ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\t%#zx\t%u,%u,%u\t%u,%u,%u\t%zu\n", kernel_name,
                 static_cast<size_t>(reinterpret_cast<uintptr_t>(kernel) - base), grid.x, grid.y, grid.z, block.x,
                 block.y, block.z, smem_bytes);
    std::fclose(f);
  }
  launch_error = launch_config_error(grid, block, smem_bytes, smem_limit);
  return true;
}

// Held by each run_grid: one grid at a time in the process. At namespace scope, not a static of run_grid, which
// would be one mutex per instantiation (per kernel).
inline std::mutex one_grid_at_a_time;

// Runs body() (one thread's kernel call) for every thread of every block of the grid; returns when all are done.
template <typename Body>
inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, size_t smem_limit, const Body& body) {
  if (const char* err = launch_config_error(grid, block, smem_bytes, smem_limit)) {
    launch_error = err;
    return;
  }
  const std::lock_guard<std::mutex> lock(one_grid_at_a_time);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<unsigned char> smem(smem_bytes + 16);
  unsigned char* smem_base = smem.data() + ((16 - (reinterpret_cast<uintptr_t>(smem.data()) & 15u)) & 15u);
  std::unique_ptr<Block> state;
  uint64_t next = 0;

  // Sets up block `next`; runs while every thread is parked between blocks (or before any has started).
  auto start_block = [&]() noexcept {
    if (next == blocks) return;
    blockIdx = make_uint3(static_cast<unsigned>(next % grid.x), static_cast<unsigned>((next / grid.x) % grid.y),
                          static_cast<unsigned>(next / (static_cast<uint64_t>(grid.x) * grid.y)));
    std::memset(smem.data(), 0xCD, smem.size());
    state = std::make_unique<Block>(threads);
    running_block = state.get();
    running_smem = smem_base;
    ++next;
  };
  gridDim = grid;
  blockDim = block;
  start_block();
  std::barrier between_blocks(threads, start_block);

  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      linear_tid = t;
      threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (uint64_t b = 0; b < blocks; ++b) {
        body();
        running_block->warps[t / kWarpSize]->meet.arrive_and_drop();
        running_block->sync.arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (std::thread& th : pool) th.join();
  running_block = nullptr;
  running_smem = nullptr;
}

// One shuffle of a warp: every lane publishes `value`, then reads lane src_lane(lane)'s.
template <typename T, typename SrcLane>
inline T shuffle(T value, SrcLane src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffled type");
  Warp& warp = *running_block->warps[linear_tid / kWarpSize];
  const int lane = linear_tid % kWarpSize;
  std::memcpy(&warp.slot[lane], &value, sizeof(T));
  warp.meet.arrive_and_wait();  // every lane has published
  T out;
  std::memcpy(&out, &warp.slot[src_lane(lane)], sizeof(T));
  warp.meet.arrive_and_wait();  // every lane has read: the slots may be reused
  return out;
}

}  // namespace diffkern_emu

inline void __syncthreads() { diffkern_emu::running_block->sync.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  return diffkern_emu::shuffle(value, [&](int lane) { return (lane ^ lane_mask) & (diffkern_emu::kWarpSize - 1); });
}

template <typename T>
inline T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta) {
  return diffkern_emu::shuffle(value, [&](int lane) {
    const int src = lane + static_cast<int>(delta);
    return src < diffkern_emu::kWarpSize ? src : lane;
  });
}

inline float __uint_as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t __float_as_uint(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}
