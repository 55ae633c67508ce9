// Shared infrastructure of the diffkern CUDA kernels: the platform layer (stream, device guard, launch and
// error checks, device properties), tensor checks written against torch's stable ABI only, 16-byte vector
// loads/stores for float/half/bfloat16, warp reductions and the per-sample elementwise engine that
// add_noise, the DDIM step and the DDPM step are built on.
//
// Nothing here includes ATen/c10 CUDA headers: the extension must build against any torch wheel, the CPU
// one included, and load into it (its ops then register but are never dispatched to).
//
// Host emulation (DIFFKERN_HOST_EMULATION, never defined by the real build): CI machines have no GPU, so to
// test the kernels' logic there (indexing, vector/scalar paths, shared-memory carving, warp reductions,
// regime choice), tests/cuda_emulation compiles these same sources with a host C++ compiler, force-including
// tests/cuda_emulation/host_cuda.h, which runs each CUDA thread as a CPU thread. Only the platform layer
// differs under the macro (marked "Host emulation" below): stream, device guard, launch and its check, device
// properties, the dynamic shared memory accessor, the device check of input tensors (CPU tensors stand in for
// CUDA ones) and the dispatch key the kernels register under. Every kernel and host function is shared.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

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

// ======================================================================================================
// Platform: stream, device guard, launches and errors (host only).
// ======================================================================================================

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
  diffkern_emu::run_grid(grid, block, smem_bytes, static_cast<size_t>(device_props(-1).max_smem_optin),
                         [&] { kernel(args...); });
  check_launch(kernel_name);
}

#endif  // DIFFKERN_HOST_EMULATION

// ======================================================================================================
// Tensor checks and allocation (host only, stable ABI).
// ======================================================================================================

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    default: return "an unsupported dtype";
  }
}

inline void check_cuda_tensor(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.defined(), "diffkern: ", name, " must be a defined tensor");
#ifndef DIFFKERN_HOST_EMULATION
  STD_TORCH_CHECK(t.is_cuda(), "diffkern: ", name, " must be a CUDA tensor (the cuda backend runs on CUDA tensors)");
#else
  // Host emulation: the kernels read and write host memory, so CPU tensors stand in for CUDA tensors.
  STD_TORCH_CHECK(t.is_cpu(), "diffkern: ", name, " must be a CPU tensor (host emulation of the cuda backend)");
#endif
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_cuda_tensor(t, name);
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), "diffkern: ", name, " is on cuda:",
                  t.get_device_index(), " but ", ref_name, " is on cuda:", ref.get_device_index());
}

inline void check_dtype(const Tensor& t, const char* name, ScalarType expected) {
  STD_TORCH_CHECK(t.scalar_type() == expected, "diffkern: ", name, " must be ", dtype_name(expected), ", got ",
                  dtype_name(t.scalar_type()));
}

inline void check_sample_dtype(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Half || s == ScalarType::BFloat16, "diffkern: ", name,
                  " must be float32, float16 or bfloat16 for the cuda backend (float64 runs on the reference), got ",
                  dtype_name(s));
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

