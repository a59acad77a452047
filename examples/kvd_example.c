/* The kvdistill runtime from C (export/runtime/kvdistill.h), linked against libkvdistill_runtime.so alone.
 *
 *   kvd_example BUNDLE_DIR LAYER HIDDEN.f32 N KEEP
 *
 * HIDDEN.f32 holds the attention inputs (after the input RMSNorm) of one layer for an N-token prompt: N x hidden
 * size float32, row-major. The example scores the prompt as kvdistill does after a prefill (positions 0..N-1, next
 * position N), keeps KEEP entries per KV head, prints them as one JSON line, and then compacts a flat cache and a
 * paged cache (tokens_per_block 4, blocks in shuffled order) whose rows hold their own (head, position), checking
 * that every kept row landed where it should. Exit 0 when all of that holds; 1 with the runtime's message
 * otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int main(int argc, char** argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: kvd_example BUNDLE_DIR LAYER HIDDEN.f32 N KEEP\n");
    return 2;
  }
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
  if (!check(kvd_score_log_beta(b, layer, hidden, KVD_DTYPE_F32, n, scores), "kvd_score_log_beta")) return 1;
  if (!check(kvd_retention_score(scores, (const int64_t*)positions, H, n, n, scores), "kvd_retention_score")) return 1;
  if (!check(kvd_select_topk(scores, H, n, keep, kept), "kvd_select_topk")) return 1;

  printf("{\"layer\": %d, \"kind\": \"retention_gate\", \"base_model\": \"%s\", \"kept\": [", layer, info.base_model_id);
  for (int h = 0; h < H; ++h) {
    printf(h ? ", [" : "[");
    for (long long j = 0; j < keep; ++j) printf(j ? ", %d" : "%d", kept[h * keep + j]);
    printf("]");
  }
  printf("]}\n");

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
  if (!check(kvd_compact_flat(flat, H, n, 2 * sizeof(float), kept, keep), "kvd_compact_flat")) return 1;
  if (!check(kvd_compact_paged(pool, blocks, table, n, H, tpb, 2 * sizeof(float), kept, keep), "kvd_compact_paged"))
    return 1;
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
