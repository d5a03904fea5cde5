// Argument checks shared by every op family. The Python layer validates too, but a kernel
// reached through torch.ops must never crash on a bad call: every check is a TORCH_CHECK,
// which raises a RuntimeError naming the op (`fn`) and the argument.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mmk {

// A one-element CPU tensor (scale, bias, ...) read as a double.
inline double scalar_arg(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == 1, fn, ": ", name,
              " must be a tensor with exactly one element, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  return t.item<double>();
}

// An optional one-element tensor (`Tensor?` in the schema); `fallback` when absent.
inline double optional_scalar_arg(const std::optional<at::Tensor>& t, double fallback,
                                  const char* fn, const char* name) {
  return t.has_value() && t->defined() ? scalar_arg(*t, fn, name) : fallback;
}

// A per-row or per-column vector argument (lse, weights) as a contiguous tensor of `dtype`.
inline at::Tensor vector_arg(const at::Tensor& v, int64_t len, at::ScalarType dtype, const char* fn,
                             const char* name) {
  TORCH_CHECK(v.defined(), fn, ": ", name, " must be a tensor");
  TORCH_CHECK(v.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, fn, ": ", name, " must have shape (", len,
              ",), got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), fn, ": ", name,
              " must be floating point, got ", v.scalar_type());
  return v.detach().to(dtype).contiguous();
}

}  // namespace mmk
