// CUDA InfoNCE, forward and backward, both negative modes; never holds B x K (or B x M x D).
//
// Shared bank. Forward: a block owns 16 query rows and one split of the negatives (the split over
// the negatives keeps the GPU busy for small batches); it walks its split in tiles of 64 negatives,
// staging query and negative tiles through shared memory (32 dims at a time) to form the 16 x 64
// score tile, and keeps a running (online) max/sum per row with warp reductions. A combine kernel
// merges the splits' (max, sum) pairs and the positive logit, in a fixed order, into lse and loss.
// Backward: d q is row-owned (same tiling; each block writes only its rows of its split's partial
// sum, merged in fixed order later), d negatives is column-owned (a block owns 64 negatives and
// walks every query row). No atomics anywhere: results are deterministic.
// neg_index: one block per query row, its warps sharing the row's M negatives (gathered straight
// from the bank); d negatives is column-owned through a stable sort of neg_index.
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.cuh"

namespace gacd_fast {
namespace cuda {
namespace {

constexpr int TB = 16;        // query rows per tile
constexpr int TK = 64;        // negatives per tile
constexpr int TD = 32;        // dims staged per step
constexpr int kThreads = 256; // 8 warps; warp w owns tile rows 2w, 2w+1
constexpr int kIndexWarps = 8;

template <typename A> struct Tiles {
  A q[TB][TD + 1];  // +1: no shared-memory bank conflicts
  A n[TK][TD + 1];
  A s[TB][TK + 1];
};

// Score tile: s[r][c] = scale * inv_c * q_hat[r0 + r] . n[k0 + c] for rows < B and negatives < k_end
// (else -inf). Ends with a barrier; tile.s is then valid for every thread.
template <typename T, typename A>
__device__ void score_tile(Tiles<A>& tile, const A* __restrict__ qhat, const T* __restrict__ neg,
                           const A* __restrict__ ninv, int64_t B, int64_t k_end, int64_t D, int64_t r0, int64_t k0,
                           A scale) {
  const int t = threadIdx.x, r = t / 16, cg = t % 16;
  A acc[4] = {0, 0, 0, 0};
  for (int64_t d0 = 0; d0 < D; d0 += TD) {
    for (int e = t; e < TB * TD; e += kThreads) {
      const int rr = e / TD, dd = e % TD;
      const int64_t gr = r0 + rr, gd = d0 + dd;
      tile.q[rr][dd] = (gr < B && gd < D) ? qhat[gr * D + gd] : A(0);
    }
    for (int e = t; e < TK * TD; e += kThreads) {
      const int kk = e / TD, dd = e % TD;
      const int64_t gk = k0 + kk, gd = d0 + dd;
      tile.n[kk][dd] = (gk < k_end && gd < D) ? static_cast<A>(neg[gk * D + gd]) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < TD; ++dd) {
      const A qv = tile.q[r][dd];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += qv * tile.n[cg + 16 * j][dd];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = cg + 16 * j;
    const int64_t gk = k0 + c;
    tile.s[r][c] = (gk < k_end && r0 + r < B) ? acc[j] * ninv[gk] * scale : neg_inf<A>();
  }
  __syncthreads();
}

// Per-row unit vectors (optional), inverse norms and norms; one warp per row.
template <typename T, typename A>
__global__ void info_nce_unit_rows_kernel(const T* __restrict__ x, int64_t N, int64_t D, bool normalize, A* __restrict__ xhat,
                                 A* __restrict__ inv, A* __restrict__ nrm) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const T* xr = x + row * D;
  A ss = 0;
  for (int64_t d = lane; d < D; d += kWarp) ss += static_cast<A>(xr[d]) * static_cast<A>(xr[d]);
  const A n = warp_row_norm(warp_sum(ss), xr, D, lane);
  const A iv = normalize ? inv_of_norm(n) : A(1);
  if (lane == 0) {
    inv[row] = iv;
    nrm[row] = n;
  }
  if (xhat != nullptr)
    for (int64_t d = lane; d < D; d += kWarp) xhat[row * D + d] = static_cast<A>(xr[d]) * iv;
}

template <typename T, typename A>
__global__ void info_nce_fwd_shared_kernel(const A* __restrict__ qhat, const T* __restrict__ neg, const A* __restrict__ ninv,
                                  int64_t B, int64_t K, int64_t D, A scale, int64_t per_split, A* __restrict__ part_m,
                                  A* __restrict__ part_l) {
  __shared__ Tiles<A> tile;
  const int64_t r0 = int64_t(blockIdx.x) * TB, split = blockIdx.y;
  const int64_t kb = split * per_split, ke = min(K, kb + per_split);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  A m[2] = {neg_inf<A>(), neg_inf<A>()}, l[2] = {0, 0};
  for (int64_t k0 = kb; k0 < ke; k0 += TK) {
    score_tile<T, A>(tile, qhat, neg, ninv, B, ke, D, r0, k0, scale);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = 2 * warp + h;
      const A v0 = tile.s[rr][lane], v1 = tile.s[rr][lane + 32];
      const A m_new = dmax(m[h], warp_max(dmax(v0, v1)));
      if (m_new == neg_inf<A>()) continue;  // padding rows
      const A sh = lse_shift(m_new);
      const A s = warp_sum(dexp(v0 - sh) + dexp(v1 - sh));
      l[h] = l[h] * dexp(m[h] - sh) + s;
      m[h] = m_new;
    }
    // the next score_tile writes tile.s only after its own barriers: no extra sync needed
  }
  if (lane == 0)
    for (int h = 0; h < 2; ++h) {
      const int64_t gr = r0 + 2 * warp + h;
      if (gr < B) {
        part_m[split * B + gr] = m[h];
        part_l[split * B + gr] = l[h];
      }
    }
}

// Merge the splits and the positive logit into lse and loss; one warp per row.
template <typename A>
__global__ void info_nce_combine_kernel(const A* __restrict__ qhat, const A* __restrict__ phat, int64_t B, int64_t D,
                               A temperature, const A* __restrict__ part_m, const A* __restrict__ part_l, int64_t S,
                               A* __restrict__ loss, A* __restrict__ lse) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  A dot = 0;
  for (int64_t d = lane; d < D; d += kWarp) dot += qhat[row * D + d] * phat[row * D + d];
  const A s_pos = warp_sum(dot) / temperature;
  if (lane != 0) return;
  A mx = s_pos;
  for (int64_t s = 0; s < S; ++s) mx = dmax(mx, part_m[s * B + row]);
  const A sh = lse_shift(mx);
  A sum = dexp(s_pos - sh);
  for (int64_t s = 0; s < S; ++s) {
    const A pm = part_m[s * B + row];
    if (pm != neg_inf<A>()) sum += part_l[s * B + row] * dexp(pm - sh);
  }
  lse[row] = mx + dlog(sum);
  loss[row] = lse[row] - s_pos;
}

template <typename T, typename A, typename I>
__global__ void info_nce_fwd_index_kernel(const A* __restrict__ qhat, const A* __restrict__ phat, const T* __restrict__ neg,
                                 const I* __restrict__ idx, int64_t K, int64_t M, int64_t D, bool normalize, A scale,
                                 A temperature, A* __restrict__ loss, A* __restrict__ lse) {
  __shared__ A wm[kIndexWarps], wl[kIndexWarps];
  const int64_t i = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const A* qi = qhat + i * D;
  A m = neg_inf<A>(), l = 0;
  for (int64_t j = warp; j < M; j += kIndexWarps) {
    const int64_t k = static_cast<int64_t>(idx[i * M + j]);
    CUDA_KERNEL_ASSERT(k >= 0 && k < K);
    const T* nk = neg + k * D;
    A dot = 0, nn = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const A x = static_cast<A>(nk[d]);
      dot += qi[d] * x;
      nn += x * x;
    }
    dot = warp_sum(dot);
    const A s = dot * (normalize ? inv_of_norm(warp_row_norm(warp_sum(nn), nk, D, lane)) : A(1)) * scale;
    const A m_new = dmax(m, s);
    const A sh = lse_shift(m_new);
    l = l * dexp(m - sh) + dexp(s - sh);
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
  __syncthreads();
  if (warp != 0) return;
  A dot = 0;
  for (int64_t d = lane; d < D; d += kWarp) dot += qi[d] * phat[i * D + d];
  const A s_pos = warp_sum(dot) / temperature;
  if (lane != 0) return;
  A mx = s_pos;
  for (int w = 0; w < kIndexWarps; ++w) mx = dmax(mx, wm[w]);
  const A sh = lse_shift(mx);
  A sum = dexp(s_pos - sh);
  for (int w = 0; w < kIndexWarps; ++w)
    if (wm[w] != neg_inf<A>()) sum += wl[w] * dexp(wm[w] - sh);
  lse[i] = mx + dlog(sum);
  loss[i] = lse[i] - s_pos;
}

// d q_hat partial sums, row-owned: part[split, row, :] = sum over the split's k of P_ik inv_k n_k.
template <typename T, typename A>
__global__ void info_nce_bwd_dq_shared_kernel(const A* __restrict__ qhat, const T* __restrict__ neg, const A* __restrict__ ninv,
                                     const A* __restrict__ g, const A* __restrict__ lse, int64_t B, int64_t K,
                                     int64_t D, A scale, int64_t per_split, A* __restrict__ part) {
  __shared__ Tiles<A> tile;
  const int64_t r0 = int64_t(blockIdx.x) * TB, split = blockIdx.y;
  const int64_t kb = split * per_split, ke = min(K, kb + per_split);
  const int t = threadIdx.x;
  // the same thread owns the same part element throughout: no races
  for (int64_t e = t; e < TB * D; e += kThreads) {
    const int64_t gr = r0 + e / D;
    if (gr < B) part[(split * B + gr) * D + e % D] = A(0);
  }
  for (int64_t k0 = kb; k0 < ke; k0 += TK) {
    score_tile<T, A>(tile, qhat, neg, ninv, B, ke, D, r0, k0, scale);
    for (int e = t; e < TB * TK; e += kThreads) {
      const int rr = e / TK, c = e % TK;
      const int64_t gr = r0 + rr, gk = k0 + c;
      tile.s[rr][c] = (gr < B && gk < ke) ? g[gr] * scale * dexp(tile.s[rr][c] - lse[gr]) * ninv[gk] : A(0);
    }
    __syncthreads();
    const int cmax = static_cast<int>(min(static_cast<int64_t>(TK), ke - k0));
    for (int64_t e = t; e < TB * D; e += kThreads) {
      const int rr = static_cast<int>(e / D);
      const int64_t d = e % D, gr = r0 + rr;
      if (gr >= B) continue;
      A acc = 0;
      for (int c = 0; c < cmax; ++c) acc += tile.s[rr][c] * static_cast<A>(neg[(k0 + c) * D + d]);
      part[(split * B + gr) * D + d] += acc;
    }
    __syncthreads();  // tile.s is rewritten by the next score_tile
  }
}

// d n_hat, column-owned: a block owns 64 negatives and walks all query rows.
template <typename T, typename A>
__global__ void info_nce_bwd_dn_shared_kernel(const A* __restrict__ qhat, const T* __restrict__ neg, const A* __restrict__ ninv,
                                     const A* __restrict__ g, const A* __restrict__ lse, int64_t B, int64_t K,
                                     int64_t D, A scale, A* __restrict__ dnhat) {
  __shared__ Tiles<A> tile;
  const int64_t k0 = int64_t(blockIdx.x) * TK;
  const int t = threadIdx.x;
  for (int64_t e = t; e < TK * D; e += kThreads) {
    const int64_t gk = k0 + e / D;
    if (gk < K) dnhat[gk * D + e % D] = A(0);
  }
  for (int64_t r0 = 0; r0 < B; r0 += TB) {
    score_tile<T, A>(tile, qhat, neg, ninv, B, K, D, r0, k0, scale);
    for (int e = t; e < TB * TK; e += kThreads) {
      const int rr = e / TK, c = e % TK;
      const int64_t gr = r0 + rr, gk = k0 + c;
      tile.s[rr][c] = (gr < B && gk < K) ? g[gr] * scale * dexp(tile.s[rr][c] - lse[gr]) : A(0);
    }
    __syncthreads();
    const int rmax = static_cast<int>(min(static_cast<int64_t>(TB), B - r0));
    for (int64_t e = t; e < TK * D; e += kThreads) {
      const int c = static_cast<int>(e / D);
      const int64_t d = e % D, gk = k0 + c;
      if (gk >= K) continue;
      A acc = 0;
      for (int rr = 0; rr < rmax; ++rr) acc += tile.s[rr][c] * qhat[(r0 + rr) * D + d];
      dnhat[gk * D + d] += acc;
    }
    __syncthreads();
  }
}

// neg_index, d q_hat partial sums: block per row, warp w owns part[w, row, :].
template <typename T, typename A, typename I>
__global__ void info_nce_bwd_dq_index_kernel(const A* __restrict__ qhat, const T* __restrict__ neg, const I* __restrict__ idx,
                                    const A* __restrict__ g, const A* __restrict__ lse, int64_t B, int64_t K, int64_t M,
                                    int64_t D, bool normalize, A scale, A* __restrict__ part) {
  const int64_t i = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const A* qi = qhat + i * D;
  A* out = part + (int64_t(warp) * B + i) * D;
  for (int64_t d = lane; d < D; d += kWarp) out[d] = A(0);
  for (int64_t j = warp; j < M; j += kIndexWarps) {
    const int64_t k = static_cast<int64_t>(idx[i * M + j]);
    CUDA_KERNEL_ASSERT(k >= 0 && k < K);
    const T* nk = neg + k * D;
    A dot = 0, nn = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const A x = static_cast<A>(nk[d]);
      dot += qi[d] * x;
      nn += x * x;
    }
    dot = warp_sum(dot);
    const A inv = normalize ? inv_of_norm(warp_row_norm(warp_sum(nn), nk, D, lane)) : A(1);
    const A c = g[i] * scale * dexp(dot * inv * scale - lse[i]) * inv;
    for (int64_t d = lane; d < D; d += kWarp) out[d] += c * static_cast<A>(nk[d]);
  }
}

