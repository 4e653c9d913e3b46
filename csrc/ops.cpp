// The argument checks shared by the CPU and CUDA kernels of the gacd_fast operator library.
// The ops' schemas, fake (meta) kernels and autograd formulas are defined once, in Python, by each
// op's module in gacd_fast/ops/ (the Triton backend uses the same ones); gacd_fast/ops/cext_backend.py
// defines them in the gacd_fast namespace before this library is loaded. The kernels register per
// device with TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu, and torch checks each kernel's C++
// signature against the schema when it registers.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

namespace gacd_fast {

namespace {

bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

}  // namespace

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "gacd_fast: ", name, " is undefined");
  TORCH_CHECK(is_float(t), "gacd_fast: ", name, " must be float16/bfloat16/float32/float64, got ", t.scalar_type());
}

namespace {

void check_per_sample(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), "gacd_fast: ", name,
              " must have shape [B] = [", x.size(0), "], got ", t.sizes());
  TORCH_CHECK(is_float(t), "gacd_fast: ", name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "gacd_fast: ", name, " is on ", t.device(), " but x_adv is on ", x.device());
}

}  // namespace

void check_rows(const char* name, const at::Tensor& x) {
  check_float(name, x);
  TORCH_CHECK(x.dim() == 2, "gacd_fast: ", name, " must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "gacd_fast: ", name, " must be non-empty [N, D] (N, D >= 1), got ",
              x.sizes());
}

void check_grad_like(const char* op, const at::Tensor& grad, at::IntArrayRef shape, const at::Tensor& x) {
  check_float("grad", grad);
  TORCH_CHECK(grad.sizes() == shape, "gacd_fast.", op, ": grad must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "gacd_fast.", op, ": grad is on ", grad.device(), " but the input is on ",
              x.device());
}

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_rows("a", a);
  check_rows("b", b);
  TORCH_CHECK(a.sizes() == b.sizes(), "gacd_fast.", op, ": a and b must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gacd_fast.", op, ": a and b must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "gacd_fast.", op, ": a and b must be on one device, got ", a.device(),
              " and ", b.device());
}

bool check_pgd_inputs(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                      const c10::optional<at::Tensor>& alpha_t, const c10::optional<at::Tensor>& eps_t,
                      double eps, double clip_min, double clip_max, const std::string& norm) {
  check_float("x_adv", x_adv);
  check_float("grad", grad);
  check_float("x_nat", x_nat);
  TORCH_CHECK(std::isfinite(eps) && std::isfinite(clip_min) && std::isfinite(clip_max),
              "gacd_fast.pgd_step_: eps, clip_min and clip_max must be finite, got ", eps, ", ", clip_min, ", ",
              clip_max);
  TORCH_CHECK(x_adv.dim() >= 1 && x_adv.numel() > 0, "gacd_fast.pgd_step_: x_adv must be a non-empty [B, ...], got ",
              x_adv.sizes());
  TORCH_CHECK(grad.sizes() == x_adv.sizes() && x_nat.sizes() == x_adv.sizes(),
              "gacd_fast.pgd_step_: grad and x_nat must have x_adv's shape ", x_adv.sizes(), ", got ", grad.sizes(),
              " and ", x_nat.sizes());
  TORCH_CHECK(grad.scalar_type() == x_adv.scalar_type() && x_nat.scalar_type() == x_adv.scalar_type(),
              "gacd_fast.pgd_step_: x_adv, grad and x_nat must have one dtype, got ", x_adv.scalar_type(), ", ",
              grad.scalar_type(), ", ", x_nat.scalar_type());
  TORCH_CHECK(grad.device() == x_adv.device() && x_nat.device() == x_adv.device(),
              "gacd_fast.pgd_step_: x_adv, grad and x_nat must be on one device");
  TORCH_CHECK(x_adv.is_contiguous(), "gacd_fast.pgd_step_: x_adv must be contiguous (it is written in place)");
  if (has(alpha_t)) check_per_sample("alpha", *alpha_t, x_adv);
  if (has(eps_t)) check_per_sample("eps", *eps_t, x_adv);
  else TORCH_CHECK(eps >= 0, "gacd_fast.pgd_step_: eps must be >= 0, got ", eps);
  TORCH_CHECK(clip_min <= clip_max, "gacd_fast.pgd_step_: clip_min must be <= clip_max, got ", clip_min, " > ",
              clip_max);
  TORCH_CHECK(norm == "linf" || norm == "l2", "gacd_fast.pgd_step_: norm must be 'linf' or 'l2', got '", norm, "'");
  return norm == "linf";
}