// Strides equal in every dimension of size > 1 (a size-1 dimension's stride is never used).
inline bool same_strides(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && b.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Dense and non-overlapping with the batch dimension outermost: each of the size(0) samples is one
// contiguous run of numel / size(0) elements (NCHW, channels_last and channels_last_3d all qualify).
inline bool is_batch_outer_dense(const Tensor& t) {
  const int64_t nd = t.dim();
  if (nd == 0 || t.numel() == 0) return true;
  // Dimensions 1.. must tile one sample exactly: visit them from the smallest stride up.
  int64_t order[16];
  int64_t count = 0;
  STD_TORCH_CHECK(nd <= 16, "diffkern: tensors of more than 16 dimensions are not supported");
  for (int64_t d = 1; d < nd; ++d) {
    if (t.size(d) != 1) order[count++] = d;
  }
  for (int64_t i = 1; i < count; ++i) {  // insertion sort by stride (tiny)
    const int64_t d = order[i];
    int64_t j = i;
    while (j > 0 && t.stride(order[j - 1]) > t.stride(d)) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = d;
  }
  int64_t expected = 1;
  for (int64_t i = 0; i < count; ++i) {
    if (t.stride(order[i]) != expected) return false;
    expected *= t.size(order[i]);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

inline void check_timesteps(const Tensor& ts, const char* name, const Tensor& ref, int64_t batch) {
  check_same_device(ts, name, ref, "sample");
  check_dtype(ts, name, ScalarType::Long);
  STD_TORCH_CHECK(ts.dim() == 1 && (ts.numel() == 1 || ts.numel() == batch) && ts.is_contiguous(), "diffkern: ",
                  name, " must be a contiguous int64 tensor of shape [1] or [", batch, "]");
}

inline void check_table(const Tensor& table, const Tensor& ref) {
  check_same_device(table, "alphas_cumprod", ref, "sample");
  check_dtype(table, "alphas_cumprod", ScalarType::Float);
  STD_TORCH_CHECK(table.dim() == 1 && table.numel() > 0 && table.is_contiguous(),
                  "diffkern: alphas_cumprod must be a contiguous, non-empty float32 [T] tensor");
}

// An uninitialised tensor with `like`'s sizes and strides (so NCHW stays NCHW and channels_last stays
// channels_last) and the given dtype, on `like`'s device.
inline Tensor empty_strided_like(const Tensor& like, ScalarType dtype) {
  const auto sizes = like.sizes();
  const auto strides = like.strides();
  int32_t device_type = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(like.get(), &device_type) == AOTI_TORCH_SUCCESS,
                  "diffkern: could not read a tensor's device type");
  int32_t dtype_code = aoti_torch_dtype_float32();
  switch (dtype) {
    case ScalarType::Float: dtype_code = aoti_torch_dtype_float32(); break;
    case ScalarType::Half: dtype_code = aoti_torch_dtype_float16(); break;
    case ScalarType::BFloat16: dtype_code = aoti_torch_dtype_bfloat16(); break;
    default: STD_TORCH_CHECK(false, "diffkern: empty_strided_like: unsupported dtype");
  }
  AtenTensorHandle handle = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(like.dim(), sizes.data(), strides.data(), dtype_code, device_type,
                                           like.get_device_index(), &handle) == AOTI_TORCH_SUCCESS,
                  "diffkern: allocating an output tensor failed");
  return Tensor(handle);
}

// A contiguous float32 tensor of the given sizes on `like`'s device (scratch buffers, statistics).
inline Tensor empty_float(const Tensor& like, std::initializer_list<int64_t> sizes) {
  const std::vector<int64_t> shape(sizes);
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(shape.data(), shape.size()),
                                  ScalarType::Float);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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

// ======================================================================================================
// Element types and 16-byte vector access (device).
// ======================================================================================================

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

// The 16-bit types also name their plain-bits struct (Raw), through which they are packed into words.
template <>
struct Elem<__half> {
  using Raw = __half_raw;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Raw = __nv_bfloat16_raw;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// A 16-bit element held in the low 16 bits of a word <-> float.
template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t b) {
  typename Elem<T>::Raw raw;
  raw.x = static_cast<unsigned short>(b);
  return Elem<T>::to_float(T(raw));
}

template <typename T>
__device__ __forceinline__ uint32_t float_to_bits(float v) {
  const typename Elem<T>::Raw raw = Elem<T>::from_float(v);
  return static_cast<uint32_t>(raw.x);
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

template <typename T>
__device__ __forceinline__ float load_scalar(const T* p) {
  return Elem<T>::to_float(*p);
}

template <typename T>
__device__ __forceinline__ void store_scalar(T* p, float v) {
  *p = Elem<T>::from_float(v);
}

// 16 bytes of T elements <-> kVec<T> floats (rounding to nearest even on the way back).
template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float (&f)[kVec<T>]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = bits_to_float<T>(w[i] & 0xffffu);
      f[2 * i + 1] = bits_to_float<T>(w[i] >> 16);
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float (&f)[kVec<T>]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(f[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits<T>(f[2 * i]) | (float_to_bits<T>(f[2 * i + 1]) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint4 load_raw16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ void store_raw16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// Loads kVec<T> elements from a 16-byte aligned address as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kVec<T>]) {
  unpack_vec<T>(load_raw16(p), f);
}

// Stores kVec<T> floats to a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[kVec<T>]) {
  store_raw16(p, pack_vec<T>(f));
}

// Stores W floats (a multiple of kVec<TO>) to a 16-byte aligned address of TO elements.
template <typename TO, int W>
__device__ __forceinline__ void store_floats(TO* p, const float (&f)[W]) {
  static_assert(W % kVec<TO> == 0, "store width must be a whole number of 16-byte vectors");
#pragma unroll
  for (int j = 0; j < W; j += kVec<TO>) {
    float part[kVec<TO>];
#pragma unroll
    for (int i = 0; i < kVec<TO>; ++i) part[i] = f[j + i];
    store_vec<TO>(p + j, part);
  }
}

// ======================================================================================================
// Small device math.
// ======================================================================================================

// clamp that propagates NaN like torch.clamp (fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ __forceinline__ float silu_f(float z) { return z / (1.0f + expf(-z)); }

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the `width` lanes of a team (width a power of two dividing 32, teams aligned in the warp).
// Every lane of the warp must call it. The butterfly leaves the identical sum on every lane of a team.
__device__ __forceinline__ float team_sum(float v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return team_sum(v, 32); }

// Count, mean and sum of squared deviations of a set of values; merged with Chan et al.'s formula.
struct Moments {
  float n;
  float mean;
  float m2;
};

__device__ __forceinline__ Moments merge_moments(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return Moments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Merges the moments of the 32 lanes in a fixed tree order; the result is valid on lane 0 (deterministic).
__device__ __forceinline__ Moments warp_merge_moments(Moments m) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments other;
    other.n = __shfl_down_sync(kFullMask, m.n, offset);
    other.mean = __shfl_down_sync(kFullMask, m.mean, offset);
    other.m2 = __shfl_down_sync(kFullMask, m.m2, offset);
    m = merge_moments(m, other);
  }
  return m;
}

// ======================================================================================================
// Per-sample timestep coefficients (device).
// ======================================================================================================

// abar at timesteps[b] (a [1] tensor is shared by the batch), the index clamped into the table.
__device__ __forceinline__ float gather_abar(const float* table, int64_t table_len, const int64_t* ts,
                                             int64_t ts_numel, int64_t b) {
  int64_t t = ts[ts_numel == 1 ? 0 : b];
  t = t < 0 ? 0 : (t >= table_len ? table_len - 1 : t);
  return table[t];
}

__device__ __forceinline__ int64_t timestep_of(const int64_t* ts, int64_t ts_numel, int64_t b) {
  return ts[ts_numel == 1 ? 0 : b];
}

// Prediction types, as the int codes of the ops' schemas.
enum PredictionType : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// What happens to x0 before it is used: nothing, clip to +-range, or dynamic thresholding with a
// precomputed per-sample scale s (clamp to +-s, then divide by s).
enum ClipMode : int { kNoClip = 0, kClip = 1, kThreshold = 2 };

// x0 and eps from the model output m and the sample x, in diffusers' operation order
// (sqrt_a = sqrt(abar_t), sqrt_b = sqrt(1 - abar_t)).
__device__ __forceinline__ void predict_x0_eps(int prediction_type, float x, float m, float sqrt_a, float sqrt_b,
                                               float& x0, float& eps) {
  if (prediction_type == kEpsilon) {
    x0 = (x - sqrt_b * m) / sqrt_a;
    eps = m;
  } else if (prediction_type == kSample) {
    x0 = m;
    eps = (x - sqrt_a * x0) / sqrt_b;
  } else {  // v-prediction
    x0 = sqrt_a * x - sqrt_b * m;
    eps = sqrt_a * m + sqrt_b * x;
  }
}

__device__ __forceinline__ float clip_x0(int clip_mode, float x0, float clip_range, float threshold) {
  if (clip_mode == kClip) return clamp_nan(x0, -clip_range, clip_range);
  if (clip_mode == kThreshold) return clamp_nan(x0, -threshold, threshold) / threshold;
  return x0;
}

// ======================================================================================================
// The per-sample elementwise engine.
//
// B samples of n elements each; stream k of sample b starts at ptr[k] + b * bstride[k]. A block works on
// one sample at a time (blockIdx.y, striding by gridDim.y), so the per-sample coefficients are computed once
// per block from the table; the elements of the sample are split over blockIdx.x.
//
// Vector path: when every stream of the sample reaches a 16-byte boundary after the same number of
// elements (`head` < kVec), the first `head` and the last n - head mod kVec elements are scalar and the
// rest moves in 16-byte vectors. Otherwise (streams misaligned with each other) the sample is scalar.
// All index arithmetic is 64-bit.
// ======================================================================================================

constexpr int kMapThreads = 256;

template <typename T, int N>
struct InStreams {
  const T* ptr[N];
  int64_t bstride[N];
};

template <typename T, int N>
struct OutStreams {
  T* ptr[N];
  int64_t bstride[N];
};

// Op: `Coef coef(int64_t b) const` (per-sample constants) and
//     `void apply(const Coef&, const float (&in)[NI], float (&out)[NO]) const` (one element).
template <typename T, typename TO, int NI, int NO, typename Op>
__global__ void __launch_bounds__(kMapThreads)
    sample_map_kernel(InStreams<T, NI> in, OutStreams<TO, NO> out, int64_t n, int64_t batch, Op op) {
  constexpr int W = kVec<T>;
  static_assert(kVec<TO> <= W, "output vectors must not be wider than input vectors");
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const auto coef = op.coef(b);
    const T* ip[NI];
    TO* opp[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) ip[k] = in.ptr[k] + b * in.bstride[k];
#pragma unroll
    for (int k = 0; k < NO; ++k) opp[k] = out.ptr[k] + b * out.bstride[k];

    auto scalar_element = [&](int64_t i) {
      float a[NI];
      float r[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) a[k] = load_scalar(ip[k] + i);
      op.apply(coef, a, r);
#pragma unroll
      for (int k = 0; k < NO; ++k) store_scalar(opp[k] + i, r[k]);
    };

    const int64_t head =
        static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(ip[0]) & 15u)) & 15u) / sizeof(T));
    bool vec = head + W <= n;
