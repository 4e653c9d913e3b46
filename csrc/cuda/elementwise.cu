// CUDA kernels of the element-wise and row-wise ops: pgd_step_ (linf: one vectorised pass;
// l2: one block per sample with block reductions), normalize and cosine_similarity (one warp per
// row, warp reductions), forward and backward. float32/half/bfloat16 inputs accumulate in float32.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace gacd_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// torch.clamp semantics (NaN passes through), compared in the op type.
template <typename T, typename O> __device__ __forceinline__ T clamp_to(T v, T lo, T hi) {
  const O x = static_cast<O>(v);
  return x < static_cast<O>(lo) ? lo : (x > static_cast<O>(hi) ? hi : v);
}

// One linf element, each op rounded to T like the eager sequence of torch ops.
template <typename T, typename O>
__device__ __forceinline__ T linf_elem(T x, T g, T xn, O a, T e, T lo, T hi) {
  const O gv = static_cast<O>(g);
  const O sgn = static_cast<O>((gv > O(0)) - (gv < O(0)));  // sign(0) = sign(nan) = 0, as torch.sign
  const T step = static_cast<T>(mul_rn(a, sgn));
  const T adv = static_cast<T>(add_rn(static_cast<O>(x), static_cast<O>(step)));
  T d = static_cast<T>(sub_rn(static_cast<O>(adv), static_cast<O>(xn)));
  d = clamp_to<T, O>(d, static_cast<T>(-static_cast<O>(e)), e);
  const T y = static_cast<T>(add_rn(static_cast<O>(xn), static_cast<O>(d)));
  return clamp_to<T, O>(y, lo, hi);
}

template <typename T, int V>
__global__ void pgd_linf_kernel(T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ xn,
                                const T* __restrict__ alpha_t, acc_of<T> alpha, const T* __restrict__ eps_t, T eps,
                                T lo, T hi, int64_t per_sample, int64_t packs) {
  using O = acc_of<T>;
  using P = Pack<T, V>;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = p * V;
    const int64_t b = j / per_sample;  // per_sample % V == 0: one sample per pack
    const O a = alpha_t ? static_cast<O>(alpha_t[b]) : alpha;
    const T e = eps_t ? eps_t[b] : eps;
    P xv = *reinterpret_cast<const P*>(x + j);
    const P gv = *reinterpret_cast<const P*>(g + j);
    const P nv = *reinterpret_cast<const P*>(xn + j);
#pragma unroll
    for (int v = 0; v < V; ++v) xv.v[v] = linf_elem<T, O>(xv.v[v], gv.v[v], nv.v[v], a, e, lo, hi);
    *reinterpret_cast<P*>(x + j) = xv;
  }
}

// The reference's l2_direction u before normalising: NaN -> 0; g / max|g|; with an inf max, +-1 on
// the inf elements and 0 elsewhere (the limit direction).
template <typename A> __device__ __forceinline__ A l2_scaled(A g, A gmax) {
  if (isnan(g) || !(gmax > A(0))) return A(0);
  if (isinf(gmax)) return isinf(g) ? (g > A(0) ? A(1) : A(-1)) : A(0);
  return g / gmax;
}