// Bounds of each bank row's run in the sorted neg_index: [start[k], end[k]).
__global__ void info_nce_segment_bounds_kernel(const int64_t* __restrict__ keys, int64_t E, int64_t* __restrict__ start,
                                      int64_t* __restrict__ end) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= E) return;
  const int64_t k = keys[p];
  if (p == 0 || keys[p - 1] != k) start[k] = p;
  if (p == E - 1 || keys[p + 1] != k) end[k] = p + 1;
}

// neg_index, d n_hat, column-owned: one warp per bank row, entries in stable (flat) order.
template <typename T, typename A>
__global__ void info_nce_bwd_dn_index_kernel(const A* __restrict__ qhat, const T* __restrict__ neg,
                                    const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                    const int64_t* __restrict__ end, const A* __restrict__ ninv,
                                    const A* __restrict__ g, const A* __restrict__ lse, int64_t K, int64_t M,
                                    int64_t D, A scale, A* __restrict__ dnhat) {
  const int64_t k = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= K) return;
  const T* nk = neg + k * D;
  A* out = dnhat + k * D;
  for (int64_t d = lane; d < D; d += kWarp) out[d] = A(0);
  const A inv = ninv[k];
  for (int64_t p = start[k]; p < end[k]; ++p) {
    const int64_t i = order[p] / M;
    const A* qi = qhat + i * D;
    A dot = 0;
    for (int64_t d = lane; d < D; d += kWarp) dot += qi[d] * static_cast<A>(nk[d]);
    dot = warp_sum(dot);
    const A c = g[i] * scale * dexp(dot * inv * scale - lse[i]);
    for (int64_t d = lane; d < D; d += kWarp) out[d] += c * qi[d];
  }
}

