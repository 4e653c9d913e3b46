// CPU InfoNCE, forward and backward, in both negative modes, never holding B x K (or B x M x D).
//
// Notation: q_hat, p_hat, n_hat are the (optionally) L2-normalised rows; scale = 1 / tau;
// s_pos_i = q_hat_i . p_hat_i / tau; s_ik = scale * q_hat_i . n_hat_k; lse_i is the log-sum-exp of
// {s_pos_i} U {s_ik}; loss_i = lse_i - s_pos_i.
//
// Shared bank: the negatives are visited in chunks of a few thousand rows; per chunk one BLAS
// matmul gives the raw scores q_hat @ n_chunk^T, the bank's inverse row norms are applied as a
// column scale (no normalised copy of the bank), and a running max/sum per row (online
// log-sum-exp) carries across chunks. When asked (compute_dq: the bank needs no gradient) the
// forward also accumulates d lse / d q_hat = sum_k softmax_ik * scale * n_hat_k with a second
// matmul per chunk, so backward is a per-row scale and the bank is not needed again.
// neg_index: each row gathers its own negatives on the fly (dot products straight from the bank);
// the negatives' gradient is column-owned through a counting-sort inverse of neg_index, so every
// bank row is written by one thread in a fixed order: no atomics, deterministic.
// Half inputs (bfloat16/float16), shared bank: where the CPU multiplies them natively (see
// half_products) both matmuls take the rows as they are and the query normalised in float32 and
// rounded back, and the scores, softmax sums and gradients accumulate in float32; elsewhere the
// chunks are upcast to float32 first (emulated half products are far slower than float32 ones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"

#include <c10/core/GradMode.h>