void check_info_nce_inputs(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                           const c10::optional<at::Tensor>& neg_index, double temperature) {
  check_rows("query", query);
  check_rows("positive", positive);
  check_rows("negatives", negatives);
  TORCH_CHECK(query.size(0) > 0 && query.size(1) > 0, "gacd_fast.info_nce: query must be non-empty [B, D], got ",
              query.sizes());
  TORCH_CHECK(positive.sizes() == query.sizes(), "gacd_fast.info_nce: positive must have query's shape ",
              query.sizes(), ", got ", positive.sizes());
  TORCH_CHECK(negatives.size(0) > 0 && negatives.size(1) == query.size(1),
              "gacd_fast.info_nce: negatives must be [K, D] with K > 0 and D = ", query.size(1), ", got ",
              negatives.sizes());
  TORCH_CHECK(positive.scalar_type() == query.scalar_type() && negatives.scalar_type() == query.scalar_type(),
              "gacd_fast.info_nce: query, positive and negatives must have one dtype, got ", query.scalar_type(),
              ", ", positive.scalar_type(), ", ", negatives.scalar_type());
  TORCH_CHECK(positive.device() == query.device() && negatives.device() == query.device(),
              "gacd_fast.info_nce: query, positive and negatives must be on one device, got ", query.device(), ", ",
              positive.device(), ", ", negatives.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0 &&
                  1.0 / temperature <= static_cast<double>(std::numeric_limits<float>::max()),
              "gacd_fast.info_nce: temperature must be > 0 with a reciprocal finite in float32, got ", temperature);
  if (has(neg_index)) {
    const auto& idx = *neg_index;
    TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                "gacd_fast.info_nce: neg_index must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == query.size(0) && idx.size(1) > 0,
                "gacd_fast.info_nce: neg_index must be [B, M] with B = ", query.size(0), " and M > 0, got ",
                idx.sizes());
    TORCH_CHECK(idx.device() == query.device(), "gacd_fast.info_nce: neg_index is on ", idx.device(),
                " but query is on ", query.device());
  }
}

void check_info_nce_backward(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& positive,
                             const c10::optional<at::Tensor>& negatives, const c10::optional<at::Tensor>& neg_index,
                             const at::Tensor& lse, const c10::optional<at::Tensor>& dq_neg, double temperature,
                             bool need_negatives) {
  check_rows("query", query);
  check_rows("positive", positive);
  TORCH_CHECK(positive.sizes() == query.sizes() && positive.scalar_type() == query.scalar_type() &&
                  positive.device() == query.device(),
              "gacd_fast.info_nce_backward: positive must match query's shape, dtype and device");
  const int64_t B = query.size(0);
  check_float("grad", grad);
  check_float("lse", lse);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, "gacd_fast.info_nce_backward: grad must be [B] = [", B,
              "], got ", grad.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == B, "gacd_fast.info_nce_backward: lse must be [B], got ", lse.sizes());
  const bool have_dq = has(dq_neg) && dq_neg->numel() > 0;
  TORCH_CHECK(has(negatives) || (have_dq && !need_negatives),
              "gacd_fast.info_nce_backward: negatives are required unless dq_neg is given and no negatives' "
              "gradient is asked for");
  if (have_dq) {
    check_float("dq_neg", *dq_neg);
    TORCH_CHECK(dq_neg->sizes() == query.sizes() && dq_neg->device() == query.device(),
                "gacd_fast.info_nce_backward: dq_neg must be [B, D] on query's device, got ", dq_neg->sizes());
  }
  if (has(negatives)) check_info_nce_inputs(query, positive, *negatives, neg_index, temperature);
  TORCH_CHECK(grad.device() == query.device() && lse.device() == query.device(),
              "gacd_fast.info_nce_backward: grad and lse must be on query's device");
}

}  // namespace gacd_fast