// d x = inv * (d x_hat - [||x|| >= eps] x_hat (x_hat . d x_hat)); one warp per row. The rows of
// d x_hat are partial[0..S) summed in order plus coef_i * other_i (the positive logit's term).
template <typename T, typename A>
__global__ void info_nce_unit_grad_kernel(const A* __restrict__ partial, int64_t S, const A* __restrict__ coef,
                                 const A* __restrict__ other, const A* __restrict__ xhat, const A* __restrict__ inv,
                                 const A* __restrict__ nrm, int64_t N, int64_t D, bool normalize, T* __restrict__ out) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  auto dxhat = [&](int64_t d) {
    A v = coef != nullptr ? coef[row] * other[row * D + d] : A(0);
    for (int64_t s = 0; s < S; ++s) v += partial[(s * N + row) * D + d];
    return v;
  };
  A proj = 0;
  if (normalize && nrm[row] >= static_cast<A>(kNormEps)) {
    for (int64_t d = lane; d < D; d += kWarp) proj += xhat[row * D + d] * dxhat(d);
    proj = warp_sum(proj);
  }
  const A iv = inv[row];
  for (int64_t d = lane; d < D; d += kWarp) out[row * D + d] = static_cast<T>(iv * (dxhat(d) - xhat[row * D + d] * proj));
}