namespace gacd_fast {
namespace {

// exp for the softmax weights. float: a branch-free Cephes-style exp (relative error < 1e-7) that
// the compiler vectorises (with -fno-trapping-math); it is used only for arguments <= 0 (scores
// minus their running max), where it matches expf to float precision. double: std::exp.
template <typename T> inline T soft_exp(T x) { return std::exp(x); }
template <> inline float soft_exp<float>(float x) {
  x = x < -87.0f ? -87.0f : x;                       // exp(-87) ~ 1.6e-38: 0 next to the max's 1
  const float t = x * kLog2eF + 12582912.0f;  // + 1.5 * 2^23 rounds to nearest
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  union { int32_t i; float f; } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * two_n.f;
}

// Whether half inputs of dtype t are multiplied in t: where the CPU has the instructions (torch's
// cpuinfo: AVX512-BF16/AMX-BF16 for bfloat16, AVX512-FP16/AMX-FP16 for float16), or as
// GACD_FAST_LOWP_PRODUCTS says ("1" always, "0" never; the same switch as the torch backend's).
bool half_products(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (const char* forced = std::getenv("GACD_FAST_LOWP_PRODUCTS")) {
    if (std::strcmp(forced, "1") == 0) return true;
    if (std::strcmp(forced, "0") == 0) return false;
  }
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [](const char* key) {
    auto it = caps.find(key);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  return t == at::kBFloat16 ? has("avx512_bf16") || has("amx_bf16") : has("avx512_fp16") || has("amx_fp16");
}

// Rows in the accumulation dtype, unit-normalised when asked, with what backward needs.
struct Units {
  at::Tensor xhat;  // [N, D] acc, contiguous
  at::Tensor inv;   // [N] 1 / max(||x||, eps) (ones without normalisation)
  at::Tensor proj;  // [N] bool, ||x|| >= eps (the Jacobian's projection term applies)
};

// Rows in the accumulation dtype, unit-normalised when asked. float32 squares overflow above ~1.8e19
// and a norm itself above ~3.4e38: then the norms and the division are done in double, so a finite
// float row of any magnitude normalises (its inverse norm may then be subnormal in float).
Units unit_rows(const at::Tensor& x, bool normalize) {
  const auto acc = acc_type(x.scalar_type());
  at::Tensor xa = x.to(acc).contiguous();
  if (!normalize) return {xa, at::ones({x.size(0)}, xa.options()), at::Tensor()};
  at::Tensor nrm = at::linalg_vector_norm(xa, 2, at::IntArrayRef{1}, false, c10::nullopt);
  if (xa.scalar_type() == at::kFloat && !at::isfinite(nrm).all().item<bool>()) {
    const at::Tensor n64 = at::linalg_vector_norm(xa, 2, at::IntArrayRef{1}, false, at::kDouble);
    const at::Tensor inv64 = n64.clamp_min(kNormEps).reciprocal();
    return {(xa.to(at::kDouble) * inv64.unsqueeze(1)).to(at::kFloat).contiguous(), inv64.to(at::kFloat),
            n64 >= kNormEps};
  }
  at::Tensor denom = nrm.clamp_min(kNormEps);
  return {(xa / denom.unsqueeze(1)).contiguous(), denom.reciprocal(), nrm >= kNormEps};
}

// d x from d x_hat: inv * (d - [proj] x_hat (x_hat . d)).
at::Tensor unit_backward(const at::Tensor& dxhat, const Units& u) {
  if (!u.proj.defined()) return dxhat;
  at::Tensor dot = (u.xhat * dxhat).sum(1, true);
  dot = at::where(u.proj.unsqueeze(1), dot, at::zeros_like(dot));
  return (dxhat - u.xhat * dot) * u.inv.unsqueeze(1);
}

// Negatives per chunk: keep the [B, c] score block around a few MB.
int64_t chunk_rows(int64_t B, int64_t K) {
  const int64_t c = std::max<int64_t>(256, std::min<int64_t>(8192, (int64_t(1) << 20) / std::max<int64_t>(B, 1)));
  return std::min(c, K);
}

// One chunk of the bank in the accumulation dtype (in its own half dtype when half), its inverse
// norms and column scales.
struct Chunk {
  at::Tensor rows;   // [c, D] contiguous (a view when the bank already is); rows * inv = n_hat
  at::Tensor inv;    // [c] inverse norms in acc (ones without normalisation)
  at::Tensor jac;    // [c] 1 / max(||n||, eps), the Jacobian's scale (= inv unless rows were rescaled)
  at::Tensor proj;   // [c] bool or undefined
  at::Tensor cscale; // [c] scale * inv
};

// half: keep the rows in their half dtype for half products; a chunk with a norm beyond float's
// range is upcast and rescaled like a float one.
Chunk bank_chunk(const at::Tensor& negatives, int64_t c0, int64_t cn, at::ScalarType acc, bool normalize,
                 double scale, bool half = false) {
  Chunk ch;
  const at::Tensor raw = negatives.narrow(0, c0, cn);
  ch.rows = half ? raw.contiguous() : raw.to(acc).contiguous();
  if (normalize) {
    at::Tensor nrm = at::linalg_vector_norm(half ? raw.to(acc) : ch.rows, 2, at::IntArrayRef{1}, false, c10::nullopt);
    if (acc == at::kFloat && !at::isfinite(nrm).all().item<bool>()) {
      // a norm beyond float's range (rows of ~1e38): each row is divided by a power of two near its
      // max |n| (exact), so the scores' products stay finite, and inv grows by the same power
      const at::Tensor r32 = raw.to(acc);
      const at::Tensor n64 = at::linalg_vector_norm(r32, 2, at::IntArrayRef{1}, false, at::kDouble);
      const at::Tensor inv64 = n64.clamp_min(kNormEps).reciprocal();
      const at::Tensor mx = r32.abs().amax(1).to(at::kDouble);
      const at::Tensor p2 = at::where(at::isfinite(mx) & (mx > 0), at::exp2(at::ceil(at::log2(mx))), at::ones_like(mx));
      ch.rows = (r32.to(at::kDouble) / p2.unsqueeze(1)).to(at::kFloat).contiguous();
      ch.inv = (inv64 * p2).to(at::kFloat);
      ch.jac = inv64.to(at::kFloat);
      ch.proj = n64 >= kNormEps;
    } else {
      ch.inv = nrm.clamp_min(kNormEps).reciprocal();
      ch.jac = ch.inv;
      ch.proj = nrm >= kNormEps;
    }
  } else {
    ch.inv = at::ones({cn}, ch.rows.options().dtype(acc));
  }
  ch.cscale = (ch.inv * scale).contiguous();
  return ch;
}

// S = q_hat @ rows^T [B, c] in acc: in the rows' half dtype (qlow: q_hat rounded to it) when qlow
// is defined and the rows are still half, else in acc straight into S.
void chunk_scores(at::Tensor& S, const at::Tensor& qhat, const at::Tensor& qlow, const Chunk& ch) {
  if (qlow.defined() && ch.rows.scalar_type() == qlow.scalar_type()) S.copy_(at::mm(qlow, ch.rows.t()));
  else at::mm_out(S, qhat, ch.rows.t());
}

// out += W @ rows [B, D] (W [B, c] in acc): the product in the rows' dtype.
void add_weighted_rows(at::Tensor& out, const at::Tensor& W, const Chunk& ch) {
  if (ch.rows.scalar_type() == out.scalar_type()) out.addmm_(W, ch.rows);
  else out.add_(at::mm(W.to(ch.rows.scalar_type()), ch.rows));
}

// BLAS called from inside at::parallel_for must stay single-threaded: MKL (torch's x86 BLAS) would
// otherwise start a nested thread team per call, and with spinning OpenMP waits two threads then
// cost several times one. MKL's per-thread setting (its C entry point, by value) is looked up at
// run time; without MKL (other BLAS builds) nothing is changed.
class SerialBlas {
 public:
  SerialBlas() {
    if (auto f = setter()) {
      prev_ = f(1);
      active_ = true;
    }
  }
  ~SerialBlas() {
    if (active_) setter()(prev_);
  }

 private:
  using Setter = int (*)(int);
  static Setter setter() {
    static const Setter f = [] {
      void* sym = nullptr;
      if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, "MKL_Set_Num_Threads_Local");
      if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
      return reinterpret_cast<Setter>(sym);
    }();
    return f;
  }
  int prev_ = 0;
  bool active_ = false;
};

// Contiguous groups of chunks, one per thread: each parallel region spans a whole pass, so no
// barrier per chunk (those cost dearly when the cores are shared). Partial results are merged in
// group order: deterministic for a given thread count.
struct Groups {
  int64_t chunk, nchunks, ngroups;
  int64_t first(int64_t g) const { return g * nchunks / ngroups; }
};

Groups plan_groups(int64_t B, int64_t K) {
  Groups gr;
  gr.chunk = chunk_rows(B, K);
  gr.nchunks = (K + gr.chunk - 1) / gr.chunk;
  gr.ngroups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), gr.nchunks));
  return gr;
}

