// CUDA C++ gathered decode forward of peftops::multi_lora_linear (the `cuda` backend), called by
// peftops/cuda_ext.py. For token t of adapter a = ids[t] (ids outside [0, N) are base-only):
//
//   multi_lora_gather_down_cuda   u[t, :]  = s_a * x[t] A_a[:r_a]^T      (T, r_max), zeros past r_a
//   multi_lora_gather_up_cuda     y[t, :] += u[t, :r_a] B_a[:, :r_a]^T   in place, y = x W^T + b
//                                                                        computed by the caller
//
// A decode step is memory-bound: each token's adapter is read once, and nothing else. Loads
// are 16 bytes wide (8 half / bf16 values, or 4 floats); rows of A and B past a slot's rank
// r_a are never read, so a rank-8 adapter in a rank-64 slot moves rank-8 bytes.
//
// down: one block per token, one warp per rank row (rows r, r + warps, ...): the warp reads
//   the row of A and x[t] in 16-byte vectors, lane-strided, and reduces with shuffles.
// up:   one block per (token, 256-column tile), one thread per output column: the thread reads
//   its column's r_a contiguous values of B_a (B is (N, out, r_max), so a column's ranks are
//   adjacent and neighbouring threads read neighbouring 16-byte vectors), u[t] comes from
//   shared memory.
//
// Device-independent torch headers only (csrc/README.md): the wrapper passes the current stream
// and has made the device current, so this compiles against a CPU-only torch too (CI's check).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace peftops {
namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: VEC values.
template <typename T> struct Vec { static constexpr int n = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ float dot16(const T* __restrict__ a, const T* __restrict__ b) {
  // Both 16-byte aligned (the wrapper checks strides and base pointers).
  const uint4 va = *reinterpret_cast<const uint4*>(a);
  const uint4 vb = *reinterpret_cast<const uint4*>(b);
  const T* pa = reinterpret_cast<const T*>(&va);
  const T* pb = reinterpret_cast<const T*>(&vb);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i) acc += to_f(pa[i]) * to_f(pb[i]);
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int64_t adapter_of(const int64_t* ids, int64_t t, int64_t n_adapters) {
  const int64_t a = ids[t];
  return (a >= 0 && a < n_adapters) ? a : -1;
}

template <typename T>
__global__ void gather_down_kernel(const T* __restrict__ x, const T* __restrict__ A, const float* __restrict__ scales,
                                   const int32_t* __restrict__ ranks, const int64_t* __restrict__ ids,
                                   T* __restrict__ u, int64_t K, int64_t r_max, int64_t n_adapters) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t a = adapter_of(ids, t, n_adapters);
  const int64_t rank = a < 0 ? 0 : (ranks != nullptr ? min(int64_t(ranks[a]), r_max) : r_max);
  const float s = a < 0 ? 0.0f : scales[a];
  constexpr int V = Vec<T>::n;
  const T* xr = x + t * K;
  for (int64_t r = warp; r < r_max; r += warps) {
    float acc = 0.0f;
    if (r < rank) {
      const T* ar = A + (a * r_max + r) * K;
      for (int64_t k = int64_t(lane) * V; k < K; k += 32 * V) acc += dot16(xr + k, ar + k);
      acc = warp_sum(acc);
    }
    if (lane == 0) u[t * r_max + r] = from_f<T>(acc * s);
  }
}

template <typename T>
__global__ void gather_up_kernel(T* __restrict__ y, const T* __restrict__ u, const T* __restrict__ B,
                                 const int32_t* __restrict__ ranks, const int64_t* __restrict__ ids, int64_t N,
                                 int64_t r_max, int64_t n_adapters) {
  extern __shared__ float us[];  // r_max floats: this token's u
  const int64_t t = blockIdx.y;
  const int64_t a = adapter_of(ids, t, n_adapters);
  if (a < 0) return;  // base-only row: y is already x W^T + b
  const int64_t rank = ranks != nullptr ? min(int64_t(ranks[a]), r_max) : r_max;
  for (int64_t r = threadIdx.x; r < r_max; r += blockDim.x) us[r] = r < rank ? to_f(u[t * r_max + r]) : 0.0f;
  __syncthreads();
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  constexpr int V = Vec<T>::n;
  const T* br = B + (a * N + n) * r_max;
  float acc = 0.0f;
  for (int64_t r = 0; r < rank; r += V) {  // r_max is a multiple of V: a vector never leaves the row
    const uint4 vb = *reinterpret_cast<const uint4*>(br + r);
    const T* pb = reinterpret_cast<const T*>(&vb);
#pragma unroll
    // Past the rank (the last vector of a rank that is not a multiple of V) the slot's values
    // are not the adapter's: skipped, not multiplied by 0 (0 * NaN is NaN).
    for (int i = 0; i < V; ++i) acc += r + i < rank ? to_f(pb[i]) * us[r + i] : 0.0f;
  }
  y[t * N + n] = from_f<T>(to_f(y[t * N + n]) + acc);
}

