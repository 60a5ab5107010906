// Block-sparse attention forward for CPU, fp32: the op's CPU path where the allowed set is a few
// key intervals per row (sink_window, block_topk). Built at first use by sparse_cpu.py.
//
// Why a kernel of our own: aten's CPU flash attention tiles a 64-row query block by 32 rows, and
// gathering each block's key blocks before it costs a copy through memory, so the gathered-block
// path ran at 1.5-2x the density bound. Here each (batch, head, query block) is one work item: its
// kept key blocks (copied into a per-thread buffer only when they are not one contiguous run, so
// the copy stays in cache) meet its queries in one gemm, the row softmax is exact (all the row's
// keys are in that one score tile, so no online rescaling), and one more gemm gives the output.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

// BLAS sgemm, exported by libtorch_cpu (torch's own MKL/OpenBLAS build).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Column-major C[m, n] = alpha * op(A) B + beta * C; op(A) = A^T when trans_a.
void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = 'N';
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// A run of consecutive kept keys: keys [first, first + len) sit at columns [col, col + len) of the
// score tile.
struct Run {
  int64_t first, len, col;
};

// The runs of one query block's kept key blocks (ascending block indices), clipped to num_keys.
int64_t key_runs(const int32_t* blocks, int64_t n_blocks, int64_t block_n, int64_t num_keys,
                 std::vector<Run>& runs) {
  runs.clear();
  int64_t cols = 0;
  for (int64_t i = 0; i < n_blocks; ++i) {
    const int64_t first = static_cast<int64_t>(blocks[i]) * block_n;
    const int64_t len = std::min(block_n, num_keys - first);
    if (len <= 0) continue;
    if (!runs.empty() && runs.back().first + runs.back().len == first) {
      runs.back().len += len;
    } else {
      runs.push_back({first, len, cols});
    }
    cols += len;
  }
  return cols;
}

// Columns [a, b) of one score row whose keys the row may attend: per run, the part below
// sink_end and the part in [lo, hi] (merged where they touch), in ascending order.
void allowed_columns(const std::vector<Run>& runs, int64_t sink_end, int64_t lo, int64_t hi,
                     std::vector<int64_t>& bounds) {
  bounds.clear();
  for (const Run& run : runs) {
    const int64_t end = run.first + run.len;
    int64_t a1 = run.first, b1 = std::min(end, sink_end);
    int64_t a2 = std::max(run.first, lo), b2 = std::min(end, hi + 1);
    if (b1 > a1 && b2 > a2 && a2 <= b1) {  // the two ranges touch: one range
      b1 = std::max(b1, b2);
      b2 = a2;
    }
    if (b1 > a1) {
      bounds.push_back(run.col + a1 - run.first);
      bounds.push_back(run.col + b1 - run.first);
    }
    if (b2 > a2) {
      bounds.push_back(run.col + a2 - run.first);
      bounds.push_back(run.col + b2 - run.first);
    }
  }
}

