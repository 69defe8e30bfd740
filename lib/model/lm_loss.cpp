#include "model/lm_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "core/dispatch.h"
#include "core/error.h"
#include "model/lm_loss_math.h"

namespace patch::model {

namespace {

using core::str;

// Each row is summed in double and rounded once: the reference is the CUDA
// kernel's oracle, and a float running sum over a 128K vocabulary drifts by
// about 1e-4 (the kernel's 512 partial sums per row do not).
template <typename T, typename Acc>
void cross_entropy_rows_cpu(at::Tensor& logits, const at::Tensor& targets, bool grad, at::Tensor& loss) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  T* z = logits.data_ptr<T>();
  const int64_t* t = targets.data_ptr<int64_t>();
  Acc* out = loss.data_ptr<Acc>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = z + r * vocab;
      ce::MaxSum<double> a;
      for (int64_t j = 0; j < vocab; ++j) ce::push(a, static_cast<double>(row[j]));
      const double lse = ce::log_sum_exp(a);
      out[r] = static_cast<Acc>(lse - static_cast<double>(row[t[r]]));
      if (!grad) continue;
      for (int64_t j = 0; j < vocab; ++j)
        row[j] = static_cast<T>(ce::logit_grad(static_cast<double>(row[j]), lse, j == t[r]));
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The sum of the chunks' losses; x's gradient made chunk by chunk in forward.
struct LinearCrossEntropy : torch::autograd::Function<LinearCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& targets, int64_t chunk_rows, bool grad) {
    const int64_t n = x.size(0);
    at::Tensor dx = grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
    at::Tensor total = at::zeros({}, x.options().dtype(acc_type(x.scalar_type())));
    for (int64_t begin = 0; begin < n; begin += chunk_rows) {
      const int64_t end = std::min(n, begin + chunk_rows);
      const at::Tensor xc = x.slice(0, begin, end);
      at::Tensor logits = at::linear(xc, w);
      total.add_(cross_entropy_rows_(logits, targets.slice(0, begin, end), grad).sum());
      if (grad) {
        at::Tensor dxc = dx.slice(0, begin, end);
        at::mm_out(dxc, logits, w);
      }
    }
    ctx->save_for_backward({dx});
    return total;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const at::Tensor dx = ctx->get_saved_variables()[0];
    // Scaled in float32 at least: the upstream factor (1/tokens) rounded to
    // bfloat16 would be off by up to 0.4%.
    const at::ScalarType acc = acc_type(dx.scalar_type());
    const at::Tensor g = (dx.to(acc) * grad_out[0].to(acc)).to(dx.scalar_type());
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor cross_entropy_rows_(at::Tensor& logits, const at::Tensor& targets, bool grad) {
  core::check(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy_rows_",
              "expected contiguous logits [rows, vocab]");
  core::check(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "cross_entropy_rows_", str("expected int64 targets [", logits.size(0), "]"));
  const at::Tensor t = targets.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(acc_type(logits.scalar_type())));
  core::dispatch(
      logits, "cross_entropy_rows_", [&] { cuda::cross_entropy_rows_(logits, t, grad, loss); },
      [&] {
        const int64_t vocab = logits.size(1);
        core::check(t.numel() == 0 || (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < vocab),
                    "cross_entropy_rows_", str("expected targets in [0, ", vocab, ")"));
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_rows_", [&] {
          using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          cross_entropy_rows_cpu<scalar_t, Acc>(logits, t, grad, loss);
        });
      });
  return loss;
}

at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& targets,
                                int64_t chunk_rows) {
  core::check(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_cross_entropy",
              "expected x [n, h] and w [vocab, h]");
  core::check(targets.dim() == 1 && targets.size(0) == x.size(0), "linear_cross_entropy",
              str("expected targets [", x.size(0), "]"));
  core::check(!w.requires_grad(), "linear_cross_entropy", "w must not require grad");
  core::check(chunk_rows > 0, "linear_cross_entropy", "expected chunk_rows > 0");
  const bool grad = at::GradMode::is_enabled() && x.requires_grad();
  return LinearCrossEntropy::apply(x, w, targets, chunk_rows, grad);
}

}  // namespace patch::model
