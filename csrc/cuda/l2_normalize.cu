// CUDA kernels of l2_normalize, forward and backward: one warp per row, warp reductions;
// float32/half/bfloat16 inputs accumulate in float32.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace gacd_fast {
namespace cuda {
namespace {

template <typename T>
__global__ void l2_normalize_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t N, int64_t D) {
  using A = acc_of<T>;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;  // whole warps leave together
  const T* xr = x + row * D;
  A ss = 0;
  for (int64_t d = lane; d < D; d += kWarp) ss += static_cast<A>(xr[d]) * static_cast<A>(xr[d]);
  const A denom = dmax(warp_row_norm(warp_sum(ss), xr, D, lane), static_cast<A>(kNormEps));
  for (int64_t d = lane; d < D; d += kWarp) out[row * D + d] = static_cast<T>(static_cast<A>(xr[d]) / denom);
}

template <typename T>
__global__ void l2_normalize_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out,
                                          int64_t N, int64_t D) {
  using A = acc_of<T>;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const T* xr = x + row * D;
  const T* gr = g + row * D;
  A ss = 0, xg = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const A xv = static_cast<A>(xr[d]);
    ss += xv * xv;
    xg += xv * static_cast<A>(gr[d]);
  }
  xg = warp_sum(xg);
  const A n = warp_row_norm(warp_sum(ss), xr, D, lane);
  const A inv = inv_of_norm(n);
  const A c = n >= static_cast<A>(kNormEps) ? xg * inv * inv : A(0);
  for (int64_t d = lane; d < D; d += kWarp)
    out[row * D + d] = static_cast<T>(inv * (static_cast<A>(gr[d]) - static_cast<A>(xr[d]) * c));
}

at::Tensor l2_normalize_cuda(const at::Tensor& x_in) {
  check_rows("x", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize_cuda", [&] {
    l2_normalize_fwd_kernel<scalar_t><<<warp_rows_grid(N, kBlockThreads), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor l2_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in) {
  check_rows("x", x_in);
  check_grad_like("l2_normalize_backward", grad, x_in.sizes(), x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize_backward_cuda", [&] {
    l2_normalize_bwd_kernel<scalar_t><<<warp_rows_grid(N, kBlockThreads), kBlockThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CUDA, m) {
  m.impl("l2_normalize", &gacd_fast::cuda::l2_normalize_cuda);
  m.impl("l2_normalize_backward", &gacd_fast::cuda::l2_normalize_backward_cuda);
}