// shift of torch.logsumexp: the running max, or 0 where it is infinite (so exp(x - shift) of an inf
// score is inf or 0, never the NaN of inf - inf).
template <typename acc_t>
inline acc_t lse_shift(acc_t m) { return std::isinf(m) ? acc_t(0) : m; }

// Running sum rescaled to a non-finite new max m_new (+inf: the sum becomes inf or NaN; -inf: every
// score so far is -inf), with exact exp: the slow path of the online log-sum-exp.
template <typename acc_t>
acc_t inf_sum(acc_t l, acc_t m_old, acc_t m_new, const acc_t* s, int64_t n) {
  const acc_t shift = lse_shift(m_new);
  acc_t sum = l * std::exp(m_old - shift);
  for (int64_t k = 0; k < n; ++k) sum += std::exp(s[k] - shift);
  return sum;
}

// Shared bank, forward. m/l: running max and sum per row, seeded with the positive logit (m = s_pos,
// l = 1). dq (when defined): sum_k exp(s_ik - m_i) * scale * inv_k * n_k, divided by l later.
// qlow: q_hat in the bank's half dtype for half products (else undefined).
template <typename acc_t>
void shared_forward(const Units& q, const at::Tensor& qlow, const at::Tensor& negatives, bool normalize, double scale,
                    acc_t* m, acc_t* l, at::Tensor& dq) {
  const int64_t B = q.xhat.size(0), K = negatives.size(0), D = q.xhat.size(1);
  const Groups gr = plan_groups(B, K);
  const auto opts = q.xhat.options();
  // per group: running max [B], sum [B], and d lse / d q_hat partials [B, D]
  at::Tensor gm = at::full({gr.ngroups, B}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor gl = at::zeros({gr.ngroups, B}, opts);
  at::Tensor gdq = dq.defined() ? at::zeros({gr.ngroups, B, D}, opts) : at::Tensor();
  at::parallel_for(0, gr.ngroups, 1, [&](int64_t g0, int64_t g1) {
    c10::NoGradGuard no_grad;  // OpenMP threads do not inherit the caller's autograd state
    SerialBlas serial;
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor buf = at::empty({B * gr.chunk}, opts);
      acc_t* mg = gm[g].data_ptr<acc_t>();
      acc_t* lg = gl[g].data_ptr<acc_t>();
      at::Tensor dqg = dq.defined() ? gdq[g] : at::Tensor();
      acc_t* dqp = dq.defined() ? dqg.data_ptr<acc_t>() : nullptr;
      for (int64_t ci = gr.first(g); ci < gr.first(g + 1); ++ci) {
        const int64_t c0 = ci * gr.chunk, cn = std::min(gr.chunk, K - c0);
        Chunk ch = bank_chunk(negatives, c0, cn, q.xhat.scalar_type(), normalize, scale, qlow.defined());
        at::Tensor S = buf.narrow(0, 0, B * cn).view({B, cn});
        chunk_scores(S, q.xhat, qlow, ch);
        acc_t* sp = S.data_ptr<acc_t>();
        const acc_t* cs = ch.cscale.data_ptr<acc_t>();
        for (int64_t i = 0; i < B; ++i) {
          acc_t* row = sp + i * cn;
          acc_t mx = -std::numeric_limits<acc_t>::infinity();
          for (int64_t k = 0; k < cn; ++k) {
            const acc_t v = row[k] * cs[k];
            row[k] = v;
            mx = v > mx ? v : mx;
          }
          const acc_t m_new = std::max(mg[i], mx);
          if (!std::isfinite(m_new)) {  // rare: infinite scores (normalize=False with inf rows)
            lg[i] = inf_sum(lg[i], mg[i], m_new, row, cn);
            mg[i] = m_new;
            continue;  // d q is not defined there: dq keeps its value
          }
          const acc_t alpha = std::exp(mg[i] - m_new);  // 0 on the group's first chunk (-inf)
          acc_t sum = 0;
          if (dqp) {
            for (int64_t k = 0; k < cn; ++k) {
              const acc_t e = soft_exp(row[k] - m_new);
              sum += e;
              row[k] = e * cs[k];
            }
            for (int64_t d = 0; d < D; ++d) dqp[i * D + d] *= alpha;
          } else {
            for (int64_t k = 0; k < cn; ++k) sum += soft_exp(row[k] - m_new);
          }
          lg[i] = lg[i] * alpha + sum;
          mg[i] = m_new;
        }
        if (dqp) add_weighted_rows(dqg, S, ch);
      }
    }
  });
  // Merge the groups into the positive-seeded (m, l), in group order.
  const acc_t* gmp = gm.data_ptr<acc_t>();
  const acc_t* glp = gl.data_ptr<acc_t>();
  std::vector<acc_t> w(gr.ngroups);
  acc_t* dqp = dq.defined() ? dq.data_ptr<acc_t>() : nullptr;
  const acc_t* gdqp = dq.defined() ? gdq.data_ptr<acc_t>() : nullptr;
  for (int64_t i = 0; i < B; ++i) {
    acc_t mx = m[i];
    for (int64_t g = 0; g < gr.ngroups; ++g) mx = std::max(mx, gmp[g * B + i]);
    const acc_t shift = lse_shift(mx);
    acc_t sum = l[i] * std::exp(m[i] - shift);
    for (int64_t g = 0; g < gr.ngroups; ++g) {
      w[g] = std::exp(gmp[g * B + i] - shift);
      sum += glp[g * B + i] * w[g];
    }
    m[i] = mx;
    l[i] = sum;
    if (dqp)
      for (int64_t g = 0; g < gr.ngroups; ++g)
        for (int64_t d = 0; d < D; ++d) dqp[i * D + d] += w[g] * gdqp[(g * B + i) * D + d];
  }
}

