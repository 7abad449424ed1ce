// Paged attention over the engine's block KV cache (engine/kv_cache.py).
//
// One thread block per (head, query, sequence).  Its warps split the sequence's
// tokens; each lane holds ceil(head_dim / 32) dimensions of the query and of
// its running output, so a key row is read by one warp in coalesced 32-element
// steps.  Each warp keeps an online softmax (running max, sum, output); the
// warps are merged once at the end through shared memory.  Float accumulation
// for float, half and bfloat16 inputs.
//
// Shapes: q [seqs, chunk, heads, dim]; k_cache, v_cache [blocks, block_size,
// heads, dim]; block_tables [seqs, max_blocks] int32; context_lens [seqs] int32
// counting the chunk's own tokens (already written to the cache).  Query c of a
// sequence sees its tokens t < context_len - chunk + c + 1 (causal within the
// chunk); decode is chunk = 1.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>

namespace {

constexpr int kWarps = 4;
constexpr int kMaxDim = 256;
constexpr int kPerLane = kMaxDim / 32;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

template <typename scalar_t>
__global__ void paged_attention_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k_cache,
    const scalar_t* __restrict__ v_cache, const int* __restrict__ block_tables,
    const int* __restrict__ context_lens, scalar_t* __restrict__ out, int chunk, int heads,
    int dim, int block_size, int max_blocks, float scale) {
  const int h = blockIdx.x, c = blockIdx.y, s = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int visible = context_lens[s] - chunk + c + 1;  // tokens this query attends to

  const scalar_t* qrow = q + (((long)s * chunk + c) * heads + h) * dim;
  float qv[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < dim ? static_cast<float>(qrow[d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;
  const int* table = block_tables + (long)s * max_blocks;
  for (int t = warp; t < visible; t += kWarps) {
    const long row = ((long)table[t / block_size] * block_size + t % block_size) * heads + h;
    const scalar_t* krow = k_cache + row * dim;
    const scalar_t* vrow = v_cache + row * dim;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) dot += qv[i] * static_cast<float>(krow[d]);
    }
    const float score = warp_sum(dot);
    const float m_new = fmaxf(m, score);
    const float corr = __expf(m - m_new), p = __expf(score - m_new);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) acc[i] = acc[i] * corr + p * static_cast<float>(vrow[d]);
    }
    m = m_new;
  }

  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ float s_acc[kWarps][kMaxDim];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) s_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float m_all = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w]);
  float weight[kWarps], l_all = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_l[w] > 0.f ? __expf(s_m[w] - m_all) : 0.f;  // a warp that saw no token
    l_all += weight[w] * s_l[w];
  }
  scalar_t* orow = out + (((long)s * chunk + c) * heads + h) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += weight[w] * s_acc[w][d];
    orow[d] = static_cast<scalar_t>(sum / l_all);
  }
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor context_lens,
                              double scale) {
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(q.dim() == 4, "q must be [seqs, chunk, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [blocks, block_size, heads, dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && context_lens.scalar_type() == torch::kInt,
              "block_tables and context_lens must be int32");
  const int seqs = q.size(0), chunk = q.size(1), heads = q.size(2), dim = q.size(3);
  TORCH_CHECK(dim <= kMaxDim, "head dim ", dim, " exceeds ", kMaxDim);
  TORCH_CHECK(k_cache.size(2) == heads && k_cache.size(3) == dim, "cache heads/dim differ from q");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qc = q.contiguous();
  auto kc = k_cache.contiguous();
  auto vc = v_cache.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = torch::empty_like(qc);
  if (seqs == 0 || chunk == 0) return out;
  const dim3 grid(heads, chunk, seqs);
  const dim3 block(kWarps * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "paged_attention", [&] {
    paged_attention_kernel<scalar_t><<<grid, block, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        tables.data_ptr<int>(), lens.data_ptr<int>(), out.data_ptr<scalar_t>(), chunk, heads, dim,
        kc.size(1), tables.size(1), static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "paged attention (q [seqs, chunk, heads, dim] over a block KV cache)");
}
