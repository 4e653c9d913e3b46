// CUDA kernel of pgd_step_: linf in one vectorised pass (each op rounded to the image dtype as
// torch's eager sequence), l2 with one block per sample and block reductions.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace gacd_fast {
namespace cuda {
namespace {

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
__global__ void pgd_step_linf_kernel(T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ xn,
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
__global__ void pgd_step_l2_kernel(T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ xn,
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
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(packs, kBlockThreads), 65535 * 8));
      if (vec)
        pgd_step_linf_kernel<T, V><<<blocks, kBlockThreads, 0, stream>>>(x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(),
                                                              ap, static_cast<A>(alpha), ep, static_cast<T>(eps), lo,
                                                              hi, N, packs);
      else
        pgd_step_linf_kernel<T, 1><<<blocks, kBlockThreads, 0, stream>>>(x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(),
                                                              ap, static_cast<A>(alpha), ep, static_cast<T>(eps), lo,
                                                              hi, N, packs);
    } else {
      const A* ap = a.defined() ? a.data_ptr<A>() : nullptr;
      const A* ep = e.defined() ? e.data_ptr<A>() : nullptr;
      pgd_step_l2_kernel<T><<<static_cast<unsigned>(B), kBlockThreads, 0, stream>>>(
          x_adv.data_ptr<T>(), g.data_ptr<T>(), xn.data_ptr<T>(), ap, static_cast<A>(alpha), ep, static_cast<A>(eps), lo,
          hi, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CUDA, m) { m.impl("pgd_step_", &gacd_fast::cuda::pgd_step_cuda); }