// Shared bank, backward over the negatives: adds to dqhat (when defined) and writes dn (when defined).
// Each group owns its chunks' rows of dn (column-owned) and a partial d q_hat merged in group order.
template <typename acc_t>
void shared_backward(const Units& q, const at::Tensor& qlow, const at::Tensor& negatives, bool normalize,
                     double scale, const acc_t* lse, const acc_t* g, at::Tensor& dqhat, at::Tensor& dn) {
  const int64_t B = q.xhat.size(0), K = negatives.size(0), D = q.xhat.size(1);
  const Groups gr = plan_groups(B, K);
  const auto opts = q.xhat.options();
  at::Tensor gdq = dqhat.defined() ? at::zeros({gr.ngroups, B, D}, opts) : at::Tensor();
  at::parallel_for(0, gr.ngroups, 1, [&](int64_t g0, int64_t g1) {
    c10::NoGradGuard no_grad;  // OpenMP threads do not inherit the caller's autograd state
    SerialBlas serial;
    for (int64_t grp = g0; grp < g1; ++grp) {
      at::Tensor buf = at::empty({B * gr.chunk}, opts);
      at::Tensor dqg = dqhat.defined() ? gdq[grp] : at::Tensor();
      for (int64_t ci = gr.first(grp); ci < gr.first(grp + 1); ++ci) {
        const int64_t c0 = ci * gr.chunk, cn = std::min(gr.chunk, K - c0);
        Chunk ch = bank_chunk(negatives, c0, cn, q.xhat.scalar_type(), normalize, scale, qlow.defined());
        at::Tensor S = buf.narrow(0, 0, B * cn).view({B, cn});
        chunk_scores(S, q.xhat, qlow, ch);
        acc_t* sp = S.data_ptr<acc_t>();
        const acc_t* cs = ch.cscale.data_ptr<acc_t>();
        // W_ik = g_i * softmax_ik * scale = dL / d(q_hat_i . n_hat_k)
        for (int64_t i = 0; i < B; ++i) {
          const acc_t w = g[i] * static_cast<acc_t>(scale);
          acc_t* row = sp + i * cn;
          for (int64_t k = 0; k < cn; ++k) row[k] = soft_exp(row[k] * cs[k] - lse[i]) * w;
        }
        if (dn.defined()) {
          // [cn, D] d n_hat: this group's rows only
          at::Tensor d = qlow.defined() ? at::mm(S.t().to(qlow.scalar_type()), qlow).to(S.scalar_type())
                                        : at::mm(S.t(), q.xhat);
          if (normalize) {
            at::Tensor nhat = ch.rows * ch.inv.unsqueeze(1);
            at::Tensor dot = (nhat * d).sum(1, true) * ch.proj.unsqueeze(1);
            d = (d - nhat * dot) * ch.jac.unsqueeze(1);
          }
          dn.narrow(0, c0, cn).copy_(d);
        }
        if (dqg.defined()) {
          const acc_t* inv = ch.inv.data_ptr<acc_t>();
          for (int64_t i = 0; i < B; ++i)
            for (int64_t k = 0; k < cn; ++k) sp[i * cn + k] *= inv[k];
          add_weighted_rows(dqg, S, ch);
        }
      }
    }
  });
  if (dqhat.defined()) dqhat.add_(gdq.sum(0));
}

