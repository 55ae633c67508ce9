// The platform layer of the diffkern CUDA kernels: the CUDA and stable-ABI headers, the dispatch key, and
// (host only) the current stream, device guard, launches and their error checks, device properties and the
// device check of input tensors; on the device, the dynamic shared memory accessor.
//
// Nothing here includes ATen/c10 CUDA headers: the extension must build against any torch wheel, the CPU
// one included, and load into it (its ops then register but are never dispatched to).
//
// Host emulation (DIFFKERN_HOST_EMULATION, never defined by the real build): CI machines have no GPU, so to
// test the kernels' logic there (indexing, vector/scalar paths, shared-memory carving, warp reductions,
// regime choice), tests/cuda_emulation compiles these same sources with a host C++ compiler, force-including
// tests/cuda_emulation/host_cuda.h, which runs each CUDA thread as a CPU thread. Only this file differs under
// the macro (marked "Host emulation" below): stream, device guard, launch and its check, device properties,
// the dynamic shared memory accessor, the device check of input tensors (CPU tensors stand in for CUDA ones)
// and the dispatch key the kernels register under. Every kernel and host function is shared.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

// The dispatch key of every STABLE_TORCH_LIBRARY_IMPL in csrc/: CUDA, or CPU for the host emulation (whose
// kernels run on CPU tensors).
#ifdef DIFFKERN_HOST_EMULATION
#ifndef DIFFKERN_HOST_CUDA_H
#error "DIFFKERN_HOST_EMULATION needs tests/cuda_emulation/host_cuda.h force-included (-include host_cuda.h)"
#endif
#define DIFFKERN_DISPATCH_KEY CPU
#else
#define DIFFKERN_DISPATCH_KEY CUDA
#endif

