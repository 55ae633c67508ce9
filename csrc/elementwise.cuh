// The per-sample elementwise engine that add_noise, the DDIM step and the DDPM step are built on.
#pragma once

#include <cstdint>

#include "platform.cuh"
#include "vector_io.cuh"

namespace diffkern {

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

}  // namespace diffkern