// One bank row's dot with a query row, and the bank row's squared norm (for normalisation).
template <typename scalar_t, typename acc_t>
inline void dot_and_norm(const acc_t* q, const scalar_t* n, int64_t D, bool normalize, acc_t& dot, acc_t& nn) {
  // Eight independent partial sums let the compiler vectorise without reassociation flags.
  acc_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const acc_t x = static_cast<acc_t>(n[d + j]);
      a[j] += q[d + j] * x;
      b[j] += x * x;
    }
  for (; d < D; ++d) {
    const acc_t x = static_cast<acc_t>(n[d]);
    a[0] += q[d] * x;
    b[0] += x * x;
  }
  dot = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  nn = normalize ? ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7])) : acc_t(1);
}

template <typename acc_t>
inline acc_t inv_norm(acc_t nn, bool normalize) {
  return normalize ? acc_t(1) / std::max(std::sqrt(nn), static_cast<acc_t>(kNormEps)) : acc_t(1);
}

// q . n_hat and inv_norm(n) of one bank row (n_hat = n * inv). The fast sums are in acc_t; a row
// whose squared norm or dot overflows them is redone in double, so a finite row of any magnitude
// scores as the reference's overflow-safe normalisation does (inv may then be subnormal).
template <typename scalar_t, typename acc_t>
inline void score_of(const acc_t* q, const scalar_t* n, int64_t D, bool normalize, acc_t& dot_hat, acc_t& inv) {
  acc_t dot, nn;
  dot_and_norm(q, n, D, normalize, dot, nn);
  if (std::isfinite(nn) && std::isfinite(dot)) {
    inv = inv_norm(nn, normalize);
    dot_hat = dot * inv;
    return;
  }
  double dd = 0, ss = 0;
  for (int64_t d = 0; d < D; ++d) {
    dd += double(q[d]) * double(n[d]);
    ss += double(n[d]) * double(n[d]);
  }
  const double iv = normalize ? 1.0 / std::max(std::sqrt(ss), kNormEps) : 1.0;
  dot_hat = static_cast<acc_t>(dd * iv);
  inv = static_cast<acc_t>(iv);
}

