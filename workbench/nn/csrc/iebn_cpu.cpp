// Fused training-mode IEBN for contiguous NCHW CPU tensors: one autograd-free forward and one
// backward, each a reduction sweep and a write sweep over the activation, with all the per-(sample,
// channel) and per-channel arithmetic done in double in between. The Python implementation of the
// same math (workbench/nn/functional.py) issues ~55 small ATen calls per step; at CIFAR-sized
// activations their dispatch cost is larger than the memory traffic. The math and symbols follow
// functional.py's _moments_forward/_norm_forward/_norm_backward/_moments_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Planes per parallel task: keep small activations on one thread (spawning costs more than it saves).
int64_t grain(int64_t plane) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane)); }

template <typename T>
double plane_sum(const T* p, int64_t m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += p[i];
  return static_cast<double>(s);
}

template <typename T>
double plane_centred_sq(const T* p, int64_t m, T centre) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) {
    T d = p[i] - centre;
    s += d * d;
  }
  return static_cast<double>(s);
}

template <typename T>
void plane_affine(const T* x, T* y, int64_t m, T scale, T shift) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) y[i] = x[i] * scale + shift;
}

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, " must be a contiguous CPU tensor");
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& attn_weight, const at::Tensor& attn_bias, double eps) {
  const int64_t n = x.size(0), c = x.size(1), m = x.size(2) * x.size(3), planes = n * c;
  auto y = at::empty_like(x);
  auto opts = x.options();
  auto gap = at::empty({n, c}, opts), gate = at::empty({n, c}, opts), scale = at::empty({n, c}, opts);
  auto mean = at::empty({c}, opts), var = at::empty({c}, opts), rstd = at::empty({c}, opts);
  std::vector<double> pmean(planes), pm2(planes);
  const T* px = x.data_ptr<T>();
  at::parallel_for(0, planes, grain(m), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const T* xp = px + p * m;
      double mu = plane_sum(xp, m) / m;
      pmean[p] = mu;
      // Centred per plane, then pooled by the law of total variance: no E[x^2] - E[x]^2 cancellation.
      pm2[p] = plane_centred_sq(xp, m, static_cast<T>(mu));
    }
  });
  const T *w = weight.data_ptr<T>(), *bi = bias.data_ptr<T>();
  const T *aw = attn_weight.data_ptr<T>(), *ab = attn_bias.data_ptr<T>();
  T *pgap = gap.data_ptr<T>(), *pgate = gate.data_ptr<T>(), *pscale = scale.data_ptr<T>();
  T *pmu = mean.data_ptr<T>(), *pvar = var.data_ptr<T>(), *prstd = rstd.data_ptr<T>();
  std::vector<T> shift(planes);
  for (int64_t ch = 0; ch < c; ++ch) {
    double mu = 0;
    for (int64_t i = 0; i < n; ++i) mu += pmean[i * c + ch];
    mu /= n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      double d = pmean[i * c + ch] - mu;
      ss += pm2[i * c + ch] + m * d * d;
    }
    const double v = ss / (static_cast<double>(n) * m);
    const double r = 1.0 / std::sqrt(v + eps);
    pmu[ch] = static_cast<T>(mu);
    pvar[ch] = static_cast<T>(v);
    prstd[ch] = static_cast<T>(r);
    const double gr = static_cast<double>(w[ch]) * r;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = i * c + ch;
      const double g = 1.0 / (1.0 + std::exp(-(static_cast<double>(aw[ch]) * pmean[p] + ab[ch])));
      const double s = gr * g;
      pgap[p] = static_cast<T>(pmean[p]);
      pgate[p] = static_cast<T>(g);
      pscale[p] = static_cast<T>(s);
      shift[p] = static_cast<T>(static_cast<double>(bi[ch]) - mu * s);
    }
  }
  T* py = y.data_ptr<T>();
  at::parallel_for(0, planes, grain(m), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) plane_affine(px + p * m, py + p * m, m, pscale[p], shift[p]);
  });
  return {y, gap, mean, var, rstd, gate, scale};
}

std::vector<at::Tensor> iebn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& attn_weight, const at::Tensor& attn_bias, double eps) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, C, H, W)");
  for (const auto* t : {&weight, &bias, &attn_weight, &attn_bias}) {
    check(*t, "parameters");
    TORCH_CHECK(t->numel() == x.size(1) && t->scalar_type() == x.scalar_type(), "parameters must be (C,) of x's dtype");
  }
  if (x.scalar_type() == at::kDouble) return forward_impl<double>(x, weight, bias, attn_weight, attn_bias, eps);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or float64");
  return forward_impl<float>(x, weight, bias, attn_weight, attn_bias, eps);
}

