// CPU kernels of cosine_similarity, forward and backward. Norms and dots accumulate in double for
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
  m.impl("cosine_similarity", &gacd_fast::cosine_similarity_cpu);
  m.impl("cosine_similarity_backward", &gacd_fast::cosine_similarity_backward_cpu);
}
