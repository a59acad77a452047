/* The kvdistill runtime from C (export/runtime/kvdistill.h), linked against libkvdistill_runtime.so alone.
 *
 *   kvd_example BUNDLE_DIR LAYER HIDDEN.f32 N KEEP [cpu|cuda]
 *
 * HIDDEN.f32 holds the attention inputs (after the input RMSNorm) of one layer for an N-token prompt: N x hidden
 * size float32, row-major. The example scores the prompt as kvdistill does after a prefill (positions 0..N-1, next
 * position N), keeps KEEP entries per KV head, prints them as one JSON line, and then compacts a flat cache and a
 * paged cache (tokens_per_block 4, blocks in shuffled order) whose rows hold their own (head, position), checking
 * that every kept row landed where it should. With `cuda` all of it runs on the GPU through the kvd_cuda_
 * functions, on device copies of the same data. Exit 0 when all of that holds; 1 with the runtime's message
 * otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KVD_EXAMPLE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "export/runtime/kvdistill.h"

static int check(kvd_status s, const char* what) {
  if (s != KVD_OK) {
    fprintf(stderr, "kvd_example: %s: %s: %s\n", what, kvd_status_name(s), kvd_last_error());
    return 0;
  }
  return 1;
}

/* A row is two floats: (head, position) */
static int row_is(const float* row, int h, int pos) { return row[0] == (float)h && row[1] == (float)pos; }

#ifdef KVD_EXAMPLE_CUDA
static void* to_device(const void* host, size_t bytes) {
  void* d = NULL;
  if (cudaMalloc(&d, bytes) != cudaSuccess || cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
    fprintf(stderr, "kvd_example: cannot copy %zu bytes to the GPU\n", bytes);
    exit(1);
  }
  return d;
}

static void to_host(void* host, const void* dev, size_t bytes) {
  if (cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    fprintf(stderr, "kvd_example: cannot copy %zu bytes from the GPU\n", bytes);
    exit(1);
  }
}