// dx = dy * s[n,c] + B[c] * x + A[n,c]: the moments are affine or quadratic in x (functional.py).
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gap,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                      const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& attn_weight,
                                      bool need_x) {
  const int64_t n = x.size(0), c = x.size(1), m = x.size(2) * x.size(3), planes = n * c;
  const T *px = x.data_ptr<T>(), *pg = grad_out.data_ptr<T>();
  const T *pmu = mean.data_ptr<T>(), *pscale = scale.data_ptr<T>(), *pgate = gate.data_ptr<T>();
  const T *pgap = gap.data_ptr<T>(), *prstd = rstd.data_ptr<T>(), *w = weight.data_ptr<T>();
  const T* aw = attn_weight.data_ptr<T>();
  std::vector<double> sum_g(planes), sum_gxc(planes);
  at::parallel_for(0, planes, grain(m), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const T *xp = px + p * m, *gp = pg + p * m;
      const T mu = pmu[p % c];
      T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = 0; i < m; ++i) {
        sg += gp[i];
        sgx += gp[i] * (xp[i] - mu);  // centred: no cancellation against sum(dy) * mean
      }
      sum_g[p] = sg;
      sum_gxc[p] = sgx;
    }
  });
  auto opts = x.options();
  auto gw = at::empty({c}, opts), gb = at::empty({c}, opts), gaw = at::empty({c}, opts), gab = at::empty({c}, opts);
  T *pgw = gw.data_ptr<T>(), *pgb = gb.data_ptr<T>(), *pgaw = gaw.data_ptr<T>(), *pgab = gab.data_ptr<T>();
  std::vector<T> coef_x(c), coef_c(planes);
  const double count = static_cast<double>(n) * m;
  for (int64_t ch = 0; ch < c; ++ch) {
    const double r = prstd[ch], gr = static_cast<double>(w[ch]) * r, a = aw[ch];
    double g_b = 0, g_mu = 0, g_gr = 0, g_aw = 0, g_ab = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = i * c + ch;
      const double gate_p = pgate[p];
      g_b += sum_g[p];
      g_mu -= sum_g[p] * pscale[p];
      g_gr += sum_gxc[p] * gate_p;
      const double g_z = sum_gxc[p] * gr * gate_p * (1.0 - gate_p);
      g_aw += g_z * pgap[p];
      g_ab += g_z;
      coef_c[p] = static_cast<T>(g_z * a / m);  // the gate's gradient w.r.t. this plane's mean
    }
    const double g_var = g_gr * gr * r * r * -0.5;  // d rstd / d var = -rstd^3 / 2
    pgw[ch] = static_cast<T>(g_gr * r);
    pgb[ch] = static_cast<T>(g_b);
    pgaw[ch] = static_cast<T>(g_aw);
    pgab[ch] = static_cast<T>(g_ab);
    const double b_c = 2.0 * g_var / count;
    const double a_c = (g_mu - 2.0 * g_var * static_cast<double>(pmu[ch])) / count;
    coef_x[ch] = static_cast<T>(b_c);
    for (int64_t i = 0; i < n; ++i) coef_c[i * c + ch] = static_cast<T>(coef_c[i * c + ch] + a_c);
  }
  at::Tensor gx = need_x ? at::empty_like(x) : at::empty({0}, opts);
  if (need_x) {
    T* pgx = gx.data_ptr<T>();
    at::parallel_for(0, planes, grain(m), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const T *xp = px + p * m, *gp = pg + p * m;
        T* op = pgx + p * m;
        const T s = pscale[p], bx = coef_x[p % c], ac = coef_c[p];
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) op[i] = gp[i] * s + xp[i] * bx + ac;
      }
    });
  }
  return {gx, gw, gb, gaw, gab};
}

std::vector<at::Tensor> iebn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gap,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                      const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& attn_weight,
                                      bool need_x) {
  check(grad_out, "grad_out");
  check(x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must match x");
  if (x.scalar_type() == at::kDouble)
    return backward_impl<double>(grad_out, x, gap, mean, rstd, weight, gate, scale, attn_weight, need_x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or float64");
  return backward_impl<float>(grad_out, x, gap, mean, rstd, weight, gate, scale, attn_weight, need_x);
}

}  // namespace

TORCH_LIBRARY(workbench_iebn, lib) {
  lib.def("forward(Tensor x, Tensor weight, Tensor bias, Tensor attn_weight, Tensor attn_bias, float eps) -> Tensor[]");
  lib.def(
      "backward(Tensor grad_out, Tensor x, Tensor gap, Tensor mean, Tensor rstd, Tensor weight, Tensor gate, "
      "Tensor scale, Tensor attn_weight, bool need_x) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(workbench_iebn, CPU, lib) {
  lib.impl("forward", &iebn_forward);
  lib.impl("backward", &iebn_backward);
}
