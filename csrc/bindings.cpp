// The one Python module of the extension (rlhf_fast._C): argument checks, output allocation and the
// dispatch to the CPU or CUDA launchers declared in gae.h. The CUDA branch exists only when setup.py
// builds with CUDA (it defines RLHF_FAST_WITH_CUDA); otherwise CUDA tensors get a clear error.
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "gae.h"

#ifdef RLHF_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

// Every per-token tensor: fp32, contiguous, (B, T) like `like`, on the device of `like`.
void check_bt(const char* op, const char* name, const at::Tensor& x, const at::Tensor& like) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be 2-D (B, T), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(),
                    " (that of the first argument), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == like.device(), op, ": ", name, " is on ", x.device(),
                    " but the first argument is on ", like.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), op, ": tensors on ", x.device(),
                    " are not supported (CPU or CUDA)");
#ifndef RLHF_FAST_WITH_CUDA
  TORCH_CHECK(!x.device().is_cuda(), op,
              ": rlhf_fast._C was built without CUDA; rebuild with a CUDA build of torch and nvcc present");
#endif
}

#ifdef RLHF_FAST_WITH_CUDA
void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err ? err : "");
}
#endif

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const at::Tensor& mask, double gamma, double lam) {
  const char* op = "gae";
  check_bt(op, "rewards", rewards, rewards);
  check_bt(op, "values", values, rewards);
  check_bt(op, "mask", mask, rewards);
  check_device(op, rewards);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto adv = at::empty_like(rewards);     // (B, T)
  auto returns = at::empty_like(rewards);  // (B, T)
  if (rewards.numel() == 0) return {adv, returns};
  if (rewards.device().is_cpu()) {
    pybind11::gil_scoped_release no_gil;
    rlhf_fast::gae_cpu(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(),
                       adv.data_ptr<float>(), returns.data_ptr<float>(), B, T, static_cast<float>(gamma),
                       static_cast<float>(lam));
  }
#ifdef RLHF_FAST_WITH_CUDA
  else {
    const c10::cuda::CUDAGuard guard(rewards.device());
    check_launch(op, rlhf_fast::gae_cuda(rewards.data_ptr<float>(), values.data_ptr<float>(),
                                         mask.data_ptr<float>(), adv.data_ptr<float>(),
                                         returns.data_ptr<float>(), B, T, static_cast<float>(gamma),
                                         static_cast<float>(lam), c10::cuda::getCurrentCUDAStream().stream()));
  }
#endif
  return {adv, returns};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_penalized_gae(const at::Tensor& logprobs,
                                                                const at::Tensor& ref_logprobs,
                                                                const at::Tensor& values,
                                                                const at::Tensor& scores, const at::Tensor& mask,
                                                                double kl_coef, double gamma, double lam,
                                                                int64_t estimator) {
  const char* op = "kl_penalized_gae";
  check_bt(op, "logprobs", logprobs, logprobs);
  check_bt(op, "ref_logprobs", ref_logprobs, logprobs);
  check_bt(op, "values", values, logprobs);
  check_bt(op, "mask", mask, logprobs);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, op, ": scores must be float32, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == logprobs.size(0), op, ": scores must have shape (",
                    logprobs.size(0), ",) (one per row of logprobs), got ", scores.sizes());
  TORCH_CHECK_VALUE(scores.device() == logprobs.device(), op, ": scores is on ", scores.device(),
                    " but logprobs is on ", logprobs.device());
  TORCH_CHECK_VALUE(scores.is_contiguous(), op, ": scores must be contiguous");
  TORCH_CHECK_VALUE(estimator >= 0 && estimator <= 3, op,
                    ": estimator must be 0 (k1), 1 (k2), 2 (k3) or 3 (abs), got ", estimator);
  check_device(op, logprobs);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  auto adv = at::empty_like(logprobs);      // (B, T)
  auto returns = at::empty_like(logprobs);  // (B, T)
  auto rewards = at::empty_like(logprobs);  // (B, T)
  if (logprobs.numel() == 0) return {adv, returns, rewards};
  if (logprobs.device().is_cpu()) {
    pybind11::gil_scoped_release no_gil;
    rlhf_fast::kl_penalized_gae_cpu(logprobs.data_ptr<float>(), ref_logprobs.data_ptr<float>(),
                                    values.data_ptr<float>(), scores.data_ptr<float>(), mask.data_ptr<float>(),
                                    adv.data_ptr<float>(), returns.data_ptr<float>(), rewards.data_ptr<float>(),
                                    B, T, static_cast<float>(kl_coef), static_cast<float>(gamma),
                                    static_cast<float>(lam), static_cast<int>(estimator));
  }
#ifdef RLHF_FAST_WITH_CUDA
  else {
    const c10::cuda::CUDAGuard guard(logprobs.device());
    check_launch(op, rlhf_fast::kl_penalized_gae_cuda(
                         logprobs.data_ptr<float>(), ref_logprobs.data_ptr<float>(), values.data_ptr<float>(),
                         scores.data_ptr<float>(), mask.data_ptr<float>(), adv.data_ptr<float>(),
                         returns.data_ptr<float>(), rewards.data_ptr<float>(), B, T,
                         static_cast<float>(kl_coef), static_cast<float>(gamma), static_cast<float>(lam),
                         static_cast<int>(estimator), c10::cuda::getCurrentCUDAStream().stream()));
  }
#endif
  return {adv, returns, rewards};
}

bool with_cuda() {
#ifdef RLHF_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast native kernels: GAE and KL-penalised GAE for CPU and (when built with it) CUDA tensors";
  m.def("gae", &gae, pybind11::arg("rewards"), pybind11::arg("values"), pybind11::arg("mask"),
        pybind11::arg("gamma"), pybind11::arg("lam"),
        "gae(rewards, values, mask, gamma, lam) -> (advantages, returns); fp32 contiguous (B, T) on one device");
  m.def("kl_penalized_gae", &kl_penalized_gae, pybind11::arg("logprobs"), pybind11::arg("ref_logprobs"),
        pybind11::arg("values"), pybind11::arg("scores"), pybind11::arg("mask"), pybind11::arg("kl_coef"),
        pybind11::arg("gamma"), pybind11::arg("lam"), pybind11::arg("estimator"),
        "kl_penalized_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator) -> "
        "(advantages, returns, rewards); estimator 0=k1, 1=k2, 2=k3, 3=abs");
  m.def("with_cuda", &with_cuda, "True when the extension was built with its CUDA kernels");
}
