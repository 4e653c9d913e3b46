// CPU kernels of the row-wise and element-wise ops: pgd_step_, normalize, cosine_similarity
// (forward and backward). Row norms and dots accumulate in double for float/half/bfloat16 inputs:
// these ops are O(N*D), so the extra precision is free next to memory traffic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common.h"

namespace gacd_fast {
namespace {

// torch.clamp's semantics: NaN passes through, bounds in the element dtype.
template <typename scalar_t>
inline scalar_t clamp_to(scalar_t v, scalar_t lo, scalar_t hi) {
  using op_t = at::opmath_type<scalar_t>;
  const op_t x = static_cast<op_t>(v);
  return x < static_cast<op_t>(lo) ? lo : (x > static_cast<op_t>(hi) ? hi : v);
}

// Per-sample value: the tensor (already in x's dtype) when given, else the float.
struct PerSample {
  const void* ptr = nullptr;
  double value = 0;
};

template <typename scalar_t>
void pgd_linf(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, const at::Tensor& alpha_t,
              double alpha, const at::Tensor& eps_t, double eps, double clip_min, double clip_max) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t B = x_adv.size(0), N = x_adv.numel() / B;
  scalar_t* x = x_adv.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* xn = x_nat.data_ptr<scalar_t>();
  const scalar_t* at_ = alpha_t.defined() ? alpha_t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* et_ = eps_t.defined() ? eps_t.data_ptr<scalar_t>() : nullptr;
  const scalar_t lo = static_cast<scalar_t>(clip_min), hi = static_cast<scalar_t>(clip_max);
  // Each op rounds to scalar_t, as the eager sequence of torch ops does (bitwise in float32):
  // alpha as a float is applied in op_t (torch's scalar multiply); as a tensor it is first cast to x's dtype.
  // ATen's grain for element-wise ops: below it one thread (torch's own clamp/add do the same), so a
  // small batch never waits at a thread barrier, which costs most on a shared machine.
  at::parallel_for(0, B * N, at::internal::GRAIN_SIZE, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / N;
      const op_t a = at_ ? static_cast<op_t>(at_[b]) : static_cast<op_t>(alpha);
      const scalar_t e = et_ ? et_[b] : static_cast<scalar_t>(eps);
      const scalar_t ne = static_cast<scalar_t>(-static_cast<op_t>(e));
      const op_t gv = static_cast<op_t>(g[j]);
      const op_t sgn = static_cast<op_t>((gv > op_t(0)) - (gv < op_t(0)));
      const scalar_t step = static_cast<scalar_t>(a * sgn);
      const scalar_t adv = static_cast<scalar_t>(static_cast<op_t>(x[j]) + static_cast<op_t>(step));
      scalar_t d = static_cast<scalar_t>(static_cast<op_t>(adv) - static_cast<op_t>(xn[j]));
      d = clamp_to<scalar_t>(d, ne, e);
      const scalar_t y = static_cast<scalar_t>(static_cast<op_t>(xn[j]) + static_cast<op_t>(d));
      x[j] = clamp_to<scalar_t>(y, lo, hi);
    }
  });
}

// Per-sample l2 step direction, the reference's l2_direction: NaN elements count as 0; the gradient
// is scaled by its max |g| before the norm (no overflow); with +-inf elements the direction is their
// limit (+-1 there, 0 elsewhere). unit(j) = u_j / ||u|| in the accumulation dtype, 0 without a norm.
template <typename scalar_t, typename acc_t>
struct L2Direction {
  const scalar_t* g;
  double gmax = 0;
  acc_t un = 0;

  L2Direction(const scalar_t* gb, int64_t N) : g(gb) {
    for (int64_t j = 0; j < N; ++j) gmax = std::max(gmax, std::abs(double(g[j])));  // NaN never wins
    double ss = 0;
    for (int64_t j = 0; j < N; ++j) ss += double(u(j)) * double(u(j));
    un = static_cast<acc_t>(std::sqrt(ss));
  }
  acc_t u(int64_t j) const {
    const double v = g[j];
    if (std::isnan(v) || gmax == 0) return acc_t(0);
    if (std::isinf(gmax)) return std::isinf(v) ? acc_t(v > 0 ? 1 : -1) : acc_t(0);
    return static_cast<acc_t>(v) / static_cast<acc_t>(gmax);
  }
  acc_t unit(int64_t j) const { return un > acc_t(0) ? u(j) / un : acc_t(0); }
};

