// The guidance rescale's statistics (see guidance_rescale.cuh): q = std(cond) / std(guided) per sample of a
// guided model output, in one pass over both halves and a merge.
//
// cfg_moments_kernel reads both halves once: each block takes a chunk of one sample (16-byte vectors where both
// halves align), each thread merges the moments (count, mean, M2) of its vectors (Chan et al.), the block merges
// its threads' in a fixed order and writes the chunk's moments of cond and of the guided output.
// rescale_factor_kernel (one block per sample) merges the chunks' moments, again in a fixed order, into q.
#include "dtype_dispatch.cuh"
#include "guidance_rescale.cuh"
#include "reductions.cuh"
#include "tensor_checks.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

constexpr int kStatsThreads = 256;
constexpr int kStatsWarps = kStatsThreads / 32;
constexpr int64_t kStatsChunk = 4096;  // elements of one sample per block of the moments pass

// The moments of W values held by one thread: mean and M2 from the values themselves (two steps, in registers).
template <int W>
__device__ __forceinline__ Moments vector_moments(const float (&f)[W]) {
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < W; ++e) sum += f[e];
  const float mean = sum / static_cast<float>(W);
  float m2 = 0.0f;
#pragma unroll
  for (int e = 0; e < W; ++e) m2 += (f[e] - mean) * (f[e] - mean);
  return Moments{static_cast<float>(W), mean, m2};
}

// Merges two moments per thread over the block (warps by shuffles, then the warps in order on thread 0); the
// results are valid on thread 0. Every thread of the block must call it.
__device__ __forceinline__ void block_merge_moments(Moments& a, Moments& b) {
  __shared__ Moments warp_a[kStatsWarps];
  __shared__ Moments warp_b[kStatsWarps];
  a = warp_merge_moments(a);
  b = warp_merge_moments(b);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_a[warp] = a;
    warp_b[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kStatsWarps; ++w) {
      a = merge_moments(a, warp_a[w]);
      b = merge_moments(b, warp_b[w]);
    }
  }
  __syncthreads();  // the slots are free again for the block's next chunk
}

// partial[(b * chunks + k) * 2 + {0, 1}]: the moments of cond and of v = uncond + s (cond - uncond) over chunk k
// of the first n elements of sample b (model output samples of mo_n elements). Blocks stride over chunks (x) and
// samples (y).
template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    cfg_moments_kernel(const T* __restrict__ model_output, Moments* __restrict__ partial, int64_t n, int64_t mo_n,
                       int64_t batch, int64_t chunks, float guidance_scale) {
  constexpr int W = kVec<T>;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* uncond = model_output + b * mo_n;
    const T* cond = model_output + (batch + b) * mo_n;
    for (int64_t k = blockIdx.x; k < chunks; k += gridDim.x) {
      const int64_t begin = k * kStatsChunk;
      const int64_t end = begin + kStatsChunk < n ? begin + kStatsChunk : n;
      Moments mc{0.0f, 0.0f, 0.0f};
      Moments mv{0.0f, 0.0f, 0.0f};
      // Units of W consecutive elements, loaded as one 16-byte vector where both halves align and element by
      // element otherwise: the merge order is the same either way, so a sample's factor does not depend on where
      // it sits in memory (a batch equals its samples stepped alone, bit for bit).
      const bool vec = aligned16(uncond + begin) && aligned16(cond + begin);
      const int64_t units = (end - begin) / W;
      for (int64_t j = threadIdx.x; j < units; j += blockDim.x) {
        const int64_t i = begin + j * W;
        float u[W];
        float c[W];
        if (vec) {
          load_vec<T>(uncond + i, u);
          load_vec<T>(cond + i, c);
        } else {
#pragma unroll
          for (int e = 0; e < W; ++e) {
            u[e] = load_scalar(uncond + i + e);
            c[e] = load_scalar(cond + i + e);
          }
        }
        float v[W];
#pragma unroll
        for (int e = 0; e < W; ++e) v[e] = u[e] + guidance_scale * (c[e] - u[e]);
        mc = merge_moments(mc, vector_moments<W>(c));
        mv = merge_moments(mv, vector_moments<W>(v));
      }
      for (int64_t i = begin + units * W + threadIdx.x; i < end; i += blockDim.x) {
        const float u = load_scalar(uncond + i);
        const float c = load_scalar(cond + i);
        mc = merge_moments(mc, Moments{1.0f, c, 0.0f});
        mv = merge_moments(mv, Moments{1.0f, u + guidance_scale * (c - u), 0.0f});
      }
      block_merge_moments(mc, mv);
      if (threadIdx.x == 0) {
        partial[(b * chunks + k) * 2] = mc;
        partial[(b * chunks + k) * 2 + 1] = mv;
      }
    }
  }
}

// factor[b] = std(cond) / std(v) of sample b (unbiased: M2 / (n - 1)) from its chunks' moments.
__global__ void __launch_bounds__(kStatsThreads)
    rescale_factor_kernel(const Moments* __restrict__ partial, float* __restrict__ factor, int64_t batch,
                          int64_t chunks) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    Moments mc{0.0f, 0.0f, 0.0f};
    Moments mv{0.0f, 0.0f, 0.0f};
    for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
      mc = merge_moments(mc, partial[(b * chunks + k) * 2]);
      mv = merge_moments(mv, partial[(b * chunks + k) * 2 + 1]);
    }
    block_merge_moments(mc, mv);
    if (threadIdx.x == 0) factor[b] = sqrtf(mc.m2 / (mc.n - 1.0f)) / sqrtf(mv.m2 / (mv.n - 1.0f));
  }
}

}  // namespace

Tensor guidance_rescale_factor(const Tensor& model_output, const Tensor& sample, int64_t batch, int64_t n,
                               int64_t mo_n, float guidance_scale, cudaStream_t stream) {
  const int64_t chunks = (n + kStatsChunk - 1) / kStatsChunk;
  // Moments are 3 floats: 6 floats per chunk.
  Tensor partial = empty_float(sample, {batch * chunks * 6});
  Tensor factor = empty_float(sample, {batch});
  Moments* part = reinterpret_cast<Moments*>(partial.mutable_data_ptr());
  float* q = static_cast<float*>(factor.mutable_data_ptr());
  const unsigned gx = static_cast<unsigned>(chunks < 65535 ? chunks : 65535);
  const unsigned gy = static_cast<unsigned>(batch < 65535 ? batch : 65535);
  dispatch_float_types(sample.scalar_type(), "guidance rescale (moments)", [&](auto tag) {
    using T = decltype(tag);
    launch("guidance rescale (moments)", cfg_moments_kernel<T>, dim3(gx, gy), dim3(kStatsThreads), 0, stream,
           static_cast<const T*>(model_output.const_data_ptr()), part, n, mo_n, batch, chunks, guidance_scale);
  });
  launch("guidance rescale (factor)", rescale_factor_kernel, dim3(gy), dim3(kStatsThreads), 0, stream,
         static_cast<const Moments*>(part), q, batch, chunks);
  return factor;
}

}  // namespace diffkern
