/* kvdistill runtime: a C ABI to use kvdistill gate bundles (docs/bundle.md) in a serving engine written in C or
 * C++, without LibTorch. libkvdistill_runtime.so loads a bundle, scores new tokens from their hidden states,
 * selects the entries to keep per KV head (TensorRT-LLM's layout) and compacts a flat or paged KV cache in
 * place, on the CPU or (the kvd_cuda_ functions) on a CUDA device, always on caller-owned memory.
 *
 * Conventions:
 * - Every function returns a kvd_status; KVD_OK is 0. On failure, kvd_last_error() returns a message for the
 *   calling thread (valid until its next call into the runtime) that names the argument or file and what to do.
 * - Handles are opaque; kvd_bundle_close(NULL) is a no-op.
 * - Arrays are row-major and dense. No C++ type crosses this boundary.
 *
 * Supported kinds: retention_gate (TRIM-KV). Its score for a cached entry i at the step whose next position is t:
 *     log_beta_h(i) = log_sigmoid(w2_h . silu(w1 . x_i + b1) + bias_h)    x_i: the attention input of token i
 *     score_h(i)    = log_beta_h(i) * (t + 1 - pos_i)                      after the layer's input RMSNorm
 * Higher scores keep. */
#ifndef KVDISTILL_H
#define KVDISTILL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVD_RUNTIME_ABI_VERSION 1

#if defined(__GNUC__)
#define KVD_API __attribute__((visibility("default")))
#else
#define KVD_API
#endif

typedef enum kvd_status {
  KVD_OK = 0,
  KVD_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a size or index out of range */
  KVD_ERR_IO = 2,               /* a bundle file cannot be opened or read */
  KVD_ERR_CORRUPT = 3,          /* a malformed or truncated bundle */
  KVD_ERR_VERSION = 4,          /* a bundle format version this runtime does not read */
  KVD_ERR_UNSUPPORTED = 5,      /* a component kind this runtime cannot score */
  KVD_ERR_MODEL_MISMATCH = 6,   /* the bundle was trained for a model of other dims */
  KVD_ERR_DTYPE = 7,            /* a dtype the function does not take */
  KVD_ERR_INTERNAL = 8
} kvd_status;

typedef enum kvd_dtype { KVD_DTYPE_F32 = 0, KVD_DTYPE_BF16 = 1, KVD_DTYPE_F16 = 2 } kvd_dtype;

typedef enum kvd_kind { KVD_KIND_RETENTION_GATE = 1 } kvd_kind;

typedef struct kvd_bundle kvd_bundle;

typedef struct kvd_bundle_info {
  int32_t format_version;
  kvd_kind kind;
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t hidden_size;
  int32_t gate_hidden;       /* the gate MLP's width */
  char base_model_id[128];   /* NUL-terminated, truncated if longer */
  char base_model_sha256[65];
} kvd_bundle_info;

KVD_API int32_t kvd_runtime_abi_version(void);
KVD_API const char* kvd_last_error(void);
KVD_API const char* kvd_status_name(kvd_status status);

/* Opens <dir>/kvdistill.json and <dir>/gates.safetensors (F32, BF16 or F16 tensors, read into float32). */
KVD_API kvd_status kvd_bundle_open(const char* dir, kvd_bundle** out);
KVD_API void kvd_bundle_close(kvd_bundle* bundle);
KVD_API kvd_status kvd_bundle_get_info(const kvd_bundle* bundle, kvd_bundle_info* out);
/* KVD_ERR_MODEL_MISMATCH unless the bundle was trained for a model of these dims. */
KVD_API kvd_status kvd_bundle_check_model(const kvd_bundle* bundle, int32_t num_layers, int32_t hidden_size,
                                          int32_t num_kv_heads);

/* log beta of n tokens of one layer: hidden (n, hidden_size) in `dtype`; out (num_kv_heads, n) float32. */
KVD_API kvd_status kvd_score_log_beta(const kvd_bundle* bundle, int32_t layer, const void* hidden, kvd_dtype dtype, int64_t n,
                                      float* out);
/* scores[h][i] = log_beta[h][i] * (next_position + 1 - positions[i]); log_beta and scores (num_kv_heads, n)
 * (may alias), positions (n). */
