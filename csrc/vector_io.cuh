// Element types and 16-byte vector access for float/half/bfloat16 (device): conversions to and from
// float, scalar and vector loads and stores.
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace diffkern {

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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

// A 16-byte store to global memory as one instruction (st.global.v4.u32: STG.E.128 in SASS). nvcc 13 splits
// store_raw16's plain uint4 store into four 32-bit stores (STG.E x4) in the elementwise engine's loop, which
// scripts/kernel_report.py's contract rejects (__stwb would give STG.E.128.STRONG.SM). The host emulation stores
// plainly.
__device__ __forceinline__ void store_global16(void* p, const uint4& v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

// Loads kVec<T> elements from a 16-byte aligned address as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kVec<T>]) {
  unpack_vec<T>(load_raw16(p), f);
}

// Stores kVec<T> floats to a 16-byte aligned address of global memory.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[kVec<T>]) {
  store_global16(p, pack_vec<T>(f));
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

}  // namespace diffkern