namespace diffkern {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Stream, device guard, launches and errors (host only).

struct DeviceProps {
  int sm_count;
  int max_smem_optin;  // bytes of dynamic shared memory one block may use after opting in
};

#ifndef DIFFKERN_HOST_EMULATION

// The current CUDA stream of `device_index`, as torch sees it (so work orders correctly with torch's own
// kernels, under torch.cuda.stream(...) and inside CUDA-graph capture).
//
// `aoti_torch_get_current_cuda_stream` is declared by the shim under USE_CUDA but defined in
// libtorch_cuda, which a CPU-only torch does not have. Linking against it would make the library fail to
// load there (Python's ctypes and torch.ops.load_library use RTLD_NOW), so the symbol is resolved on first
// use instead: from the global scope, else from an already-loaded libtorch_cuda. The library therefore
// loads into any torch; a CUDA op called without libtorch_cuda fails with a clear error (it cannot happen
// in practice: dispatch to the CUDA key needs CUDA tensors).
inline cudaStream_t current_stream(int32_t device_index) {
  using GetStreamFn = AOTITorchError (*)(int32_t, void**);
  static std::atomic<GetStreamFn> cached{nullptr};
  GetStreamFn fn = cached.load(std::memory_order_acquire);
  if (fn == nullptr) {
    void* sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    if (sym == nullptr) {
      void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
      if (lib != nullptr) {
        sym = dlsym(lib, "aoti_torch_get_current_cuda_stream");
        dlclose(lib);  // RTLD_NOLOAD took a reference of a library torch keeps loaded
      }
    }
    STD_TORCH_CHECK(sym != nullptr,
                    "diffkern: cannot find aoti_torch_get_current_cuda_stream (is this torch built with CUDA?)");
    fn = reinterpret_cast<GetStreamFn>(sym);
    cached.store(fn, std::memory_order_release);
  }
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "diffkern: could not get the current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

// Makes `device_index` current for the lifetime of the guard (torch's device guard, stable ABI).
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// Turns a failed launch (bad configuration, too much shared memory, no kernel image for the device) into
// a Python RuntimeError. Only cudaGetLastError: no synchronisation.
inline void check_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "diffkern: launching ", kernel_name, " failed: ", cudaGetErrorName(err),
                  ": ", cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "diffkern: ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

// kernel<<<grid, block, smem, stream>>>(args...) followed by the launch check. The one launch site.
template <typename... KernelArgs, typename... Args>
inline void launch(const char* kernel_name, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                   size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    // Above 48 KiB a kernel must opt in; the attribute is per function (cheap host call, no sync).
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  check_launch(kernel_name);
}

// Queried once per device (attribute queries do not synchronise).
inline DeviceProps device_props(int32_t device_index) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sm_count[kMaxDevices];
  static std::atomic<int> smem[kMaxDevices];
  STD_TORCH_CHECK(device_index >= 0 && device_index < kMaxDevices, "diffkern: unsupported CUDA device index ",
                  device_index);
  int sms = sm_count[device_index].load(std::memory_order_relaxed);
  int optin = smem[device_index].load(std::memory_order_relaxed);
  if (sms <= 0 || optin <= 0) {
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    sm_count[device_index].store(sms, std::memory_order_relaxed);
    smem[device_index].store(optin, std::memory_order_relaxed);
  }
  return DeviceProps{sms, optin};
}

#else  // DIFFKERN_HOST_EMULATION

// Host emulation: no streams, no devices, no CUDA runtime. A launch runs the whole grid on CPU threads before it
// returns (host_cuda.h's run_grid); a launch it refuses (block size, grid size, shared memory) is reported by
// check_launch like a failed CUDA launch.
inline cudaStream_t current_stream(int32_t /*device_index*/) { return nullptr; }

struct DeviceGuard {
  explicit DeviceGuard(int32_t /*device_index*/) {}
};

inline void check_launch(const char* kernel_name) {
  const char* err = diffkern_emu::take_launch_error();
  STD_TORCH_CHECK(err == nullptr, "diffkern: launching ", kernel_name, " failed (host emulation): ", err);
}

// The emulated device: DIFFKERN_EMU_SM_COUNT multiprocessors (default 4, so that small test shapes reach every
// GroupNorm regime) and DIFFKERN_EMU_SMEM_OPTIN bytes of opt-in shared memory per block (default 227 KiB, an
// H100's). Read at every call, so a test can change them between calls.
inline DeviceProps device_props(int32_t /*device_index*/) {
  return DeviceProps{diffkern_emu::env_int("DIFFKERN_EMU_SM_COUNT", 4),
                     diffkern_emu::env_int("DIFFKERN_EMU_SMEM_OPTIN", 227 * 1024)};
}

template <typename... KernelArgs, typename... Args>
inline void launch(const char* kernel_name, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                   size_t smem_bytes, cudaStream_t /*stream*/, Args&&... args) {
  // Every emulated thread calls the kernel with the arguments as given: the same implicit conversions to the
  // parameter types as kernel<<<...>>>(args...), and each thread gets its own copies of the parameters.
  const size_t smem_limit = static_cast<size_t>(device_props(-1).max_smem_optin);
  if (diffkern_emu::record_launch(kernel_name, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
                                  smem_limit)) {
    check_launch(kernel_name);
    return;
  }
  diffkern_emu::run_grid(grid, block, smem_bytes, smem_limit, [&] { kernel(args...); });
  check_launch(kernel_name);
}

#endif  // DIFFKERN_HOST_EMULATION

// The device check of every input tensor (host only).
inline void check_cuda_tensor(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.defined(), "diffkern: ", name, " must be a defined tensor");
#ifndef DIFFKERN_HOST_EMULATION
  STD_TORCH_CHECK(t.is_cuda(), "diffkern: ", name, " must be a CUDA tensor (the cuda backend runs on CUDA tensors)");
#else
  // Host emulation: the kernels read and write host memory, so CPU tensors stand in for CUDA tensors.
  STD_TORCH_CHECK(t.is_cpu(), "diffkern: ", name, " must be a CPU tensor (host emulation of the cuda backend)");
#endif
}

// The block's dynamic shared memory (the byte count given at launch), 16-byte aligned.
#ifndef DIFFKERN_HOST_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char diffkern_dynamic_smem[];
  return diffkern_dynamic_smem;
}
#else
// Host emulation: the launch's buffer for the running block, refilled with 0xCD before each block.
inline unsigned char* dynamic_smem() { return diffkern_emu::dynamic_shared_memory(); }
#endif

}  // namespace diffkern