template <typename scalar_t>
void pgd_l2(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, const at::Tensor& alpha_t,
            double alpha, const at::Tensor& eps_t, double eps, double clip_min, double clip_max) {
  // The reference computes in the accumulation dtype (float, or double for double).
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x_adv.size(0), N = x_adv.numel() / B;
  scalar_t* x = x_adv.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* xn = x_nat.data_ptr<scalar_t>();
  const acc_t* at_ = alpha_t.defined() ? alpha_t.data_ptr<acc_t>() : nullptr;
  const acc_t* et_ = eps_t.defined() ? eps_t.data_ptr<acc_t>() : nullptr;
  const scalar_t lo = static_cast<scalar_t>(clip_min), hi = static_cast<scalar_t>(clip_max);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* xnb = xn + b * N;
      scalar_t* xb = x + b * N;
      const L2Direction<scalar_t, acc_t> dir(g + b * N, N);
      const acc_t a = at_ ? at_[b] : static_cast<acc_t>(alpha);
      const acc_t e = et_ ? et_[b] : static_cast<acc_t>(eps);
      auto delta_at = [&](int64_t j) -> acc_t {
        return (static_cast<acc_t>(xb[j]) + a * dir.unit(j)) - static_cast<acc_t>(xnb[j]);
      };
      double dd = 0;
      for (int64_t j = 0; j < N; ++j) {
        const double d = delta_at(j);
        dd += d * d;
      }
      const acc_t dn = static_cast<acc_t>(std::sqrt(dd));
      const acc_t scale = dn > e ? e / dn : acc_t(1);
      for (int64_t j = 0; j < N; ++j) {
        const scalar_t d = static_cast<scalar_t>(delta_at(j) * scale);
        const scalar_t y = static_cast<scalar_t>(at::opmath_type<scalar_t>(xnb[j]) + at::opmath_type<scalar_t>(d));
        xb[j] = clamp_to<scalar_t>(y, lo, hi);  // x_adv[b] is only read above, for this row
      }
    }
  });
}

void pgd_step_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                  const c10::optional<at::Tensor>& alpha_t, double alpha, const c10::optional<at::Tensor>& eps_t,
                  double eps, double clip_min, double clip_max, c10::string_view norm) {
  const bool linf = check_pgd_inputs(x_adv, grad, x_nat, alpha_t, eps_t, eps, clip_min, clip_max, std::string(norm));
  const auto g = grad.contiguous();
  const auto xn = x_nat.contiguous();
  // linf uses per-sample values in x's dtype (the reference casts them so), l2 in the accumulation dtype.
  const auto pdtype = linf ? x_adv.scalar_type() : acc_type(x_adv.scalar_type());
  const at::Tensor a = has(alpha_t) ? alpha_t->to(pdtype).contiguous() : at::Tensor();
  const at::Tensor e = has(eps_t) ? eps_t->to(pdtype).contiguous() : at::Tensor();
  if (has(eps_t)) TORCH_CHECK(!(e < 0).any().item<bool>(), "gacd_fast.pgd_step_: eps must be >= 0 for every sample");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    if (linf) pgd_linf<scalar_t>(x_adv, g, xn, a, alpha, e, eps, clip_min, clip_max);
    else pgd_l2<scalar_t>(x_adv, g, xn, a, alpha, e, eps, clip_min, clip_max);
  });
}

// Row statistics in double: inverse of max(||x||, eps), and whether the norm passed eps (then the
// normalisation's Jacobian has its projection term).
inline void row_unit(double ss, double& inv, bool& proj) {
  const double n = std::sqrt(ss);
  proj = n >= kNormEps;
  inv = 1.0 / std::max(n, kNormEps);
}

