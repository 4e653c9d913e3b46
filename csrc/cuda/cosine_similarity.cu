// CUDA kernel of cosine_similarity, forward and backward (one kernel: the backward recomputes the
// row's norms and dot): one warp per row, warp reductions; half inputs accumulate in float32.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace gacd_fast {
namespace cuda {
namespace {

template <typename T>
__global__ void cosine_similarity_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_of<T>* __restrict__ out,
                              const acc_of<T>* __restrict__ grad, T* __restrict__ da, T* __restrict__ db, int64_t N,
                              int64_t D) {
  using A = acc_of<T>;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const T* ar = a + row * D;
  const T* br = b + row * D;
  A aa = 0, bb = 0, ab = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const A x = static_cast<A>(ar[d]), y = static_cast<A>(br[d]);
    aa += x * x;
    bb += y * y;
    ab += x * y;
  }
  const A na = warp_row_norm(warp_sum(aa), ar, D, lane), nb = warp_row_norm(warp_sum(bb), br, D, lane);
  ab = warp_sum(ab);
  const A ia = inv_of_norm(na), ib = inv_of_norm(nb), cos = ab * ia * ib;
  if (out != nullptr) {
    if (lane == 0) out[row] = cos;
    return;
  }
  // backward: d cos / d a = ia (b_hat - [proj] a_hat cos), symmetrically for b
  const bool pa = na >= static_cast<A>(kNormEps), pb = nb >= static_cast<A>(kNormEps);
  const A gr = grad[row];
  for (int64_t d = lane; d < D; d += kWarp) {
    const A ah = static_cast<A>(ar[d]) * ia, bh = static_cast<A>(br[d]) * ib;
    da[row * D + d] = static_cast<T>(gr * ia * (bh - (pa ? ah * cos : A(0))));
    db[row * D + d] = static_cast<T>(gr * ib * (ah - (pb ? bh * cos : A(0))));
  }
}

at::Tensor cosine_similarity_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair("cosine_similarity", a_in, b_in);
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), D = a.size(1);
  at::Tensor out = at::empty({N}, a.options().dtype(acc_type(a.scalar_type())));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_cuda", [&] {
    using A = acc_of<scalar_t>;
    cosine_similarity_kernel<scalar_t><<<warp_rows_grid(N, kBlockThreads), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<A>(), nullptr, nullptr, nullptr, N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cuda(const at::Tensor& grad, const at::Tensor& a_in,
                                                                   const at::Tensor& b_in) {
  check_pair("cosine_similarity_backward", a_in, b_in);
  check_grad_like("cosine_similarity_backward", grad, {a_in.size(0)}, a_in);
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor g = grad.to(acc_type(a.scalar_type())).contiguous();
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  const int64_t N = a.size(0), D = a.size(1);
  if (N == 0) return {da, db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_backward_cuda", [&] {
    using A = acc_of<scalar_t>;
    cosine_similarity_kernel<scalar_t><<<warp_rows_grid(N, kBlockThreads), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), nullptr, g.data_ptr<A>(), da.data_ptr<scalar_t>(),
        db.data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, db};
}

}  // namespace
}  // namespace cuda
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CUDA, m) {
  m.impl("cosine_similarity", &gacd_fast::cuda::cosine_similarity_cuda);
  m.impl("cosine_similarity_backward", &gacd_fast::cuda::cosine_similarity_backward_cuda);
}
