// Shared declarations of the gacd_fast extension: input checks and small numeric helpers used by
// both the CPU (cpu/*.cpp) and the CUDA (cuda/*.cu) implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace gacd_fast {

// F.normalize's eps: x / max(||x||, eps) (gacd_fast/_numerics.py: NORM_EPS).
constexpr double kNormEps = 1e-12;
constexpr float kLog2eF = 1.44269504088896341f;  // log2(e): exp(x) = exp2(x * log2(e))

// Accumulation dtype: double for double inputs, float for float/half/bfloat16.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Validate pgd_step_ arguments; returns true for norm == "linf", false for "l2".
bool check_pgd_inputs(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                      const c10::optional<at::Tensor>& alpha_t, const c10::optional<at::Tensor>& eps_t,
                      double eps, double clip_min, double clip_max, const std::string& norm);

void check_float(const char* name, const at::Tensor& t);
// A float [N, D] tensor with N, D >= 1 (no kernel divides by an empty dim).
void check_rows(const char* name, const at::Tensor& x);
// A float gradient of the given shape on x's device.
void check_grad_like(const char* op, const at::Tensor& grad, at::IntArrayRef shape, const at::Tensor& x);
void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b);

// Validate info_nce_forward arguments (index range is checked by the CPU kernels, and by a
// device-side assertion on CUDA).
void check_info_nce_inputs(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                           const c10::optional<at::Tensor>& neg_index, double temperature);

// Validate info_nce_backward arguments against the forward's shapes.
void check_info_nce_backward(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& positive,
                             const c10::optional<at::Tensor>& negatives, const c10::optional<at::Tensor>& neg_index,
                             const at::Tensor& lse, const c10::optional<at::Tensor>& dq_neg, double temperature,
                             bool need_negatives);

// Row statistics in double (CPU kernels of l2_normalize, cosine_similarity): inverse of
// max(||x||, eps), and whether the norm passed eps (then the Jacobian has its projection term).
inline void row_unit(double ss, double& inv, bool& proj) {
  const double n = std::sqrt(ss);
  proj = n >= kNormEps;
  inv = 1.0 / std::max(n, kNormEps);
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace gacd_fast