// neg_index, forward: per row, scores of its M negatives into a row buffer (M values, not M x D).
template <typename scalar_t, typename acc_t>
void index_forward(const Units& q, const at::Tensor& negatives, const int64_t* idx, int64_t M, bool normalize,
                   double scale, acc_t* m, acc_t* l, at::Tensor& dq) {
  const int64_t B = q.xhat.size(0), D = q.xhat.size(1);
  const acc_t* qp = q.xhat.data_ptr<acc_t>();
  const scalar_t* np = negatives.data_ptr<scalar_t>();
  acc_t* dqp = dq.defined() ? dq.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
    c10::NoGradGuard no_grad;  // OpenMP threads do not inherit the caller's autograd state
    std::vector<acc_t> s(M), w(M);
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* qi = qp + i * D;
      acc_t mx = m[i];
      for (int64_t j = 0; j < M; ++j) {
        acc_t dot_hat, inv;
        score_of(qi, np + idx[i * M + j] * D, D, normalize, dot_hat, inv);
        w[j] = inv * static_cast<acc_t>(scale);
        s[j] = dot_hat * static_cast<acc_t>(scale);
        mx = std::max(mx, s[j]);
      }
      if (!std::isfinite(mx)) {  // rare: infinite scores, torch.logsumexp's rules
        l[i] = inf_sum(l[i], m[i], mx, s.data(), M);
        m[i] = mx;
        continue;  // d q is not defined there
      }
      acc_t sum = l[i] * std::exp(m[i] - mx);
      for (int64_t j = 0; j < M; ++j) sum += soft_exp(s[j] - mx);
      m[i] = mx;
      l[i] = sum;
      if (dqp) {  // unnormalised like the shared mode's: the caller divides by l
        acc_t* di = dqp + i * D;
        for (int64_t j = 0; j < M; ++j) {
          const acc_t c = std::exp(s[j] - mx) * w[j];
          const scalar_t* nk = np + idx[i * M + j] * D;
          for (int64_t d = 0; d < D; ++d) di[d] += c * static_cast<acc_t>(nk[d]);
        }
      }
    }
  });
}