// Softmax of one score row in place over the allowed columns (bounds), zero elsewhere; returns the
// sum of the exponentials (0 when nothing is allowed, the row then being all zeros).
float row_softmax_numerators(float* row, int64_t width, const std::vector<int64_t>& bounds) {
  Vec vmax(kNegInf);
  float mx = kNegInf;
  for (size_t t = 0; t < bounds.size(); t += 2) {
    int64_t j = bounds[t];
    for (; j + Vec::size() <= bounds[t + 1]; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
    for (; j < bounds[t + 1]; ++j) mx = std::max(mx, row[j]);
  }
  mx = std::max(mx, at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax));
  if (mx == kNegInf) {  // nothing allowed, or every allowed score is -inf (a bias)
    std::fill(row, row + width, 0.f);
    return 0.f;
  }
  const Vec vmx(mx);
  Vec vsum(0.f);
  float sum = 0.f;
  int64_t done = 0;
  for (size_t t = 0; t < bounds.size(); t += 2) {
    std::fill(row + done, row + bounds[t], 0.f);
    int64_t j = bounds[t];
    for (; j + Vec::size() <= bounds[t + 1]; j += Vec::size()) {
      const Vec x = (Vec::loadu(row + j) - vmx).exp_u20();
      x.store(row + j);
      vsum = vsum + x;
    }
    for (; j < bounds[t + 1]; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    done = bounds[t + 1];
  }
  std::fill(row + done, row + width, 0.f);
  return sum + at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

// q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]: fp32, unit stride in the last dim (any
// other strides); count [B, H, NQB] and index [B, H, NQB, MAXK] int32 contiguous (the kept key
// blocks of each query block, ascending); bias: fp32 [B, H, Nq, Nk] with any strides (0 for
// broadcast dims), added to the scores. The row of the query at absolute position p (q_offset +
// row) attends key j when j < Nk and
//   (j < sinks and (not causal or j <= p))  or  (lo <= j <= hi),
// lo = p - window + 1 for window > 0, else 0; hi = p if causal or window > 0, else Nk - 1;
// window == 0 leaves only the sinks, window < 0 puts no lower bound. Returns [B, H, Nq, Dv].
at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& count, const at::Tensor& index,
                                  const std::optional<at::Tensor>& bias, double scale, int64_t q_offset,
                                  int64_t block_m, int64_t block_n, int64_t sinks, int64_t window, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_sparse_attention: q, k, v must be 4-d");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "block_sparse_attention: q, k, v must be fp32 CPU tensors with unit stride in the last dim");
  }
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Nk && k.size(3) == D &&
                  Hkv > 0 && H % Hkv == 0,
              "block_sparse_attention: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], H % Hkv == 0");
  TORCH_CHECK(block_m > 0 && block_n > 0, "block_sparse_attention: block sizes must be > 0");
  const int64_t NQB = (Nq + block_m - 1) / block_m;
  TORCH_CHECK(count.scalar_type() == at::kInt && index.scalar_type() == at::kInt && count.is_contiguous() &&
                  index.is_contiguous() && count.dim() == 3 && index.dim() == 4 && count.size(0) == B &&
                  count.size(1) == H && count.size(2) == NQB && index.size(0) == B && index.size(1) == H &&
                  index.size(2) == NQB,
              "block_sparse_attention: count [B, H, NQB], index [B, H, NQB, MAXK], int32, contiguous");
  const int64_t MAXK = index.size(3);
  const float* bias_p = nullptr;
  int64_t bias_s0 = 0, bias_s1 = 0, bias_s2 = 0, bias_s3 = 0;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 4 && b.size(0) == B && b.size(1) == H &&
                    b.size(2) == Nq && b.size(3) == Nk,
                "block_sparse_attention: bias must be fp32 [B, H, Nq, Nk] (broadcast dims expanded)");
    bias_p = b.data_ptr<float>();
    bias_s0 = b.stride(0), bias_s1 = b.stride(1), bias_s2 = b.stride(2), bias_s3 = b.stride(3);
  }
  auto out = at::empty({B, H, Nq, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* count_p = count.data_ptr<int32_t>();
  const int32_t* index_p = index.data_ptr<int32_t>();
  float* out_p = out.data_ptr<float>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), q_row = q.stride(2);
  const int64_t k_s0 = k.stride(0), k_s1 = k.stride(1), k_row = k.stride(2);
  const int64_t v_s0 = v.stride(0), v_s1 = v.stride(1), v_row = v.stride(2);
  const int64_t group = H / Hkv;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * H * NQB, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(block_m * MAXK * block_n), k_buf(MAXK * block_n * D), v_buf(MAXK * block_n * Dv);
    std::vector<float> row_sum(block_m);
    std::vector<Run> runs;
    std::vector<int64_t> bounds;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % NQB, bh = item / NQB, h = bh % H, b = bh / H;
      const int64_t row0 = qb * block_m, rows = std::min(block_m, Nq - row0);
      const float* q_blk = qp + b * q_s0 + h * q_s1 + row0 * q_row;
      const float* k_head = kp + b * k_s0 + (h / group) * k_s1;
      const float* v_head = vp + b * v_s0 + (h / group) * v_s1;
      float* out_blk = out_p + ((bh * Nq) + row0) * Dv;
      const int64_t cols = key_runs(index_p + item * MAXK, count_p[item], block_n, Nk, runs);
      if (cols == 0) {
        std::fill(out_blk, out_blk + rows * Dv, 0.f);
        continue;
      }
      // keys and values as one matrix each: in place for one run, else copied run by run
      const float* keys = k_head + runs[0].first * k_row;
      const float* values = v_head + runs[0].first * v_row;
      int64_t ld_k = k_row, ld_v = v_row;
      if (runs.size() > 1) {
        for (const Run& run : runs) {
          for (int64_t j = 0; j < run.len; ++j) {
            std::copy_n(k_head + (run.first + j) * k_row, D, k_buf.data() + (run.col + j) * D);
            std::copy_n(v_head + (run.first + j) * v_row, Dv, v_buf.data() + (run.col + j) * Dv);
          }
        }
        keys = k_buf.data(), values = v_buf.data(), ld_k = D, ld_v = Dv;
      }
      float* s = scores.data();
      // S [rows, cols] row-major = scale * Q K^T, i.e. column-major S^T = scale * K Q^T
      gemm(true, cols, rows, D, fscale, keys, ld_k, q_blk, q_row, 0.f, s, cols);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t p = q_offset + row0 + i;
        float* s_row = s + i * cols;
        if (bias_p != nullptr) {
          const float* bias_row = bias_p + b * bias_s0 + h * bias_s1 + (row0 + i) * bias_s2;
          for (const Run& run : runs) {
            for (int64_t j = 0; j < run.len; ++j) s_row[run.col + j] += bias_row[(run.first + j) * bias_s3];
          }
        }
        const int64_t sink_end = causal ? std::min(sinks, p + 1) : sinks;
        const int64_t lo = window > 0 ? p - window + 1 : (window == 0 ? Nk : 0);
        const int64_t hi = (causal || window > 0) ? p : Nk - 1;
        allowed_columns(runs, sink_end, lo, hi, bounds);
        row_sum[i] = row_softmax_numerators(s_row, cols, bounds);
      }
      // O [rows, Dv] row-major = P V, i.e. column-major O^T = V^T P^T
      gemm(false, Dv, rows, cols, 1.f, values, ld_v, s, cols, 0.f, out_blk, Dv);
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        float* o = out_blk + i * Dv;
        int64_t d = 0;
        for (; d + Vec::size() <= Dv; d += Vec::size()) (Vec::loadu(o + d) * Vec(inv)).store(o + d);
        for (; d < Dv; ++d) o[d] *= inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokred_cpu, m) {
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor count, Tensor index, Tensor? bias, float scale, "
      "int q_offset, int block_m, int block_n, int sinks, int window, bool causal) -> Tensor");
  m.impl("block_sparse_attention", c10::DispatchKey::CPU, &block_sparse_attention);
}