const int32_t* ranks_ptr(const std::optional<at::Tensor>& ranks) {
  return ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
}

void check_common(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), op, ": ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name, " must be 16-byte aligned");
}

template <typename F> void dispatch(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", dtype);
  }
}

at::Tensor multi_lora_gather_down_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& ranks, const at::Tensor& ids,
                                       int64_t stream_handle) {
  const char* op = "multi_lora_gather_down_cuda";
  // The Python wrapper validates shapes and dtypes; these guard the layout the kernel assumes.
  check_common(op, x, "x");
  check_common(op, lora_a, "lora_a");
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_a.size(2) == x.size(1), op, ": shapes x (T, K), lora_a (N, r, K)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && ids.scalar_type() == at::kLong, op, ": scales float32, ids int64");
  TORCH_CHECK(!ranks.has_value() || ranks->scalar_type() == at::kInt, op, ": ranks int32");
  const int64_t T = x.size(0), K = x.size(1), n_adapters = lora_a.size(0), r_max = lora_a.size(1);
  TORCH_CHECK(K % (16 / x.element_size()) == 0, op, ": K must be a multiple of a 16-byte vector, got ", K);
  at::Tensor u = at::empty({T, r_max}, x.options());
  if (T == 0) return u;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch(op, x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    gather_down_kernel<T_><<<T, 256, 0, stream>>>(
        reinterpret_cast<const T_*>(x.data_ptr()), reinterpret_cast<const T_*>(lora_a.data_ptr()),
        scales.data_ptr<float>(), ranks_ptr(ranks), ids.data_ptr<int64_t>(), reinterpret_cast<T_*>(u.data_ptr()), K,
        r_max, n_adapters);
  });
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(err));
  return u;
}

void multi_lora_gather_up_cuda(at::Tensor& y, const at::Tensor& u, const at::Tensor& lora_b,
                               const std::optional<at::Tensor>& ranks, const at::Tensor& ids, int64_t stream_handle) {
  const char* op = "multi_lora_gather_up_cuda";
  check_common(op, y, "y");
  check_common(op, u, "u");
  check_common(op, lora_b, "lora_b");
  TORCH_CHECK(y.dim() == 2 && lora_b.dim() == 3 && lora_b.size(1) == y.size(1) && u.size(1) == lora_b.size(2), op,
              ": shapes y (T, N), u (T, r), lora_b (N_adapters, N, r)");
  TORCH_CHECK(y.scalar_type() == u.scalar_type() && y.scalar_type() == lora_b.scalar_type(), op, ": one dtype");
  const int64_t T = y.size(0), N = y.size(1), n_adapters = lora_b.size(0), r_max = lora_b.size(2);
  TORCH_CHECK(r_max % (16 / y.element_size()) == 0, op, ": r_max must be a multiple of a 16-byte vector, got ", r_max);
  if (T == 0 || N == 0) return;
  const int threads = 256;
  const dim3 grid(unsigned((N + threads - 1) / threads), unsigned(T));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch(op, y.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    gather_up_kernel<T_><<<grid, threads, size_t(r_max) * sizeof(float), stream>>>(
        reinterpret_cast<T_*>(y.data_ptr()), reinterpret_cast<const T_*>(u.data_ptr()),
        reinterpret_cast<const T_*>(lora_b.data_ptr()), ranks_ptr(ranks), ids.data_ptr<int64_t>(), N, r_max,
        n_adapters);
  });
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def(
      "multi_lora_gather_down_cuda(Tensor x, Tensor lora_a, Tensor scales, Tensor? ranks, Tensor ids, int stream) "
      "-> Tensor");
  m.def(
      "multi_lora_gather_up_cuda(Tensor(a!) y, Tensor u, Tensor lora_b, Tensor? ranks, Tensor ids, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("multi_lora_gather_down_cuda", &multi_lora_gather_down_cuda);
  m.impl("multi_lora_gather_up_cuda", &multi_lora_gather_up_cuda);
}

}  // namespace peftops