/* The same steps on the GPU: device copies in, the kvd_cuda_ functions on the default stream, results back. */
static int run_cuda(kvd_bundle* b, int layer, const float* hidden, long long n, long long keep, int H, int D,
                    const long long* positions, int32_t* kept, float* flat, float* pool, const int32_t* table,
                    long long blocks, int tpb) {
  if (!kvd_cuda_available()) {
    fprintf(stderr, "kvd_example: no CUDA device (or a runtime built without CUDA)\n");
    return 0;
  }
  float* d_hidden = to_device(hidden, sizeof(float) * (size_t)(n * D));
  int64_t* d_pos = to_device(positions, sizeof(long long) * (size_t)n);
  float* d_scores = NULL;
  int32_t* d_kept = NULL;
  cudaMalloc((void**)&d_scores, sizeof(float) * (size_t)(H * n));
  cudaMalloc((void**)&d_kept, sizeof(int32_t) * (size_t)(H * keep));
  float* d_flat = to_device(flat, sizeof(float) * 2 * (size_t)(H * n));
  float* d_pool = to_device(pool, sizeof(float) * 2 * (size_t)(blocks * H * tpb));
  int32_t* d_table = to_device(table, sizeof(int32_t) * (size_t)blocks);
  if (!check(kvd_cuda_score(b, layer, d_hidden, KVD_DTYPE_F32, 1, n, d_pos, n, d_scores, NULL), "kvd_cuda_score") ||
      !check(kvd_cuda_select_topk(d_scores, 1, H, n, keep, d_kept, NULL), "kvd_cuda_select_topk") ||
      !check(kvd_cuda_compact_flat(d_flat, 1, H, n, 2 * sizeof(float), d_kept, keep, NULL), "kvd_cuda_compact_flat") ||
      !check(kvd_cuda_compact_paged(d_pool, d_table, blocks, 1, n, H, tpb, 2 * sizeof(float), d_kept, keep, NULL),
             "kvd_cuda_compact_paged"))
    return 0;
  if (cudaDeviceSynchronize() != cudaSuccess) {
    fprintf(stderr, "kvd_example: a kernel failed: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 0;
  }
  to_host(kept, d_kept, sizeof(int32_t) * (size_t)(H * keep));
  to_host(flat, d_flat, sizeof(float) * 2 * (size_t)(H * n));
  to_host(pool, d_pool, sizeof(float) * 2 * (size_t)(blocks * H * tpb));
  /* Host memory where device memory belongs is refused with a message. */
  if (kvd_cuda_select_topk((const float*)hidden, 1, H, n, keep, d_kept, NULL) != KVD_ERR_INVALID_ARGUMENT ||
      strstr(kvd_last_error(), "host memory") == NULL) {
    fprintf(stderr, "kvd_example: host memory passed to kvd_cuda_select_topk was not refused\n");
    return 0;
  }
  cudaFree(d_hidden), cudaFree(d_pos), cudaFree(d_scores), cudaFree(d_kept), cudaFree(d_flat), cudaFree(d_pool),
      cudaFree(d_table);
  return 1;
}
#endif

int main(int argc, char** argv) {
  if (argc != 6 && !(argc == 7 && (!strcmp(argv[6], "cpu") || !strcmp(argv[6], "cuda")))) {
    fprintf(stderr, "usage: kvd_example BUNDLE_DIR LAYER HIDDEN.f32 N KEEP [cpu|cuda]\n");
    return 2;
  }
  const int on_gpu = argc == 7 && !strcmp(argv[6], "cuda");
  const char* dir = argv[1];
  const int layer = atoi(argv[2]);
  const long long n = atoll(argv[4]);
  const long long keep = atoll(argv[5]);
  if (kvd_runtime_abi_version() != KVD_RUNTIME_ABI_VERSION) {
    fprintf(stderr, "kvd_example: runtime ABI %d, header %d\n", kvd_runtime_abi_version(), KVD_RUNTIME_ABI_VERSION);
    return 1;
  }
  kvd_bundle* b = NULL;
  if (!check(kvd_bundle_open(dir, &b), "kvd_bundle_open")) return 1;
  kvd_bundle_info info;
  if (!check(kvd_bundle_get_info(b, &info), "kvd_bundle_get_info")) return 1;
  const int H = info.num_kv_heads, D = info.hidden_size;

  float* hidden = malloc(sizeof(float) * (size_t)(n * D));
  FILE* f = fopen(argv[3], "rb");
  if (!f || fread(hidden, sizeof(float), (size_t)(n * D), f) != (size_t)(n * D)) {
    fprintf(stderr, "kvd_example: %s: cannot read %lld x %d float32\n", argv[3], n, D);
    return 1;
  }
  fclose(f);

  float* scores = malloc(sizeof(float) * (size_t)(H * n));
  long long* positions = malloc(sizeof(long long) * (size_t)n);
  int32_t* kept = malloc(sizeof(int32_t) * (size_t)(H * keep));
  for (long long i = 0; i < n; ++i) positions[i] = i;

  /* A flat cache (H, n, 2 floats) and a paged one: its n tokens in blocks of 4, the blocks in reverse order. */
  const int tpb = 4;
  const long long blocks = (n + tpb - 1) / tpb;
  float* flat = malloc(sizeof(float) * 2 * (size_t)(H * n));
  float* pool = malloc(sizeof(float) * 2 * (size_t)(blocks * H * tpb));
  int32_t* table = malloc(sizeof(int32_t) * (size_t)blocks);
  for (long long blk = 0; blk < blocks; ++blk) table[blk] = (int32_t)(blocks - 1 - blk);
  for (int h = 0; h < H; ++h)
    for (long long i = 0; i < n; ++i) {
      float* r = flat + 2 * (h * n + i);
      r[0] = (float)h, r[1] = (float)i;
      float* p = pool + 2 * ((table[i / tpb] * H + h) * tpb + i % tpb);
      p[0] = (float)h, p[1] = (float)i;
    }
  if (on_gpu) {
#ifdef KVD_EXAMPLE_CUDA
    if (!run_cuda(b, layer, hidden, n, keep, H, D, positions, kept, flat, pool, table, blocks, tpb)) return 1;
#else
    fprintf(stderr, "kvd_example: built without CUDA; run it with `cpu`\n");
    return 1;
#endif
  } else {
    if (!check(kvd_score_log_beta(b, layer, hidden, KVD_DTYPE_F32, n, scores), "kvd_score_log_beta")) return 1;
    if (!check(kvd_retention_score(scores, (const int64_t*)positions, H, n, n, scores), "kvd_retention_score"))
      return 1;
    if (!check(kvd_select_topk(scores, H, n, keep, kept), "kvd_select_topk")) return 1;
    if (!check(kvd_compact_flat(flat, H, n, 2 * sizeof(float), kept, keep), "kvd_compact_flat")) return 1;
    if (!check(kvd_compact_paged(pool, blocks, table, n, H, tpb, 2 * sizeof(float), kept, keep), "kvd_compact_paged"))
      return 1;
  }

  printf("{\"layer\": %d, \"kind\": \"retention_gate\", \"base_model\": \"%s\", \"device\": \"%s\", \"kept\": [",
         layer, info.base_model_id, on_gpu ? "cuda" : "cpu");
  for (int h = 0; h < H; ++h) {
    printf(h ? ", [" : "[");
    for (long long j = 0; j < keep; ++j) printf(j ? ", %d" : "%d", kept[h * keep + j]);
    printf("]");
  }
  printf("]}\n");
  for (int h = 0; h < H; ++h)
    for (long long j = 0; j < keep; ++j) {
      const int want = kept[h * keep + j];
      if (!row_is(flat + 2 * (h * n + j), h, want) ||
          !row_is(pool + 2 * ((table[j / tpb] * H + h) * tpb + j % tpb), h, want)) {
        fprintf(stderr, "kvd_example: head %d row %lld does not hold position %d after compaction\n", h, j, want);
        return 1;
      }
    }
  fprintf(stderr, "kvd_example: compact_flat and compact_paged hold the kept rows in order\n");

  /* Bad input comes back as a status and a message, never a crash. */
  kvd_status s = kvd_select_topk(scores, H, n, n + 1, kept);
  if (s != KVD_ERR_INVALID_ARGUMENT || strstr(kvd_last_error(), "keep must lie") == NULL) {
    fprintf(stderr, "kvd_example: keep > n was not refused\n");
    return 1;
  }
  free(hidden), free(scores), free(positions), free(kept), free(flat), free(pool), free(table);
  kvd_bundle_close(b);
  return 0;
}
