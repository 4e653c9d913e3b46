// Device helpers shared by the CUDA kernels: accumulation types, warp/block reductions, math
// overloads for float/double, and launch helpers. Only light headers (no cuBLAS), so the sources
// also compile against the headers a CPU build of torch ships.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>
#include <math.h>

#include "../common.h"

namespace gacd_fast {
namespace cuda {

// float32 accumulation for float/half/bfloat16, float64 for double.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

constexpr int kWarp = 32;
// Threads a block of the element- and row-wise kernels (pgd_step_, l2_normalize, cosine_similarity).
constexpr int kBlockThreads = 256;

template <typename A> __device__ __forceinline__ A neg_inf() { return static_cast<A>(-INFINITY); }

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// Correctly rounded single ops: never contracted into an FMA (pgd_step_ must match eager bitwise).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = dmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <typename A> __device__ A block_sum(A v) {
  __shared__ A part[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // part may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += part[w];  // fixed order: deterministic
  return total;
}

// Max over the block (NaN never wins: fmax), with block_sum's rules; every thread gets the result.
template <typename A> __device__ A block_max(A v) {
  __shared__ A part[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total = dmax(total, part[w]);
  return total;
}

// 1 / max(||x||, eps), from the squared norm.
template <typename A> __device__ __forceinline__ A inv_norm(A ss) {
  return A(1) / dmax(dsqrt(ss), static_cast<A>(kNormEps));
}

// 1 / max(n, eps), from the norm.
template <typename A> __device__ __forceinline__ A inv_of_norm(A n) { return A(1) / dmax(n, static_cast<A>(kNormEps)); }

// A row's L2 norm from its warp-summed squares ``ss`` in A, redone in double when those overflowed
// (a float row of norm above ~1.8e19), so every finite row up to FLT_MAX normalises like the
// reference's overflow-safe norm. ss is the same on every lane: the branch is warp-uniform.
template <typename T, typename A>
__device__ A warp_row_norm(A ss, const T* __restrict__ xr, int64_t D, int lane) {
  if (isfinite(ss)) return dsqrt(ss);
  double s = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const double v = static_cast<double>(static_cast<A>(xr[d]));
    s += v * v;
  }
  return static_cast<A>(sqrt(warp_sum(s)));
}

// The shift of torch.logsumexp: the running max, or 0 where it is infinite, so exp(x - shift) of an
// infinite score is inf or 0, never the NaN of inf - inf.
template <typename A> __device__ __forceinline__ A lse_shift(A m) { return isinf(m) ? A(0) : m; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count(const at::Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()));
  return n > 0 ? n : 1;
}

// Launch grid for one warp per row.
inline unsigned warp_rows_grid(int64_t rows, int threads) {
  return static_cast<unsigned>(ceil_div(rows * kWarp, threads));
}

}  // namespace cuda
}  // namespace gacd_fast