template <typename T>
__global__ void pgd_l2_kernel(T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ xn,
                              const acc_of<T>* __restrict__ alpha_t, acc_of<T> alpha,
                              const acc_of<T>* __restrict__ eps_t, acc_of<T> eps, T lo, T hi, int64_t N) {
  using A = acc_of<T>;
  const int64_t b = blockIdx.x;
  T* xb = x + b * N;
  const T* gb = g + b * N;
  const T* nb = xn + b * N;
  A mx = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) mx = dmax(mx, fabs(static_cast<A>(gb[j])));
  const A gmax = block_max(mx);
  A ss = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const A u = l2_scaled(static_cast<A>(gb[j]), gmax);
    ss += u * u;
  }
  const A un = dsqrt(block_sum(ss));
  const A a = alpha_t ? alpha_t[b] : alpha;
  const A e = eps_t ? eps_t[b] : eps;
  auto delta_at = [&](int64_t j) -> A {
    const A unit = un > A(0) ? l2_scaled(static_cast<A>(gb[j]), gmax) / un : A(0);
    return (static_cast<A>(xb[j]) + a * unit) - static_cast<A>(nb[j]);
  };
  A dd = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const A d = delta_at(j);
    dd += d * d;
  }
  const A dn = dsqrt(block_sum(dd));  // block_sum syncs: every read of x_adv is done before any write
  const A scale = dn > e ? e / dn : A(1);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const T dt = static_cast<T>(delta_at(j) * scale);
    const T y = static_cast<T>(static_cast<A>(nb[j]) + static_cast<A>(dt));
    xb[j] = clamp_to<T, A>(y, lo, hi);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                   const c10::optional<at::Tensor>& alpha_t, double alpha, const c10::optional<at::Tensor>& eps_t,
                   double eps, double clip_min, double clip_max, c10::string_view norm) {
  const bool linf = check_pgd_inputs(x_adv, grad, x_nat, alpha_t, eps_t, eps, clip_min, clip_max, std::string(norm));
  c10::cuda::CUDAGuard guard(x_adv.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad.contiguous(), xn = x_nat.contiguous();
  const auto pdtype = linf ? x_adv.scalar_type() : acc_type(x_adv.scalar_type());
  const at::Tensor a = has(alpha_t) ? alpha_t->to(pdtype).contiguous() : at::Tensor();
  const at::Tensor e = has(eps_t) ? eps_t->to(pdtype).contiguous() : at::Tensor();
  const int64_t B = x_adv.size(0), N = x_adv.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    const T lo = static_cast<T>(clip_min), hi = static_cast<T>(clip_max);
    if (linf) {
      const T* ap = a.defined() ? a.data_ptr<T>() : nullptr;
      const T* ep = e.defined() ? e.data_ptr<T>() : nullptr;
      constexpr int V = 16 / sizeof(T);
      const bool vec = N % V == 0 && aligned16(x_adv.data_ptr()) && aligned16(g.data_ptr()) && aligned16(xn.data_ptr());
      const int64_t packs = vec ? B * N / V : B * N;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(packs, kThreads), 65535 * 8));
      if (vec)
        pgd_linf_kernel<T, V><<<blocks, kThreads, 0, stream>>>(x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(),
                                                              ap, static_cast<A>(alpha), ep, static_cast<T>(eps), lo,
                                                              hi, N, packs);
      else
        pgd_linf_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(),
                                                              ap, static_cast<A>(alpha), ep, static_cast<T>(eps), lo,
                                                              hi, N, packs);
    } else {
      const A* ap = a.defined() ? a.data_ptr<A>() : nullptr;
      const A* ep = e.defined() ? e.data_ptr<A>() : nullptr;
      pgd_l2_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(), ap, static_cast<A>(alpha), ep, static_cast<A>(eps), lo,
          hi, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void normalize_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t N, int64_t D) {
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
__global__ void normalize_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out,
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

template <typename T>
__global__ void cosine_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_of<T>* __restrict__ out,
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

at::Tensor normalize_cuda(const at::Tensor& x_in) {
  check_rows("x", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_cuda", [&] {
    normalize_kernel<scalar_t><<<warp_rows_grid(N, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in) {
  check_rows("x", x_in);
  check_grad_like("normalize_backward", grad, x_in.sizes(), x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_backward_cuda", [&] {
    normalize_backward_kernel<scalar_t><<<warp_rows_grid(N, kThreads), kThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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
    cosine_kernel<scalar_t><<<warp_rows_grid(N, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
    cosine_kernel<scalar_t><<<warp_rows_grid(N, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
  m.impl("pgd_step_", &gacd_fast::cuda::pgd_step_cuda);
  m.impl("l2_normalize", &gacd_fast::cuda::normalize_cuda);
  m.impl("l2_normalize_backward", &gacd_fast::cuda::normalize_backward_cuda);
  m.impl("cosine_similarity", &gacd_fast::cuda::cosine_similarity_cuda);
  m.impl("cosine_similarity_backward", &gacd_fast::cuda::cosine_similarity_backward_cuda);
}
