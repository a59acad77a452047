#include "models/gguf.h"

// The dequantizers reproduce numpy's float32 arithmetic: every multiply and every add rounds once.
// GCC contracts a*b+c into a fused multiply-add across statements by default (GNU mode) on targets with
// FMA, which would change the last bit; keep it off in this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <cstring>
#include <limits>
#include <utility>

#include "common/error.h"

namespace kvd {

// ------------------------------------------------------------------------------------------------
// Type table (block size in elements, bytes per block). Values from ggml's type traits as documented
// by the `gguf` package (GGML_QUANT_SIZES); QK_K = 256 for the K-quants.
// ------------------------------------------------------------------------------------------------
namespace {

constexpr int QK = 32;    // block of the "legacy" quants (Q4_0 ... Q8_1)
constexpr int QK_K = 256; // super-block of the K-quants

struct TypeRow {
  uint32_t id;
  GgmlTypeInfo info;
};

const TypeRow kTypes[] = {
    {0, {"F32", 1, 4, true}},
    {1, {"F16", 1, 2, true}},
    {2, {"Q4_0", QK, 2 + QK / 2, true}},
    {3, {"Q4_1", QK, 2 + 2 + QK / 2, true}},
    {6, {"Q5_0", QK, 2 + 4 + QK / 2, true}},
    {7, {"Q5_1", QK, 2 + 2 + 4 + QK / 2, true}},
    {8, {"Q8_0", QK, 2 + QK, true}},
    {9, {"Q8_1", QK, 4 + 4 + QK, false}},
    {10, {"Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4, true}},
    {11, {"Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12, true}},
    {12, {"Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12, true}},
    {13, {"Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12, true}},
    {14, {"Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16, true}},
    {15, {"Q8_K", QK_K, 4 + QK_K + QK_K / 8, true}},
    {16, {"IQ2_XXS", QK_K, 2 + QK_K / 4, false}},
    {17, {"IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32, false}},
    {18, {"IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8, false}},
    {19, {"IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16, false}},
    {20, {"IQ4_NL", QK, 2 + QK / 2, false}},
    {21, {"IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4, false}},
    {22, {"IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16, false}},
    {23, {"IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64, false}},
    {24, {"I8", 1, 1, false}},
    {25, {"I16", 1, 2, false}},
    {26, {"I32", 1, 4, false}},
    {27, {"I64", 1, 8, false}},
    {28, {"F64", 1, 8, false}},
    {29, {"IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32, false}},
    {30, {"BF16", 1, 2, true}},
    {34, {"TQ1_0", QK_K, 2 + 4 * 13, false}},
    {35, {"TQ2_0", QK_K, 2 + 64, false}},
    {39, {"MXFP4", 32, 1 + 16, false}},
    {40, {"NVFP4", 64, 4 + 32, false}},
    {41, {"Q1_0", 128, 2 + 16, false}},
};

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t type_id) {
  for (const auto& row : kTypes)
    if (row.id == type_id) return &row.info;
  return nullptr;
}

const char* ggml_type_name(GgmlType t) {
  const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(t));
  return info ? info->name : "unknown";
}

// ------------------------------------------------------------------------------------------------
// Scalar conversions
// ------------------------------------------------------------------------------------------------
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
inline uint32_t rd32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | uint64_t(rd32(p + 4)) << 32; }

}  // namespace

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Every half is exactly a float.
float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);  // +-0
    // Subnormal: value = mant * 2^-24. Normalize so the leading 1 sits at bit 10.
    uint32_t e = 127 - 14;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    mant &= 0x3FFu;
    return bits_to_float(sign | (e << 23) | (mant << 13));
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan (payload kept)
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// bfloat16 is the top half of a float32.
float bf16_to_fp32(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// ------------------------------------------------------------------------------------------------
// Dequantizers: one function per block layout; `x` points at one block, `y` receives its elements.
// Offsets are in bytes inside the block; "d" / "dmin" are fp16 unless stated.
// ------------------------------------------------------------------------------------------------
namespace {

inline float h2f(const uint8_t* p) { return fp16_to_fp32(rd16(p)); }

// Q8_0 (34 bytes, 32 elements): d @0 | int8 q[32] @2.  y[i] = q[i] * d
void deq_q8_0(const uint8_t* x, float* y) {
  const float d = h2f(x);
  for (int i = 0; i < QK; ++i) y[i] = float(int8_t(x[2 + i])) * d;
}

// Q4_0 (18 bytes): d @0 | qs[16] @2. Byte j holds element j in its low nibble and element j+16 in its
// high nibble.  y = (q - 8) * d
void deq_q4_0(const uint8_t* x, float* y) {
  const float d = h2f(x);
  const uint8_t* qs = x + 2;
  for (int j = 0; j < QK / 2; ++j) {
    y[j] = float(int(qs[j] & 0x0F) - 8) * d;
    y[j + QK / 2] = float(int(qs[j] >> 4) - 8) * d;
  }
}

// Q4_1 (20 bytes): d @0 | m @2 | qs[16] @4 (nibbles as Q4_0).  y = q * d + m
void deq_q4_1(const uint8_t* x, float* y) {
  const float d = h2f(x), m = h2f(x + 2);
  const uint8_t* qs = x + 4;
  for (int j = 0; j < QK / 2; ++j) {
    y[j] = float(qs[j] & 0x0F) * d + m;
    y[j + QK / 2] = float(qs[j] >> 4) * d + m;
  }
}

// Q5_0 (22 bytes): d @0 | qh (u32 LE) @2 | qs[16] @6. Element i's fifth bit is bit i of qh; its low four
// bits are nibbles as in Q4_0.  y = (q - 16) * d
void deq_q5_0(const uint8_t* x, float* y) {
  const float d = h2f(x);
  const uint32_t qh = rd32(x + 2);
  const uint8_t* qs = x + 6;
  for (int j = 0; j < QK / 2; ++j) {
    const int lo = int(qs[j] & 0x0F) | int((qh >> j) & 1u) << 4;
    const int hi = int(qs[j] >> 4) | int((qh >> (j + 16)) & 1u) << 4;
    y[j] = float(lo - 16) * d;
    y[j + QK / 2] = float(hi - 16) * d;
  }
}

// Q5_1 (24 bytes): d @0 | m @2 | qh @4 | qs[16] @8 (bits as Q5_0).  y = q * d + m
void deq_q5_1(const uint8_t* x, float* y) {
  const float d = h2f(x), m = h2f(x + 2);
  const uint32_t qh = rd32(x + 4);
  const uint8_t* qs = x + 8;
  for (int j = 0; j < QK / 2; ++j) {
    const int lo = int(qs[j] & 0x0F) | int((qh >> j) & 1u) << 4;
    const int hi = int(qs[j] >> 4) | int((qh >> (j + 16)) & 1u) << 4;
    y[j] = float(lo) * d + m;
    y[j + QK / 2] = float(hi) * d + m;
  }
}

// Q2_K (84 bytes, 256 elements in 16 sub-blocks of 16):
//   scales[16] @0 (low nibble: scale, high nibble: min of sub-block s) | qs[64] @16 | d @80 | dmin @82.
//   Element e = 128*h + 32*k + l (h in 0..1, k in 0..3, l in 0..31) is bits 2k..2k+1 of qs[32*h + l].
//   y = (d * sc) * q - (dmin * mn), sub-block s = e / 16.
void deq_q2_k(const uint8_t* x, float* y) {
  const uint8_t* sc = x;
  const uint8_t* qs = x + 16;
  const float d = h2f(x + 80), dmin = h2f(x + 82);
  float dl[16], ml[16];
  for (int s = 0; s < 16; ++s) {
    dl[s] = d * float(sc[s] & 0x0F);
    ml[s] = dmin * float(sc[s] >> 4);
  }
  for (int e = 0; e < QK_K; ++e) {
    const int h = e / 128, k = (e / 32) % 4, l = e % 32;
    const int q = (qs[32 * h + l] >> (2 * k)) & 3;
    y[e] = dl[e / 16] * float(q) - ml[e / 16];
  }
}

// Q3_K (110 bytes, 16 sub-blocks of 16): hmask[32] @0 | qs[64] @32 | scales[12] @96 | d @108.
//   6-bit signed scales (offset 32): scale s has low four bits = nibble (s / 8) of byte s % 8 and high two
//   bits = bits 2*(s / 4).. of byte 8 + s % 4.
//   Element e = 128*h + 32*k + l: low two bits from qs as in Q2_K; "high" bit b = bit (e / 32) of
//   hmask[l]; q = low - 4 when that bit is 0, low otherwise.  y = (d * scale) * q
void deq_q3_k(const uint8_t* x, float* y) {
  const uint8_t* hmask = x;
  const uint8_t* qs = x + 32;
  const uint8_t* sc = x + 96;
  const float d = h2f(x + 108);
  float dl[16];
  for (int s = 0; s < 16; ++s) {
    const int lo = (sc[s % 8] >> (4 * (s / 8))) & 0x0F;
    const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 0x03;
    dl[s] = d * float(int8_t(uint8_t(lo | hi << 4)) - 32);
  }
  for (int e = 0; e < QK_K; ++e) {
    const int h = e / 128, k = (e / 32) % 4, l = e % 32;
    const int low = (qs[32 * h + l] >> (2 * k)) & 3;
    const int bit = (hmask[l] >> (e / 32)) & 1;
    y[e] = dl[e / 16] * float(low - (bit ? 0 : 4));
  }
}

// The 12-byte scale/min block of Q4_K and Q5_K: eight 6-bit scales and eight 6-bit mins.
//   j < 4: sc = b[j] & 63,                              mn = b[j + 4] & 63
//   j >= 4: sc = (b[j + 4] & 15) | (b[j - 4] >> 6) << 4, mn = (b[j + 4] >> 4) | (b[j] >> 6) << 4
void k_scale_min(const uint8_t* b, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = b[j] & 63;
    mn[j] = b[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    sc[j] = uint8_t((b[j + 4] & 0x0F) | ((b[j - 4] >> 6) << 4));
    mn[j] = uint8_t((b[j + 4] >> 4) | ((b[j] >> 6) << 4));
  }
}

// Q4_K (144 bytes, 8 sub-blocks of 32): d @0 | dmin @2 | scales[12] @4 | qs[128] @16.
//   Element e = 64*c + 32*h + l is nibble h (0 low, 1 high) of qs[32*c + l]; sub-block s = e / 32.
//   y = (d * sc[s]) * q - (dmin * mn[s])
void deq_q4_k(const uint8_t* x, float* y) {
  const float d = h2f(x), dmin = h2f(x + 2);
  uint8_t sc[8], mn[8];
  k_scale_min(x + 4, sc, mn);
  const uint8_t* qs = x + 16;
  for (int s = 0; s < 8; ++s) {
    const float ds = d * float(sc[s]), ms = dmin * float(mn[s]);
    const int c = s / 2, h = s % 2;
    for (int l = 0; l < 32; ++l) y[32 * s + l] = ds * float((qs[32 * c + l] >> (4 * h)) & 0x0F) - ms;
  }
}

// Q5_K (176 bytes): d @0 | dmin @2 | scales[12] @4 | qh[32] @16 | qs[128] @48.
//   Low four bits as Q4_K; the fifth bit of element e is bit (e / 32) of qh[e % 32].
void deq_q5_k(const uint8_t* x, float* y) {
  const float d = h2f(x), dmin = h2f(x + 2);
  uint8_t sc[8], mn[8];
  k_scale_min(x + 4, sc, mn);
  const uint8_t* qh = x + 16;
  const uint8_t* qs = x + 48;
  for (int s = 0; s < 8; ++s) {
    const float ds = d * float(sc[s]), ms = dmin * float(mn[s]);
    const int c = s / 2, h = s % 2;
    for (int l = 0; l < 32; ++l) {
      const int q = ((qs[32 * c + l] >> (4 * h)) & 0x0F) | (((qh[l] >> s) & 1) << 4);
      y[32 * s + l] = ds * float(q) - ms;
    }
  }
}

// Q6_K (210 bytes, 16 sub-blocks of 16): ql[128] @0 | qh[64] @128 | int8 scales[16] @192 | d @208.
//   Element e = 128*h + 64*n + l (l in 0..63): low four bits = nibble n of ql[64*h + l];
//   element e = 128*h + 32*k + l (l in 0..31): high two bits = bits 2k..2k+1 of qh[32*h + l].
//   y = (d * scale[e / 16]) * (q - 32)
void deq_q6_k(const uint8_t* x, float* y) {
  const uint8_t* ql = x;
  const uint8_t* qh = x + 128;
  const uint8_t* sc = x + 192;
  const float d = h2f(x + 208);
  float dl[16];
  for (int s = 0; s < 16; ++s) dl[s] = d * float(int8_t(sc[s]));
  for (int e = 0; e < QK_K; ++e) {
    const int h = e / 128, r = e % 128;
    const int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
    const int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
    y[e] = dl[e / 16] * float((lo | hi << 4) - 32);
  }
}

// Q8_K (292 bytes): float32 d @0 | int8 q[256] @4 | int16 bsums[16] @260 (sums for dot products; unused
// here).  y = d * q
void deq_q8_k(const uint8_t* x, float* y) {
  const float d = bits_to_float(rd32(x));
  for (int i = 0; i < QK_K; ++i) y[i] = d * float(int8_t(x[4 + i]));
}

}  // namespace

void dequantize_row(GgmlType type, const uint8_t* src, float* dst, int64_t n) {
  const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(type));
  KVD_CHECK(info, "dequantize: unknown ggml type ", static_cast<uint32_t>(type));
  KVD_CHECK(info->dequantizable, "dequantize: ggml type ", info->name,
            " is not supported (supported: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K); "
            "re-quantize the model to one of these");
  KVD_CHECK(n >= 0 && n % info->block_size == 0, "dequantize: ", n, " elements is not a multiple of the ",
            info->name, " block size ", info->block_size);
  if (n == 0) return;  // (an empty tensor: dst may be null)
  const int64_t blocks = n / info->block_size;
  const size_t bs = info->block_size, ts = info->type_size;
  switch (type) {
    case GgmlType::F32:
      std::memcpy(dst, src, size_t(n) * 4);  // little-endian host assumed (x86-64, aarch64)
      return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(rd16(src + 2 * i));
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(rd16(src + 2 * i));
      return;
    default:
      break;
  }
  void (*fn)(const uint8_t*, float*) = nullptr;
  switch (type) {
    case GgmlType::Q8_0: fn = deq_q8_0; break;
    case GgmlType::Q4_0: fn = deq_q4_0; break;
    case GgmlType::Q4_1: fn = deq_q4_1; break;
    case GgmlType::Q5_0: fn = deq_q5_0; break;
    case GgmlType::Q5_1: fn = deq_q5_1; break;
    case GgmlType::Q2_K: fn = deq_q2_k; break;
    case GgmlType::Q3_K: fn = deq_q3_k; break;
    case GgmlType::Q4_K: fn = deq_q4_k; break;
    case GgmlType::Q5_K: fn = deq_q5_k; break;
    case GgmlType::Q6_K: fn = deq_q6_k; break;
    case GgmlType::Q8_K: fn = deq_q8_k; break;
    default: KVD_FAIL("dequantize: no dequantizer for ", info->name);
  }
  for (int64_t b = 0; b < blocks; ++b) fn(src + size_t(b) * ts, dst + size_t(b) * bs);
}

// ------------------------------------------------------------------------------------------------
// Metadata values
// ------------------------------------------------------------------------------------------------
const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8: return "u8";
    case GgufType::I8: return "i8";
    case GgufType::U16: return "u16";
    case GgufType::I16: return "i16";
    case GgufType::U32: return "u32";
    case GgufType::I32: return "i32";
    case GgufType::F32: return "f32";
    case GgufType::BOOL: return "bool";
    case GgufType::STRING: return "string";
    case GgufType::ARRAY: return "array";
    case GgufType::U64: return "u64";
    case GgufType::I64: return "i64";
    case GgufType::F64: return "f64";
  }
  return "unknown";
}

namespace {

// Bytes of a fixed-size value type; 0 for string / array / unknown.
size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    default: return 0;
  }
}

bool is_known_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::F64); }

bool is_integer(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16: case GgufType::U32:
    case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
    default: return false;
  }
}

// Raw bits of an integer type -> int64 (sign-extended for signed types). `ok` false if a u64 > INT64_MAX.
int64_t bits_to_int(GgufType t, uint64_t b, bool& ok) {
  ok = true;
  switch (t) {
    case GgufType::U8: return int64_t(uint8_t(b));
    case GgufType::I8: return int64_t(int8_t(uint8_t(b)));
    case GgufType::U16: return int64_t(uint16_t(b));
    case GgufType::I16: return int64_t(int16_t(uint16_t(b)));
    case GgufType::U32: return int64_t(uint32_t(b));
    case GgufType::I32: return int64_t(int32_t(uint32_t(b)));
    case GgufType::U64:
      ok = b <= uint64_t(std::numeric_limits<int64_t>::max());
      return int64_t(b);
    case GgufType::I64: return int64_t(b);
    case GgufType::BOOL: return b ? 1 : 0;
    default: ok = false; return 0;
  }
}

double bits_to_double(GgufType t, uint64_t b, bool& ok) {
  ok = true;
  if (t == GgufType::F32) return double(bits_to_float(uint32_t(b)));
  if (t == GgufType::F64) {
    double d;
    std::memcpy(&d, &b, 8);
    return d;
  }
  if (is_integer(t)) {
    if (t == GgufType::U64) return double(b);
    bool ok_int;
    return double(bits_to_int(t, b, ok_int));
  }
  ok = false;
  return 0;
}

}  // namespace

size_t GgufValue::size() const {
  if (type != GgufType::ARRAY) return 1;
  return elem_type == GgufType::STRING ? strs.size() : elems.size();
}

int64_t GgufValue::as_int() const {
  KVD_CHECK(is_integer(type), context, ": expected an integer, found ", gguf_type_name(type));
  bool ok;
  int64_t v = bits_to_int(type, bits, ok);
  KVD_CHECK(ok, context, ": value ", bits, " does not fit in int64");
  return v;
}

double GgufValue::as_double() const {
  bool ok;
  double v = bits_to_double(type, bits, ok);
  KVD_CHECK(ok, context, ": expected a number, found ", gguf_type_name(type));
  return v;
}

bool GgufValue::as_bool() const {
  KVD_CHECK(type == GgufType::BOOL, context, ": expected a bool, found ", gguf_type_name(type));
  return bits != 0;
}

const std::string& GgufValue::as_string() const {
  KVD_CHECK(type == GgufType::STRING, context, ": expected a string, found ", gguf_type_name(type));
  return str;
}

std::vector<int64_t> GgufValue::as_ints() const {
  KVD_CHECK(type == GgufType::ARRAY && (is_integer(elem_type) || elem_type == GgufType::BOOL), context,
            ": expected an array of integers, found ",
            type == GgufType::ARRAY ? std::string("array of ") + gguf_type_name(elem_type) : gguf_type_name(type));
  std::vector<int64_t> out(elems.size());
  for (size_t i = 0; i < elems.size(); ++i) {
    bool ok;
    out[i] = bits_to_int(elem_type, elems[i], ok);
    KVD_CHECK(ok, context, ": element ", i, " (", elems[i], ") does not fit in int64");
  }
  return out;
}

std::vector<double> GgufValue::as_doubles() const {
  KVD_CHECK(type == GgufType::ARRAY && (is_integer(elem_type) || elem_type == GgufType::F32 ||
                                        elem_type == GgufType::F64),
            context, ": expected an array of numbers, found ",
            type == GgufType::ARRAY ? std::string("array of ") + gguf_type_name(elem_type) : gguf_type_name(type));
  std::vector<double> out(elems.size());
  for (size_t i = 0; i < elems.size(); ++i) {
    bool ok;
    out[i] = bits_to_double(elem_type, elems[i], ok);
  }
  return out;
}

const std::vector<std::string>& GgufValue::as_strings() const {
  KVD_CHECK(type == GgufType::ARRAY && elem_type == GgufType::STRING, context,
            ": expected an array of strings, found ",
            type == GgufType::ARRAY ? std::string("array of ") + gguf_type_name(elem_type) : gguf_type_name(type));
  return strs;
}

// ------------------------------------------------------------------------------------------------
// Tensors
// ------------------------------------------------------------------------------------------------
int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (uint64_t d : dims) n *= int64_t(d);  // the reader checked that the product fits
  return n;
}

std::vector<int64_t> GgufTensor::shape() const {
  return std::vector<int64_t>(dims.rbegin(), dims.rend());
}

// ------------------------------------------------------------------------------------------------
// The reader
// ------------------------------------------------------------------------------------------------
namespace {

constexpr uint32_t kMaxDims = 4;                 // GGML_MAX_DIMS
constexpr uint64_t kMaxAlignment = 1ull << 30;

// A bounds-checked cursor over the mapped bytes. `where` names the part being parsed ("tensor info 17")
// so that a short read reports "<path>: truncated in tensor info 17".
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : p_(data), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }
  void set_where(std::string w) { where_ = std::move(w); }
  const std::string& where() const { return where_; }

  void need(uint64_t n) {
    if (n > left())
      KVD_FAIL(path_, ": truncated in ", where_, " (needs ", n, " more bytes at offset ", pos_, ", the file has ",
               size_, "); the file is incomplete or corrupt");
  }
  const uint8_t* take(uint64_t n) {
    need(n);
    const uint8_t* q = p_ + pos_;
    pos_ += size_t(n);
    return q;
  }
  uint32_t u32() { return rd32(take(4)); }
  uint64_t u64() { return rd64(take(8)); }

  std::string string(const char* what) {
    const uint64_t n = u64();
    if (n > left())
      KVD_FAIL(path_, ": ", where_, ": ", what, " length ", n, " exceeds the ", left(),
               " bytes left in the file; the file is corrupt");
    const uint8_t* q = take(n);
    return std::string(reinterpret_cast<const char*>(q), size_t(n));
  }

 private:
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
  std::string where_ = "the header";
};

GgufValue read_value(Cursor& c, uint32_t raw_type, const std::string& path) {
  GgufValue v;
  if (!is_known_type(raw_type))
    KVD_FAIL(path, ": ", c.where(), ": unknown value type ", raw_type, " (known: 0..12); the file is corrupt");
  v.type = static_cast<GgufType>(raw_type);
  if (v.type == GgufType::STRING) {
    v.str = c.string("string");
    return v;
  }
  if (v.type != GgufType::ARRAY) {
    const size_t n = scalar_size(v.type);
    const uint8_t* q = c.take(n);
    for (size_t i = 0; i < n; ++i) v.bits |= uint64_t(q[i]) << (8 * i);
    return v;
  }
  const uint32_t raw_elem = c.u32();
  if (!is_known_type(raw_elem))
    KVD_FAIL(path, ": ", c.where(), ": array of unknown value type ", raw_elem, "; the file is corrupt");
  v.elem_type = static_cast<GgufType>(raw_elem);
  KVD_CHECK(v.elem_type != GgufType::ARRAY, path, ": ", c.where(), ": nested arrays are not supported");
  const uint64_t count = c.u64();
  if (v.elem_type == GgufType::STRING) {
    // Each string takes at least its 8-byte length: bound the count before reserving anything.
    if (count > c.left() / 8)
      KVD_FAIL(path, ": ", c.where(), ": array length ", count, " exceeds what the ", c.left(),
               " bytes left in the file can hold; the file is corrupt");
    v.strs.reserve(size_t(count));
    for (uint64_t i = 0; i < count; ++i) v.strs.push_back(c.string("string"));
    return v;
  }
  const size_t es = scalar_size(v.elem_type);
  if (count > c.left() / es)
    KVD_FAIL(path, ": ", c.where(), ": array length ", count, " exceeds what the ", c.left(),
             " bytes left in the file can hold; the file is corrupt");
  const uint8_t* q = c.take(count * es);
  v.elems.resize(size_t(count));
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t b = 0;
    for (size_t k = 0; k < es; ++k) b |= uint64_t(q[i * es + k]) << (8 * k);
    v.elems[size_t(i)] = b;
  }
  return v;
}

}  // namespace

GgufFile::GgufFile(const std::string& path) : file_(path) {
  Cursor c(file_.data(), file_.size(), file_.path());
  const std::string& p = file_.path();

  // --- header ---
  c.set_where("the header");
  if (file_.size() < 4 || std::memcmp(file_.data(), "GGUF", 4) != 0)
    KVD_FAIL(p, ": not a GGUF file (the first four bytes are not \"GGUF\")");
  c.take(4);
  version_ = c.u32();
  if (version_ != 3) {
    if ((version_ & 0xFFFFu) == 0 && version_ != 0)
      KVD_FAIL(p, ": a big-endian GGUF file; only little-endian files are supported");
    if (version_ == 1 || version_ == 2)
      KVD_FAIL(p, ": GGUF version ", version_, " is not supported (only version 3); re-convert the model with a "
               "current llama.cpp (convert_hf_to_gguf.py)");
    KVD_FAIL(p, ": unknown GGUF version ", version_, " (only version 3 is supported)");
  }
  const uint64_t n_tensors = c.u64();
  const uint64_t n_kv = c.u64();
  // Smallest possible entries: a key-value is 8 (key length) + 4 (type) + 1 (u8); a tensor info is
  // 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
  if (n_kv > c.left() / 13)
    KVD_FAIL(p, ": the header claims ", n_kv, " metadata entries, more than the file (", file_.size(),
             " bytes) can hold; the file is corrupt");
  if (n_tensors > c.left() / 32)
    KVD_FAIL(p, ": the header claims ", n_tensors, " tensors, more than the file (", file_.size(),
             " bytes) can hold; the file is corrupt");

  // --- metadata ---
  kv_.reserve(size_t(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    c.set_where("metadata entry " + std::to_string(i));
    std::string key = c.string("key");
    c.set_where("metadata entry " + std::to_string(i) + " ('" + key + "')");
    const uint32_t type = c.u32();
    GgufValue v = read_value(c, type, p);
    v.context = p + ": metadata '" + key + "'";
    KVD_CHECK(kv_index_.emplace(key, kv_.size()).second, p, ": duplicate metadata key '", key,
              "'; the file is corrupt");
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const GgufValue* a = find("general.alignment")) {
    const int64_t al = a->as_int();  // the spec says u32; any integer type is accepted
    KVD_CHECK(al > 0 && (al & (al - 1)) == 0 && uint64_t(al) <= kMaxAlignment, p, ": general.alignment ", al,
              " is not a power of two between 1 and 2^30; the file is corrupt");
    alignment_ = uint64_t(al);
  }

  // --- tensor infos ---
  tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    c.set_where("tensor info " + std::to_string(i));
    GgufTensor t;
    t.name = c.string("tensor name");
    const std::string ctx = p + ": tensor '" + t.name + "'";
    const uint32_t n_dims = c.u32();
    KVD_CHECK(n_dims >= 1 && n_dims <= kMaxDims, ctx, ": n_dims ", n_dims, " is outside 1..", kMaxDims,
              "; the file is corrupt");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = c.u64();
      t.dims.push_back(dim);
      if (__builtin_mul_overflow(numel, dim, &numel) || numel > uint64_t(std::numeric_limits<int64_t>::max()))
        KVD_FAIL(ctx, ": dims overflow (element count above 2^63); the file is corrupt");
    }
    const uint32_t type_id = c.u32();
    const GgmlTypeInfo* info = ggml_type_info(type_id);
    KVD_CHECK(info, ctx, ": unknown tensor type ", type_id, "; the file is corrupt or needs a newer kvdistill");
    t.type = static_cast<GgmlType>(type_id);
    t.offset = c.u64();
    KVD_CHECK(t.dims[0] % info->block_size == 0, ctx, ": row length ", t.dims[0], " is not a multiple of the ",
              info->name, " block size ", info->block_size, "; the file is corrupt");
    const uint64_t n_blocks = numel / info->block_size;
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(n_blocks, uint64_t(info->type_size), &nbytes))
      KVD_FAIL(ctx, ": byte size overflows; the file is corrupt");
    t.nbytes = size_t(nbytes);
    KVD_CHECK(tensor_index_.emplace(t.name, tensors_.size()).second, p, ": duplicate tensor name '", t.name,
              "'; the file is corrupt");
    tensors_.push_back(std::move(t));
  }

  // --- data section ---
  const uint64_t end_of_infos = c.pos();
  data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;  // no overflow: both < 2^62
  const uint64_t size = file_.size();
  for (GgufTensor& t : tensors_) {
    const std::string ctx = p + ": tensor '" + t.name + "'";
    KVD_CHECK(t.offset % alignment_ == 0, ctx, ": data offset ", t.offset, " is not a multiple of the alignment ",
              alignment_, "; the file is corrupt");
    const bool inside = data_offset_ <= size && t.offset <= size - data_offset_ &&
                        t.nbytes <= size - data_offset_ - t.offset;
    if (!inside)
      KVD_FAIL(ctx, " (", ggml_type_name(t.type), ", ", t.nbytes, " bytes at data offset ", t.offset,
               ") extends past the end of the file (", size, " bytes); the file is truncated or corrupt");
    t.data = file_.data() + data_offset_ + t.offset;
  }
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufValue& GgufFile::at(const std::string& key) const {
  const GgufValue* v = find(key);
  KVD_CHECK(v, path(), ": metadata key '", key, "' not found");
  return *v;
}

int64_t GgufFile::get_int_or(const std::string& key, int64_t def) const {
  const GgufValue* v = find(key);
  return v ? v->as_int() : def;
}
double GgufFile::get_double_or(const std::string& key, double def) const {
  const GgufValue* v = find(key);
  return v ? v->as_double() : def;
}
std::string GgufFile::get_string_or(const std::string& key, const std::string& def) const {
  const GgufValue* v = find(key);
  return v ? v->as_string() : def;
}
bool GgufFile::get_bool_or(const std::string& key, bool def) const {
  const GgufValue* v = find(key);
  return v ? v->as_bool() : def;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensor& GgufFile::tensor(const std::string& name) const {
  const GgufTensor* t = find_tensor(name);
  KVD_CHECK(t, path(), ": tensor '", name, "' not found");
  return *t;
}

void GgufFile::dequantize(const GgufTensor& t, float* out) const {
  try {
    dequantize_row(t.type, t.data, out, t.numel());
  } catch (const Error& e) {
    KVD_FAIL(path(), ": tensor '", t.name, "': ", e.what());
  }
}

std::vector<float> GgufFile::dequantize(const GgufTensor& t) const {
  std::vector<float> out(size_t(t.numel()));
  dequantize(t, out.data());
  return out;
}

}  // namespace kvd
