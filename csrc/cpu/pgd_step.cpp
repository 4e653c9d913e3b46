// CPU kernel of pgd_step_: one PGD step in place, linf (each op rounded as torch's eager sequence:
// bitwise in float32) or l2 (per-sample norms in the accumulation dtype).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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

}  // namespace
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CPU, m) { m.impl("pgd_step_", &gacd_fast::pgd_step_cpu); }