#pragma unroll
    for (int k = 0; k < NI; ++k) vec = vec && aligned16(ip[k] + head);
#pragma unroll
    for (int k = 0; k < NO; ++k) vec = vec && aligned16(opp[k] + head);

    if (vec) {
      const int64_t nv = (n - head) / W;
      const int64_t tail = head + nv * W;
      if (blockIdx.x == 0) {
        const int64_t t = threadIdx.x;
        if (t < head) {
          scalar_element(t);
        } else if (t - head < n - tail) {
          scalar_element(tail + (t - head));
        }
      }
      for (int64_t v = tid; v < nv; v += nthreads) {
        const int64_t i = head + v * W;
        float a[NI][W];
#pragma unroll
        for (int k = 0; k < NI; ++k) load_vec<T>(ip[k] + i, a[k]);
        float r[NO][W];
#pragma unroll
        for (int e = 0; e < W; ++e) {
          float ae[NI];
          float re[NO];
#pragma unroll
          for (int k = 0; k < NI; ++k) ae[k] = a[k][e];
          op.apply(coef, ae, re);
#pragma unroll
          for (int k = 0; k < NO; ++k) r[k][e] = re[k];
        }
#pragma unroll
        for (int k = 0; k < NO; ++k) store_floats<TO, W>(opp[k] + i, r[k]);
      }
    } else {
      for (int64_t i = tid; i < n; i += nthreads) scalar_element(i);
    }
  }
}

// Launches the engine over `batch` samples of `n` elements on `stream`.
template <typename T, typename TO, int NI, int NO, typename Op>
inline void launch_sample_map(const char* name, const InStreams<T, NI>& in, const OutStreams<TO, NO>& out,
                              int64_t n, int64_t batch, const Op& op, cudaStream_t stream) {
  if (n == 0 || batch == 0) return;
  const int64_t vectors = (n + kVec<T> - 1) / kVec<T>;
  int64_t gx = (vectors + kMapThreads - 1) / kMapThreads;
  gx = gx < 1 ? 1 : (gx > 65535 ? 65535 : gx);  // the kernel strides over the rest
  const int64_t gy = batch > 65535 ? 65535 : batch;
  launch(name, sample_map_kernel<T, TO, NI, NO, Op>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
         dim3(kMapThreads), 0, stream, in, out, n, batch, op);
}

// Calls f(T{}) with T the CUDA element type of `dtype` (float32, float16, bfloat16).
template <typename F>
inline void dispatch_float_types(ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Half: f(__half{}); break;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default:
      STD_TORCH_CHECK(false, "diffkern: ", what, " supports float32, float16 and bfloat16 on the cuda backend, got ",
                      dtype_name(dtype));
  }
}

}  // namespace diffkern