at::Tensor normalize_cpu(const at::Tensor& x_in) {
  check_rows("x", x_in);
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double ss = 0, inv;
        bool proj;
        for (int64_t d = 0; d < D; ++d) ss += double(xp[r * D + d]) * double(xp[r * D + d]);
        row_unit(ss, inv, proj);
        const acc_t denom = static_cast<acc_t>(1.0 / inv);
        if (std::isfinite(denom)) {
          for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(static_cast<acc_t>(xp[r * D + d]) / denom);
        } else {  // a finite float row whose norm exceeds float's range (e.g. 20 x 1e38): divide in double
          for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(double(xp[r * D + d]) * inv);
        }
      }
    });
  });
  return out;
}

at::Tensor normalize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_rows("x", x_in);
  check_grad_like("normalize_backward", grad_in, x_in.sizes(), x_in);
  const auto x = x_in.contiguous();
  const auto g = grad_in.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * D;
        const scalar_t* gr = gp + r * D;
        double ss = 0, xg = 0, inv;
        bool proj;
        for (int64_t d = 0; d < D; ++d) {
          ss += double(xr[d]) * double(xr[d]);
          xg += double(xr[d]) * double(gr[d]);
        }
        row_unit(ss, inv, proj);
        // dx = inv * (g - xhat (xhat . g)) where the norm passed eps, else g / eps.
        const double c = proj ? xg * inv * inv : 0.0;
        for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(inv * (double(gr[d]) - double(xr[d]) * c));
      }
    });
  });
  return out;
}

// Dot product and inverse norms (with F.normalize's eps rule) of row r of a and b, in double.
struct RowPair {
  double ab, ia, ib;
  bool pa, pb;  // ||row|| >= eps: the Jacobian's projection term applies
};

template <typename scalar_t>
RowPair row_pair(const scalar_t* ap, const scalar_t* bp, int64_t r, int64_t D) {
  double aa = 0, bb = 0;
  RowPair p{0, 0, 0, false, false};
  for (int64_t d = 0; d < D; ++d) {
    const double x = ap[r * D + d], y = bp[r * D + d];
    aa += x * x; bb += y * y; p.ab += x * y;
  }
  row_unit(aa, p.ia, p.pa);
  row_unit(bb, p.ib, p.pb);
  return p;
}

at::Tensor cosine_similarity_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair("cosine_similarity", a_in, b_in);
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), D = a.size(1);
  auto out = at::empty({N}, a.options().dtype(acc_type(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const RowPair rp = row_pair(ap, bp, r, D);
        op[r] = static_cast<acc_t>(rp.ab * rp.ia * rp.ib);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cpu(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                                  const at::Tensor& b_in) {
  check_pair("cosine_similarity_backward", a_in, b_in);
  check_grad_like("cosine_similarity_backward", grad_in, {a_in.size(0)}, a_in);
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const auto g = grad_in.to(at::kDouble).contiguous();
  auto da = at::empty_like(a), db = at::empty_like(b);
  const int64_t N = a.size(0), D = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_backward_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const double* gp = g.data_ptr<double>();
    scalar_t* dap = da.data_ptr<scalar_t>();
    scalar_t* dbp = db.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const RowPair rp = row_pair(ap, bp, r, D);
        const double ab = rp.ab, ia = rp.ia, ib = rp.ib;
        const bool pa = rp.pa, pb = rp.pb;
        const double cos = ab * ia * ib, gr = gp[r];
        // d cos / d a = ia * (bhat - [proj] ahat cos), and symmetrically for b.
        for (int64_t d = 0; d < D; ++d) {
          const double ah = ap[r * D + d] * ia, bh = bp[r * D + d] * ib;
          dap[r * D + d] = static_cast<scalar_t>(gr * ia * (bh - (pa ? ah * cos : 0.0)));
          dbp[r * D + d] = static_cast<scalar_t>(gr * ib * (ah - (pb ? bh * cos : 0.0)));
        }
      }
    });
  });
  return {da, db};
}

}  // namespace
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CPU, m) {
  m.impl("pgd_step_", &gacd_fast::pgd_step_cpu);
  m.impl("l2_normalize", &gacd_fast::normalize_cpu);
  m.impl("l2_normalize_backward", &gacd_fast::normalize_backward_cpu);
  m.impl("cosine_similarity", &gacd_fast::cosine_similarity_cpu);
  m.impl("cosine_similarity_backward", &gacd_fast::cosine_similarity_backward_cpu);
}
