// CPU kernels of l2_normalize, forward and backward. Row norms accumulate in double for
// float/half/bfloat16 inputs: the op is O(N*D), so the extra precision is free next to memory traffic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common.h"

namespace gacd_fast {
namespace {

at::Tensor l2_normalize_cpu(const at::Tensor& x_in) {
  check_rows("x", x_in);
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize_cpu", [&] {
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

at::Tensor l2_normalize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_rows("x", x_in);
  check_grad_like("l2_normalize_backward", grad_in, x_in.sizes(), x_in);
  const auto x = x_in.contiguous();
  const auto g = grad_in.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize_backward_cpu", [&] {
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

}  // namespace
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CPU, m) {
  m.impl("l2_normalize", &gacd_fast::l2_normalize_cpu);
  m.impl("l2_normalize_backward", &gacd_fast::l2_normalize_backward_cpu);
}