// neg_index, backward: dqhat row-owned; dn column-owned through the inverse index.
template <typename scalar_t, typename acc_t>
void index_backward(const Units& q, const at::Tensor& negatives, const int64_t* idx, int64_t M, bool normalize,
                    double scale, const acc_t* lse, const acc_t* g, at::Tensor& dqhat, at::Tensor& dn) {
  const int64_t B = q.xhat.size(0), D = q.xhat.size(1), K = negatives.size(0);
  const acc_t* qp = q.xhat.data_ptr<acc_t>();
  const scalar_t* np = negatives.data_ptr<scalar_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  if (dqhat.defined()) {
    acc_t* dqp = dqhat.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
      c10::NoGradGuard no_grad;  // OpenMP threads do not inherit the caller's autograd state
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t* qi = qp + i * D;
        acc_t* di = dqp + i * D;
        for (int64_t j = 0; j < M; ++j) {
          const scalar_t* nk = np + idx[i * M + j] * D;
          acc_t dot_hat, inv;
          score_of(qi, nk, D, normalize, dot_hat, inv);
          const acc_t c = g[i] * sc * std::exp(dot_hat * sc - lse[i]) * inv;
          for (int64_t d = 0; d < D; ++d) di[d] += c * static_cast<acc_t>(nk[d]);
        }
      }
    });
  }
  if (!dn.defined()) return;
  // Counting sort of the B*M entries by bank row; entries of one row stay in flat order.
  const int64_t E = B * M;
  std::vector<int64_t> start(K + 1, 0), order(E);
  for (int64_t e = 0; e < E; ++e) ++start[idx[e] + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < E; ++e) order[pos[idx[e]]++] = e;
  }
  scalar_t* dnp = dn.data_ptr<scalar_t>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    c10::NoGradGuard no_grad;  // OpenMP threads do not inherit the caller's autograd state
    std::vector<acc_t> acc(D);
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t* out = dnp + k * D;
      if (start[k] == start[k + 1]) {
        for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(0);
        continue;
      }
      const scalar_t* nk = np + k * D;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      double nn = 0;  // in double: a float row of any finite magnitude has a finite norm
      for (int64_t d = 0; d < D; ++d) nn += double(nk[d]) * double(nk[d]);
      const acc_t inv = static_cast<acc_t>(normalize ? 1.0 / std::max(std::sqrt(nn), kNormEps) : 1.0);
      for (int64_t p = start[k]; p < start[k + 1]; ++p) {
        const int64_t i = order[p] / M;
        const acc_t* qi = qp + i * D;
        acc_t dot, unused;
        dot_and_norm(qi, nk, D, false, dot, unused);
        acc_t dot_hat = dot * inv;
        if (!std::isfinite(dot)) {  // a row of ~1e38: the dot overflows float, its normalised value does not
          double dd = 0;
          for (int64_t d = 0; d < D; ++d) dd += double(qi[d]) * double(nk[d]);
          dot_hat = static_cast<acc_t>(dd * (normalize ? 1.0 / std::max(std::sqrt(nn), kNormEps) : 1.0));
        }
        const acc_t c = g[i] * sc * std::exp(dot_hat * sc - lse[i]);
        for (int64_t d = 0; d < D; ++d) acc[d] += c * qi[d];
      }
      acc_t proj = 0;
      const bool has_proj = normalize && std::sqrt(nn) >= kNormEps;
      if (has_proj)
        for (int64_t d = 0; d < D; ++d) proj += static_cast<acc_t>(nk[d]) * inv * acc[d];
      for (int64_t d = 0; d < D; ++d)
        out[d] = static_cast<scalar_t>(inv * (acc[d] - proj * (static_cast<acc_t>(nk[d]) * inv)));  // n_hat first: no overflow
    }
  });
}

at::Tensor index_as_long(const c10::optional<at::Tensor>& neg_index, int64_t K) {
  at::Tensor idx = neg_index->to(at::kLong).contiguous();
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < K, "gacd_fast.info_nce: neg_index must hold indices in [0, ", K,
                    ") (rows of negatives), got values in [", lo, ", ", hi, "]");
  return idx;
}

