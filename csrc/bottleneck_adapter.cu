// CUDA C++ forward of peftops::bottleneck_adapter (the `cuda` backend), registered as the op
// peftops::bottleneck_adapter_fwd_cuda and called by peftops/cuda_ext.py.
//
//   h = x Wd^T + bd        (T, r), returned in float32 for the backward to save
//   y = res + s (act(h) Wu^T + bu)
//
// One thread block takes ROWS rows at a time: it stages them in shared memory as float (x is
// read from global memory once; the serial residual comes from the staged copy), computes
// h with one warp per rank column (warp-shuffle reductions over d), applies the activation,
// then writes y with threads striding over d. Weights are re-read per row block from L2
// (r x d each: 0.5 MB at r=64, d=4096). This is the plain CUDA-core version: the Triton
// kernel (tensor cores) is expected to be faster on Hopper, and `auto` chooses between them
// from measurements, not from this comment.

// Only device-independent torch headers: the caller (peftops/cuda_ext.py) passes the current
// stream and has made x's device current, so this file needs nothing from c10/cuda, whose
// generated headers CPU-only torch wheels lack (the CI compile check builds this file there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace peftops {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Activation codes as in peftops/kernels/common.py (ACT_CODES): relu, gelu (erf), gelu_tanh, silu.
__device__ __forceinline__ float activate(float h, int code) {
  switch (code) {
    case 0: return h < 0.0f ? 0.0f : h;  // not fmaxf: it turns NaN into 0, torch.relu keeps it
    case 1: return 0.5f * h * (1.0f + erff(h * 0.7071067811865476f));
    case 2: return 0.5f * h * (1.0f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
    default: return h / (1.0f + expf(-h));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void adapter_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ wd, const T* __restrict__ bd, const T* __restrict__ wu,
    const T* __restrict__ bu, const T* __restrict__ res, T* __restrict__ y, float* __restrict__ h_out,
    int64_t rows_total, int64_t d, int64_t r, int64_t rows_per_block, float scale, int act_code) {
  extern __shared__ float smem[];
  float* xs = smem;                           // rows_per_block x d
  float* as = smem + rows_per_block * d;      // rows_per_block x r
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;

  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows_total;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t rows = min(rows_per_block, rows_total - first);
    for (int64_t i = threadIdx.x; i < rows * d; i += blockDim.x) xs[i] = to_float(x[first * d + i]);
    __syncthreads();

    for (int64_t task = warp; task < rows * r; task += warps) {  // one (row, rank) dot product per warp
      const int64_t row = task / r, k = task % r;
      float acc = 0.0f;
      for (int64_t j = lane; j < d; j += 32) acc += xs[row * d + j] * to_float(wd[k * d + j]);
      acc = warp_sum(acc);
      if (lane == 0) {
        if (bd != nullptr) acc += to_float(bd[k]);
        h_out[(first + row) * r + k] = acc;
        // Rounded to the input dtype, as the Triton kernel feeds the activation to its GEMM.
        as[row * r + k] = to_float(from_float<T>(activate(acc, act_code)));
      }
    }
    __syncthreads();

    for (int64_t i = threadIdx.x; i < rows * d; i += blockDim.x) {
      const int64_t row = i / d, j = i % d;
      float z = 0.0f;
      for (int64_t k = 0; k < r; ++k) z += as[row * r + k] * to_float(wu[j * r + k]);
      if (bu != nullptr) z += to_float(bu[j]);
      const float base = res == nullptr ? xs[i] : to_float(res[first * d + i]);
      y[first * d + i] = from_float<T>(base + scale * z);
    }
    __syncthreads();
  }
}

template <typename T>
const T* maybe_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd_cuda(
    const at::Tensor& x, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& residual,
    int64_t activation, double scale, int64_t stream_handle) {
  // The Python wrapper validates shapes and dtypes; these guard the memory layout it promises.
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "bottleneck_adapter_fwd_cuda: x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(down_weight.is_contiguous() && up_weight.is_contiguous(), "bottleneck_adapter_fwd_cuda: weights must be contiguous");
  TORCH_CHECK(!residual.has_value() || residual->is_contiguous(), "bottleneck_adapter_fwd_cuda: residual must be contiguous");
  TORCH_CHECK(activation >= 0 && activation <= 3, "bottleneck_adapter_fwd_cuda: activation code must be 0..3, got ", activation);
  const int64_t rows = x.size(0), d = x.size(1), r = down_weight.size(0);
  at::Tensor y = at::empty({rows, d}, x.options());
  at::Tensor h = at::empty({rows, r}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, h};

  // Stage as many rows as fit in 48 KB of shared memory (at least one; d = 16384 needs 64 KB,
  // which the opt-in below allows on sm_70 and later).
  const int64_t per_row = (d + r) * int64_t(sizeof(float));
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(8, (48 * 1024) / per_row));
  const size_t smem = size_t(rows_per_block * per_row);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, 65535);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);

  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = adapter_forward_kernel<T>;
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      TORCH_CHECK(err == cudaSuccess, "bottleneck_adapter_fwd_cuda: ", cudaGetErrorString(err));
    }
    kernel<<<blocks, threads, smem, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(down_weight.data_ptr()),
        maybe_ptr<T>(down_bias), reinterpret_cast<const T*>(up_weight.data_ptr()), maybe_ptr<T>(up_bias),
        maybe_ptr<T>(residual), reinterpret_cast<T*>(y.data_ptr()), h.data_ptr<float>(), rows, d, r, rows_per_block,
        float(scale), int(activation));
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "bottleneck_adapter_fwd_cuda: launch failed: ", cudaGetErrorString(err));
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(__half{}); break;
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "bottleneck_adapter_fwd_cuda: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return {y, h};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def(
      "bottleneck_adapter_fwd_cuda(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
      "Tensor? up_bias, Tensor? residual, int activation, float scale, int stream) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) { m.impl("bottleneck_adapter_fwd_cuda", &bottleneck_adapter_fwd_cuda); }

}  // namespace peftops