// coef_i = g_i * (softmax_pos_i - 1) / tau; one warp per row.
template <typename A>
__global__ void info_nce_positive_coef_kernel(const A* __restrict__ qhat, const A* __restrict__ phat, const A* __restrict__ g,
                                     const A* __restrict__ lse, int64_t B, int64_t D, A temperature,
                                     A* __restrict__ coef) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  A dot = 0;
  for (int64_t d = lane; d < D; d += kWarp) dot += qhat[row * D + d] * phat[row * D + d];
  const A s_pos = warp_sum(dot) / temperature;
  if (lane == 0) coef[row] = g[row] * (dexp(s_pos - lse[row]) - A(1)) / temperature;
}

// Splits of the negatives so that about two blocks per SM are busy.
void plan_splits(const at::Tensor& t, int64_t B, int64_t K, int64_t& splits, int64_t& per_split) {
  const int64_t row_blocks = ceil_div(B, TB), tiles = ceil_div(K, TK);
  int64_t want = std::max<int64_t>(1, ceil_div(2 * sm_count(t), row_blocks));
  want = std::min<int64_t>({want, tiles, 1024});
  per_split = ceil_div(tiles, want) * TK;
  splits = ceil_div(K, per_split);
}

struct Units {
  at::Tensor xhat, inv, nrm;
};