at::Tensor s_pos_of(const Units& q, const Units& p, double temperature) {
  return (q.xhat * p.xhat).sum(1) / temperature;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_forward_cpu(const at::Tensor& query,
                                                                    const at::Tensor& positive,
                                                                    const at::Tensor& negatives_in,
                                                                    const c10::optional<at::Tensor>& neg_index,
                                                                    double temperature, bool normalize,
                                                                    bool compute_dq) {
  check_info_nce_inputs(query, positive, negatives_in, neg_index, temperature);
  const double scale = 1.0 / temperature;
  const at::Tensor negatives = negatives_in.contiguous();
  Units q = unit_rows(query, normalize), p = unit_rows(positive, normalize);
  at::Tensor s_pos = s_pos_of(q, p, temperature);
  at::Tensor m = s_pos.clone();  // the positive logit seeds the running max, with sum exp(0) = 1
  at::Tensor l = at::ones_like(s_pos);
  at::Tensor dq = compute_dq ? at::zeros_like(q.xhat) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, negatives.scalar_type(), "info_nce_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (has(neg_index)) {
      at::Tensor idx = index_as_long(neg_index, negatives.size(0));
      index_forward<scalar_t, acc_t>(q, negatives, idx.data_ptr<int64_t>(), idx.size(1), normalize, scale,
                                     m.data_ptr<acc_t>(), l.data_ptr<acc_t>(), dq);
    } else {
      const at::Tensor qlow = half_products(negatives.scalar_type()) ? q.xhat.to(negatives.scalar_type()) : at::Tensor();
      shared_forward<acc_t>(q, qlow, negatives, normalize, scale, m.data_ptr<acc_t>(), l.data_ptr<acc_t>(), dq);
    }
  });
  at::Tensor lse = m + l.log();
  at::Tensor loss = lse - s_pos;
  if (compute_dq) dq.div_(l.unsqueeze(1));  // sum_k exp(s_ik - m_i) ... / l_i = softmax weights
  else dq = at::empty({0}, s_pos.options());
  return {loss, lse, dq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& positive,
    const c10::optional<at::Tensor>& negatives_in, const c10::optional<at::Tensor>& neg_index, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& dq_neg, double temperature, bool normalize, bool need_q, bool need_p,
    bool need_n) {
  check_info_nce_backward(grad, query, positive, negatives_in, neg_index, lse_in, dq_neg, temperature, need_n);
  const double scale = 1.0 / temperature;
  const auto acc = acc_type(query.scalar_type());
  Units q = unit_rows(query, normalize), p = unit_rows(positive, normalize);
  const at::Tensor g = grad.to(acc).contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const bool have_dq = has(dq_neg) && dq_neg->numel() > 0;
  at::Tensor dqhat, dn;
  if (need_q) dqhat = have_dq ? (dq_neg->to(acc) * g.unsqueeze(1)).contiguous() : at::zeros_like(q.xhat);
  at::Tensor negatives = has(negatives_in) ? negatives_in->contiguous() : at::Tensor();
  if (need_n) dn = at::empty_like(negatives);
  at::Tensor dqhat_pass = (need_q && !have_dq) ? dqhat : at::Tensor();
  if (dqhat_pass.defined() || dn.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, negatives.scalar_type(), "info_nce_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      if (has(neg_index)) {
        at::Tensor idx = index_as_long(neg_index, negatives.size(0));
        index_backward<scalar_t, acc_t>(q, negatives, idx.data_ptr<int64_t>(), idx.size(1), normalize, scale,
                                        lse.data_ptr<acc_t>(), g.data_ptr<acc_t>(), dqhat_pass, dn);
      } else {
        const at::Tensor qlow =
            half_products(negatives.scalar_type()) ? q.xhat.to(negatives.scalar_type()) : at::Tensor();
        shared_backward<acc_t>(q, qlow, negatives, normalize, scale, lse.data_ptr<acc_t>(), g.data_ptr<acc_t>(),
                               dqhat_pass, dn);
      }
    });
  }
  // The positive logit: d loss_i / d s_pos_i = softmax_pos_i - 1.
  at::Tensor s_pos = s_pos_of(q, p, temperature);
  at::Tensor c = (g * ((s_pos - lse).exp() - 1.0) * scale).unsqueeze(1);
  at::Tensor dq, dp, dnn;
  if (need_q) dq = unit_backward(dqhat + c * p.xhat, q).to(query.scalar_type());
  else dq = at::empty({0}, query.options());
  if (need_p) dp = unit_backward(c * q.xhat, p).to(positive.scalar_type());
  else dp = at::empty({0}, positive.options());
  dnn = need_n ? dn : at::empty({0}, query.options());
  return {dq, dp, dnn};
}

}  // namespace
}  // namespace gacd_fast

TORCH_LIBRARY_IMPL(gacd_fast, CPU, m) {
  m.impl("info_nce_forward", &gacd_fast::info_nce_forward_cpu);
  m.impl("info_nce_backward", &gacd_fast::info_nce_backward_cpu);
}