KVD_API kvd_status kvd_retention_score(const float* log_beta, const int64_t* positions, int32_t num_kv_heads, int64_t n,
                                       int64_t next_position, float* scores);

/* Per KV head, the `keep` highest of scores (num_kv_heads, n), ties to the lower index, written ascending to
 * indices (num_kv_heads, keep) int32: one request's block of TensorRT-LLM's sparse_kv_indices. */
KVD_API kvd_status kvd_select_topk(const float* scores, int32_t num_kv_heads, int64_t n, int64_t keep, int32_t* indices);

/* In place: a flat per-head cache (num_kv_heads, n, row_bytes); row indices[h][j] moves to row j of head h
 * for j < keep. indices ascending per head (kvd_select_topk's output). */
KVD_API kvd_status kvd_compact_flat(void* cache, int32_t num_kv_heads, int64_t n, int64_t row_bytes, const int32_t* indices,
                                    int64_t keep);

/* In place: one sequence in a paged pool. Block b of the pool holds, for each KV head h, tokens_per_block rows of
 * row_bytes at pool + ((b * num_kv_heads + h) * tokens_per_block + slot) * row_bytes. Token i of the sequence
 * lives in block block_table[i / tokens_per_block], slot i % tokens_per_block. Kept token j of head h moves to the
 * sequence's token j; blocks past ceil(keep / tokens_per_block) may then be freed by the caller. */
KVD_API kvd_status kvd_compact_paged(void* pool, int64_t num_pool_blocks, const int32_t* block_table, int64_t n,
                                     int32_t num_kv_heads, int32_t tokens_per_block, int64_t row_bytes,
                                     const int32_t* indices, int64_t keep);

/* ---- CUDA ------------------------------------------------------------------------------------------------------
 * The same operations on device memory, queued on `stream` (a cudaStream_t; NULL: the legacy default stream). They
 * return once the work is queued; a kernel's own failure surfaces at the caller's next synchronization. Pointers
 * must be device or managed memory: host memory returns KVD_ERR_INVALID_ARGUMENT. A runtime built without CUDA,
 * or a machine without a device, returns KVD_ERR_UNSUPPORTED (kvd_cuda_available() says which holds). Selection
 * breaks ties as kvd_select_topk does; indices passed to the compactions are not checked on the device: an index
 * outside [0, n) or out of order is skipped (no memory outside the cache is touched), so pass
 * kvd_cuda_select_topk's output. */
KVD_API int32_t kvd_cuda_available(void); /* 1 when built with CUDA and a device is visible */

/* hidden (batch, n, hidden_size) in `dtype`; positions (batch, n) int64 or NULL; out (batch, num_kv_heads, n)
 * float32: log beta when positions is NULL, else log_beta * (next_position + 1 - position). The bundle's weights
 * are copied to the current device at the first call (kept until kvd_bundle_close). */
KVD_API kvd_status kvd_cuda_score(const kvd_bundle* bundle, int32_t layer, const void* hidden, kvd_dtype dtype,
                                  int32_t batch, int64_t n, const int64_t* positions, int64_t next_position, float* out,
                                  void* stream);
/* scores (batch, num_kv_heads, n) float32 -> indices (num_kv_heads, batch * keep) int32: TensorRT-LLM's
 * sparse_kv_indices, request b in columns [b * keep, (b + 1) * keep), ascending. */
KVD_API kvd_status kvd_cuda_select_topk(const float* scores, int32_t batch, int32_t num_kv_heads, int64_t n,
                                        int64_t keep, int32_t* indices, void* stream);
/* In place: cache (batch, num_kv_heads, n, row_bytes); indices as kvd_cuda_select_topk writes them. */
KVD_API kvd_status kvd_cuda_compact_flat(void* cache, int32_t batch, int32_t num_kv_heads, int64_t n, int64_t row_bytes,
                                         const int32_t* indices, int64_t keep, void* stream);
/* In place: kvd_compact_paged's pool layout; block_tables (batch, max_blocks) int32, request b's tokens in the
 * blocks of row b. */
KVD_API kvd_status kvd_cuda_compact_paged(void* pool, const int32_t* block_tables, int64_t max_blocks, int32_t batch,
                                          int64_t n, int32_t num_kv_heads, int32_t tokens_per_block, int64_t row_bytes,
                                          const int32_t* indices, int64_t keep, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KVDISTILL_H */