template <typename T, typename A>
Units unit_rows(const at::Tensor& x, bool normalize, bool want_xhat, cudaStream_t stream) {
  const int64_t N = x.size(0), D = x.size(1);
  auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  Units u{want_xhat ? at::empty({N, D}, opts) : at::Tensor(), at::empty({N}, opts), at::empty({N}, opts)};
  info_nce_unit_rows_kernel<T, A><<<warp_rows_grid(N, kThreads), kThreads, 0, stream>>>(
      x.data_ptr<T>(), N, D, normalize, want_xhat ? u.xhat.data_ptr<A>() : nullptr, u.inv.data_ptr<A>(),
      u.nrm.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_forward_cuda(const at::Tensor& query_in,
                                                                     const at::Tensor& positive_in,
                                                                     const at::Tensor& negatives_in,
                                                                     const c10::optional<at::Tensor>& neg_index,
                                                                     double temperature, bool normalize,
                                                                     bool compute_dq) {
  check_info_nce_inputs(query_in, positive_in, negatives_in, neg_index, temperature);
  c10::cuda::CUDAGuard guard(query_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor query = query_in.contiguous(), positive = positive_in.contiguous();
  const at::Tensor negatives = negatives_in.contiguous();
  const int64_t B = query.size(0), D = query.size(1), K = negatives.size(0);
  auto acc_opts = query.options().dtype(acc_type(query.scalar_type()));
  at::Tensor loss = at::empty({B}, acc_opts), lse = at::empty({B}, acc_opts);
  at::Tensor dq_neg = at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "info_nce_forward_cuda", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    Units q = unit_rows<T, A>(query, normalize, true, stream);
    Units p = unit_rows<T, A>(positive, normalize, true, stream);
    if (has(neg_index)) {
      const at::Tensor idx = neg_index->contiguous();
      const int64_t M = idx.size(1);
      AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "info_nce_forward_cuda_index", [&] {
        info_nce_fwd_index_kernel<T, A, index_t><<<static_cast<unsigned>(B), kIndexWarps * kWarp, 0, stream>>>(
            q.xhat.data_ptr<A>(), p.xhat.data_ptr<A>(), negatives.data_ptr<T>(), idx.data_ptr<index_t>(), K, M, D,
            normalize, static_cast<A>(1.0 / temperature), static_cast<A>(temperature), loss.data_ptr<A>(),
            lse.data_ptr<A>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (compute_dq) {  // d lse / d q_hat now (g = 1), so backward needs no bank
        const at::Tensor ones = at::ones({B}, acc_opts);
        at::Tensor part = at::empty({kIndexWarps, B, D}, acc_opts);
        AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "info_nce_forward_cuda_dq_index", [&] {
          info_nce_bwd_dq_index_kernel<T, A, index_t><<<static_cast<unsigned>(B), kIndexWarps * kWarp, 0, stream>>>(
              q.xhat.data_ptr<A>(), negatives.data_ptr<T>(), idx.data_ptr<index_t>(), ones.data_ptr<A>(),
              lse.data_ptr<A>(), B, K, M, D, normalize, static_cast<A>(1.0 / temperature), part.data_ptr<A>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dq_neg = part.sum(0);
      }
    } else {
      Units n = unit_rows<T, A>(negatives, normalize, false, stream);
      int64_t splits, per_split;
      plan_splits(query, B, K, splits, per_split);
      at::Tensor pm = at::empty({splits, B}, acc_opts), pl = at::empty({splits, B}, acc_opts);
      const dim3 grid(static_cast<unsigned>(ceil_div(B, TB)), static_cast<unsigned>(splits));
      info_nce_fwd_shared_kernel<T, A><<<grid, kThreads, 0, stream>>>(q.xhat.data_ptr<A>(), negatives.data_ptr<T>(),
                                                             n.inv.data_ptr<A>(), B, K, D,
                                                             static_cast<A>(1.0 / temperature), per_split,
                                                             pm.data_ptr<A>(), pl.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      info_nce_combine_kernel<A><<<warp_rows_grid(B, kThreads), kThreads, 0, stream>>>(
          q.xhat.data_ptr<A>(), p.xhat.data_ptr<A>(), B, D, static_cast<A>(temperature), pm.data_ptr<A>(),
          pl.data_ptr<A>(), splits, loss.data_ptr<A>(), lse.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (compute_dq) {  // d lse / d q_hat now (g = 1), so backward needs no bank
        const at::Tensor ones = at::ones({B}, acc_opts);
        at::Tensor part = at::empty({splits, B, D}, acc_opts);
        info_nce_bwd_dq_shared_kernel<T, A><<<grid, kThreads, 0, stream>>>(q.xhat.data_ptr<A>(), negatives.data_ptr<T>(),
                                                                   n.inv.data_ptr<A>(), ones.data_ptr<A>(),
                                                                   lse.data_ptr<A>(), B, K, D,
                                                                   static_cast<A>(1.0 / temperature), per_split,
                                                                   part.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dq_neg = part.sum(0);  // fixed-order reduction over the splits
      }
    }
  });
  return {loss, lse, dq_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad, const at::Tensor& query_in, const at::Tensor& positive_in,
    const c10::optional<at::Tensor>& negatives_in, const c10::optional<at::Tensor>& neg_index, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& dq_neg, double temperature, bool normalize, bool need_q, bool need_p,
    bool need_n) {
  check_info_nce_backward(grad, query_in, positive_in, negatives_in, neg_index, lse_in, dq_neg, temperature, need_n);
  c10::cuda::CUDAGuard guard(query_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor query = query_in.contiguous(), positive = positive_in.contiguous();
  const at::Tensor negatives = has(negatives_in) ? negatives_in->contiguous() : at::Tensor();
  const int64_t B = query.size(0), D = query.size(1);
  auto acc_opts = query.options().dtype(acc_type(query.scalar_type()));
  const at::Tensor g = grad.to(acc_opts.dtype()).contiguous(), lse = lse_in.to(acc_opts.dtype()).contiguous();
  const bool have_dq = has(dq_neg) && dq_neg->numel() > 0;
  at::Tensor dq = need_q ? at::empty({B, D}, query.options()) : at::empty({0}, query.options());
  at::Tensor dp = need_p ? at::empty({B, D}, positive.options()) : at::empty({0}, query.options());
  at::Tensor dn = need_n ? at::empty(negatives.sizes(), negatives.options()) : at::empty({0}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "info_nce_backward_cuda", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    const A scale = static_cast<A>(1.0 / temperature);
    Units q = unit_rows<T, A>(query, normalize, true, stream);
    Units p = unit_rows<T, A>(positive, normalize, true, stream);
    at::Tensor coef = at::empty({B}, acc_opts);
    info_nce_positive_coef_kernel<A><<<warp_rows_grid(B, kThreads), kThreads, 0, stream>>>(
        q.xhat.data_ptr<A>(), p.xhat.data_ptr<A>(), g.data_ptr<A>(), lse.data_ptr<A>(), B, D,
        static_cast<A>(temperature), coef.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t K = negatives.defined() ? negatives.size(0) : 0;
    Units n;
    if (need_n || (need_q && !have_dq && !has(neg_index)))  // n_hat itself only for the Jacobian of d n
      n = unit_rows<T, A>(negatives, normalize, need_n, stream);
    if (need_q) {
      at::Tensor part;
      int64_t S = 1;
      if (have_dq) {
        part = dq_neg->to(acc_opts.dtype()).mul(g.unsqueeze(1)).contiguous();
      } else if (has(neg_index)) {
        const at::Tensor idx = neg_index->contiguous();
        S = kIndexWarps;
        part = at::empty({S, B, D}, acc_opts);
        AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "info_nce_backward_cuda_dq_index", [&] {
          info_nce_bwd_dq_index_kernel<T, A, index_t><<<static_cast<unsigned>(B), kIndexWarps * kWarp, 0, stream>>>(
              q.xhat.data_ptr<A>(), negatives.data_ptr<T>(), idx.data_ptr<index_t>(), g.data_ptr<A>(),
              lse.data_ptr<A>(), B, K, idx.size(1), D, normalize, scale, part.data_ptr<A>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        int64_t per_split;
        plan_splits(query, B, K, S, per_split);
        part = at::empty({S, B, D}, acc_opts);
        const dim3 grid(static_cast<unsigned>(ceil_div(B, TB)), static_cast<unsigned>(S));
        info_nce_bwd_dq_shared_kernel<T, A><<<grid, kThreads, 0, stream>>>(q.xhat.data_ptr<A>(), negatives.data_ptr<T>(),
                                                                  n.inv.data_ptr<A>(), g.data_ptr<A>(),
                                                                  lse.data_ptr<A>(), B, K, D, scale, per_split,
                                                                  part.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      info_nce_unit_grad_kernel<T, A><<<warp_rows_grid(B, kThreads), kThreads, 0, stream>>>(
          part.data_ptr<A>(), S, coef.data_ptr<A>(), p.xhat.data_ptr<A>(), q.xhat.data_ptr<A>(), q.inv.data_ptr<A>(),
          q.nrm.data_ptr<A>(), B, D, normalize, dq.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_p) {
      info_nce_unit_grad_kernel<T, A><<<warp_rows_grid(B, kThreads), kThreads, 0, stream>>>(
          nullptr, 0, coef.data_ptr<A>(), q.xhat.data_ptr<A>(), p.xhat.data_ptr<A>(), p.inv.data_ptr<A>(),
          p.nrm.data_ptr<A>(), B, D, normalize, dp.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_n) {
      at::Tensor dnhat = at::empty({K, D}, acc_opts);
      if (has(neg_index)) {
        const at::Tensor flat = neg_index->reshape({-1}).to(at::kLong);
        const int64_t E = flat.numel(), M = neg_index->size(1);
        auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const at::Tensor keys = std::get<0>(sorted).contiguous(), order = std::get<1>(sorted).contiguous();
        at::Tensor start = at::zeros({K}, flat.options()), end = at::zeros({K}, flat.options());
        info_nce_segment_bounds_kernel<<<static_cast<unsigned>(ceil_div(E, kThreads)), kThreads, 0, stream>>>(
            keys.data_ptr<int64_t>(), E, start.data_ptr<int64_t>(), end.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        info_nce_bwd_dn_index_kernel<T, A><<<warp_rows_grid(K, kThreads), kThreads, 0, stream>>>(
            q.xhat.data_ptr<A>(), negatives.data_ptr<T>(), order.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
            end.data_ptr<int64_t>(), n.inv.data_ptr<A>(), g.data_ptr<A>(), lse.data_ptr<A>(), K, M, D, scale,
            dnhat.data_ptr<A>());
      } else {
        info_nce_bwd_dn_shared_kernel<T, A><<<static_cast<unsigned>(ceil_div(K, TK)), kThreads, 0, stream>>>(
            q.xhat.data_ptr<A>(), negatives.data_ptr<T>(), n.inv.data_ptr<A>(), g.data_ptr<A>(), lse.data_ptr<A>(), B,
            K, D, scale, dnhat.data_ptr<A>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      info_nce_unit_grad_kernel<T, A><<<warp_rows_grid(K, kThreads), kThreads, 0, stream>>>(
          dnhat.data_ptr<A>(), 1, nullptr, nullptr, n.xhat.data_ptr<A>(), n.inv.data_ptr<A>(), n.nrm.data_ptr<A>(),
          K, D, normalize, dn.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dp, dn};
}

}  // namespace
}  // namespace cuda
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CUDA, m) {
  m.impl("info_nce_forward", &gacd_fast::cuda::info_nce_forward_cuda);
  m.impl("info_nce_backward", &gacd_fast::cuda::info_nce_backward_cuda);
}
