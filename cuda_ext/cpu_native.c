/* fbserve's CPU kernel for quantized linears: y = x @ dequant(Wq)^T + (x @ A^T) @ B^T + bias, for a few
 * rows of x (decode), reading 2/3/4-bit codes at 2/3.25/4 bits per weight (3-bit g128; not a 4-bit
 * container) and the fp16 low-rank branch in the same pass. x86-64, built twice by cuda_ext/cpu_native.py
 * (which also defines the tile layout below, `tile_words`): for AVX-512 BF16 (FBQ_AVX512 below) and for
 * AVX2 + FMA + F16C (most laptop CPUs): the same layout, algebra and threading; the ISA-specific parts
 * (tile_kernel, the branch's A x, the decode step's norm / attention / SiLU) exist once per ISA.
 *
 * Tile layout (per 16 output columns, per quantization group, contiguous): the group's k values in pairs
 * (k, k + 1); word q holds pairs j = S q + s, s < S, with code[k] at bit b s and code[k + 1] at bit
 * 16 + b s (b = bits; S = 8 for 2-bit, 5 for 3-bit with 2 bits unused, 4 for 4-bit; a group's last word
 * may be partly empty: 128 values at 3 bits are 13 words, 3.25 bits per weight).
 * So one rotate and one ternary-logic op turn a word into 16 bf16 pairs (1 + code / L) for one k pair,
 * which vdpbf16ps multiplies with the bf16 pair (x[k], x[k + 1]) and adds to fp32.
 *
 * Arithmetic: x is rounded to bf16 (as torch's int4 CPU op does); the codes are exact in bf16; products
 * and sums are fp32 (the AVX2 build decodes the same fields into fp32 1 + code / L, multiplies them by the
 * bf16-rounded x held as fp32, and sums in fp32 too).  Per group: acc = X + sum(x * code) / L, X = sum(x) over the group, so
 * sum(x * (code - zero)) * scale = sa * acc - sb * X with sa = L * scale (exact) and sb = scale * (L + zero)
 * (L + zero exact, one fp32 rounding), computed per group from the fp16 scale and zero (`group_scales`).  The branch:
 * t = A x in fp32 from the fp16 A, then y += B t from the fp16 B^T.
 */
#include <immintrin.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

typedef struct {
  const int32_t *words;   /* (n_pad / 16, words_per_tile, 16) */
  const uint16_t *sz;     /* fp16 (n_pad / 16, G, 2, 16): per tile and group, 16 scales then 16 zeros */
  const uint16_t *a;      /* fp16 (r, K) or NULL */
  const uint16_t *bt;     /* fp16 (n_pad / 16, r, 16) or NULL: B^T per tile */
  const float *bias;      /* (n_pad) or NULL */
  int32_t n, n_pad, bits, group, rank, y_off, words_per_tile, pad_;
} fbq_part;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define FBQ_AVX512 1
typedef uint16_t x_t;   /* x as the kernel reads it: bf16 bits */
#define MAX_ROWS 4
#else
typedef float x_t;      /* bf16-rounded x held as fp32 (no bf16 dot product without AVX-512 BF16) */
#define MAX_ROWS 2      /* 16 ymm registers: two rows of four accumulators each */
#define MANY_ROWS 4     /* more rows than this: tile_many_rows decodes each group once per block of rows */
#define ROW_BLOCK 64    /* rows per block: 64 rows of x (K = 1536: 384 KB) stay in L2 across the tiles */
#endif
#define X_BYTES 4       /* scratch bytes per x element, whichever x_t (cpu_native.py sizes the scratch) */

/* Code written once for both builds (the branch's A x, the decode step's elementwise parts): `vf` is a zmm
 * (16 floats) or a ymm (8). */
#ifdef FBQ_AVX512
typedef __m512 vf;
#define VW 16
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_ZERO _mm512_setzero_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_FMA _mm512_fmadd_ps
#define V_FNMA _mm512_fnmadd_ps
#define V_SUM _mm512_reduce_add_ps
#define V_LOADH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))  /* VW fp16 -> fp32 */
#define V_ROUND(v) _mm512_roundscale_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_SCALE2(p, n) _mm512_scalef_ps((p), (n))  /* p * 2^n */
#else
typedef __m256 vf;
#define VW 8
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_ZERO _mm256_setzero_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_FMA _mm256_fmadd_ps
#define V_FNMA _mm256_fnmadd_ps
#define V_SUM hsum256
#define V_LOADH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define V_ROUND(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_SCALE2(p, n) _mm256_mul_ps((p), _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))  /* p * 2^n, n in [-126, 127] */
#endif


#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_TILES 4  /* software prefetch distance, in tiles (measured: bench/RESULTS.md) */

#ifdef FBQ_AVX512
/* 16 bf16 pairs (1 + field / L) from a word rotated so the field sits at the mask's bits */
#define DECODE(w, rot, mask) _mm512_ternarylogic_epi32(_mm512_ror_epi32((w), (rot)), (mask), one, 0xEA)
#define XPAIR(mi, k) ({ uint32_t xp_; memcpy(&xp_, xb + (size_t)(m0 + (mi)) * k_pad + (k), 4); \
                        (__m512bh)_mm512_set1_epi32((int)xp_); })

#endif

INLINE float group_sum(const float *xs32, int kg, int ke) {
  float s = 0.f;
  for (int j = kg / 32; j < ke / 32; j++) s += xs32[j];
  return s;
}

/* ask for everything tile `tile` reads, into L2: the hardware prefetcher alone keeps up poorly */
static inline void prefetch_tile(const fbq_part *p, int tile, int G) {
  const char *w = (const char *)(p->words + (size_t)tile * p->words_per_tile * 16);
  for (int line = 0; line < p->words_per_tile; line++) _mm_prefetch(w + 64 * line, _MM_HINT_T1);
  for (int gi = 0; gi < G; gi++) _mm_prefetch((const char *)(p->sz + ((size_t)tile * G + gi) * 32), _MM_HINT_T1);
  if (p->bt) {
    const char *b = (const char *)(p->bt + (size_t)tile * p->rank * 16);
    for (int line = 0; line < (p->rank + 1) / 2; line++) _mm_prefetch(b + 64 * line, _MM_HINT_T1);
  }
}

/* a code's value in the tile words is 1 + code / L (header) */
INLINE float code_lane(int bits) { return bits == 4 ? 16.f : 8.f; }

#ifdef FBQ_AVX512
/* group gi's sa = L scale, sb = scale (L + zero) for a tile's 16 columns, from its fp16 scales and zeros */
INLINE void group_scales(const fbq_part *p, int tile, int G, int gi, int bits, __m512 *sa, __m512 *sb) {
  const uint16_t *q = p->sz + ((size_t)tile * G + gi) * 32;
  const __m512 L = _mm512_set1_ps(code_lane(bits));
  const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)q));
  const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(q + 16)));
  *sa = _mm512_mul_ps(scale, L);
  *sb = _mm512_mul_ps(scale, _mm512_add_ps(L, zero));
}

/* one 16-column tile of one part for rows m0 .. m0 + ROWS - 1 */
INLINE void tile_kernel(const fbq_part *p, int tile, int m0, const int ROWS, const int bits, int K, int k_pad,
                        const x_t *xb, const float *xs32, const float *t, int t_ld, float *y, int ldy) {
  const int g = p->group, n_pad = p->n_pad, n0 = tile * 16;
  const int G = (K + g - 1) / g;
  const __m512i one = _mm512_set1_epi32(0x3F803F80);
  const __m512i m2 = _mm512_set1_epi32(0x00300030), m4 = _mm512_set1_epi32(0x00780078);
  const __m512i m3 = _mm512_set1_epi32(0x00700070);
  const int32_t *w = p->words + (size_t)tile * p->words_per_tile * 16;
  if (m0 == 0 && tile + PREFETCH_TILES < n_pad / 16) prefetch_tile(p, tile + PREFETCH_TILES, G);
  __m512 yacc[MAX_ROWS];
  for (int mi = 0; mi < ROWS; mi++) yacc[mi] = _mm512_setzero_ps();
  for (int gi = 0; gi < G; gi++) {
    const int kg = gi * g, ke = kg + g < k_pad ? kg + g : k_pad;
    __m512 a0[MAX_ROWS], a1[MAX_ROWS], a2[MAX_ROWS], a3[MAX_ROWS];  /* 4 chains: vdpbf16ps latency */
    for (int mi = 0; mi < ROWS; mi++) a0[mi] = a1[mi] = a2[mi] = a3[mi] = _mm512_setzero_ps();
    /* k pairs of this group, S per word: rotate pair s's fields to mantissa bit `pos`, mask, OR 1.0 */
    const int S = bits == 2 ? 8 : bits == 3 ? 5 : 4, pos = bits == 4 ? 3 : 4;
    const __m512i fmask = bits == 2 ? m2 : bits == 3 ? m3 : m4;
    const int pairs = (ke - kg) / 2, full = pairs / S, rest = pairs % S;
#define STEP(s, A) { const __m512i cv = DECODE(wv, (bits * (s) - pos) & 31, fmask); \
      for (int mi = 0; mi < ROWS; mi++) A[mi] = _mm512_dpbf16_ps(A[mi], (__m512bh)cv, XPAIR(mi, k0 + 2 * (s))); }
    for (int q = 0; q < full; q++) {
      const __m512i wv = _mm512_loadu_si512(w + 16 * q);
      const int k0 = kg + 2 * S * q;
      if (bits == 2) { STEP(0, a0) STEP(1, a1) STEP(2, a2) STEP(3, a3) STEP(4, a0) STEP(5, a1) STEP(6, a2) STEP(7, a3) }
      else if (bits == 3) { STEP(0, a0) STEP(1, a1) STEP(2, a2) STEP(3, a3) STEP(4, a0) }
      else { STEP(0, a0) STEP(1, a1) STEP(2, a2) STEP(3, a3) }
    }
    if (rest) {  /* a partly filled last word */
      const __m512i wv = _mm512_loadu_si512(w + 16 * full);
      const int k0 = kg + 2 * S * full;
      for (int s2 = 0; s2 < rest; s2++) {
        const __m512i cv = _mm512_ternarylogic_epi32(
            _mm512_rorv_epi32(wv, _mm512_set1_epi32((bits * s2 - pos) & 31)), fmask, one, 0xEA);
        for (int mi = 0; mi < ROWS; mi++) a1[mi] = _mm512_dpbf16_ps(a1[mi], (__m512bh)cv, XPAIR(mi, k0 + 2 * s2));
      }
    }
    w += (size_t)(full + (rest ? 1 : 0)) * 16;
    __m512 sa, sb;
    group_scales(p, tile, G, gi, bits, &sa, &sb);
    for (int mi = 0; mi < ROWS; mi++) {
      const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0[mi], a1[mi]), _mm512_add_ps(a2[mi], a3[mi]));
      const float xg = group_sum(xs32 + (size_t)(m0 + mi) * (k_pad / 32), kg, ke);
      yacc[mi] = _mm512_fnmadd_ps(sb, _mm512_set1_ps(xg), _mm512_fmadd_ps(sa, acc, yacc[mi]));
    }
  }
  if (p->bt)
    for (int j = 0; j < p->rank; j++) {
      const __m512 bv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p->bt + ((size_t)tile * p->rank + j) * 16)));
      for (int mi = 0; mi < ROWS; mi++)
        yacc[mi] = _mm512_fmadd_ps(_mm512_set1_ps(t[(size_t)(m0 + mi) * t_ld + j]), bv, yacc[mi]);
    }
  if (p->bias) {
    const __m512 bv = _mm512_loadu_ps(p->bias + n0);
    for (int mi = 0; mi < ROWS; mi++) yacc[mi] = _mm512_add_ps(yacc[mi], bv);
  }
  const int nn = p->n - n0 < 16 ? p->n - n0 : 16;
  const __mmask16 keep = (__mmask16)((1u << nn) - 1u);
  for (int mi = 0; mi < ROWS; mi++)
    _mm512_mask_storeu_ps(y + (size_t)(m0 + mi) * ldy + p->y_off + n0, keep, yacc[mi]);
}

#else
/* as the AVX-512 build's, in two halves of 8 columns */
INLINE void group_scales(const fbq_part *p, int tile, int G, int gi, int bits, __m256 *sa0, __m256 *sa1, __m256 *sb0,
                         __m256 *sb1) {
  const uint16_t *q = p->sz + ((size_t)tile * G + gi) * 32;
  const __m256 L = _mm256_set1_ps(code_lane(bits));
  const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
  const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 8)));
  const __m256 z0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16)));
  const __m256 z1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 24)));
  *sa0 = _mm256_mul_ps(s0, L);
  *sa1 = _mm256_mul_ps(s1, L);
  *sb0 = _mm256_mul_ps(s0, _mm256_add_ps(L, z0));
  *sb1 = _mm256_mul_ps(s1, _mm256_add_ps(L, z1));
}

/* lanes' field (at bit `from`) as fp32 1 + code / L: moved to bit 16 + pos (where a bf16's mantissa field
 * sits in fp32, so L is the AVX-512 build's), masked, OR 1.0 */
INLINE __m256 field_ps(__m256i w, int from, int to, __m256i fmask, __m256i one) {
  const __m256i v = to >= from ? _mm256_slli_epi32(w, to - from) : _mm256_srli_epi32(w, from - to);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, fmask), one));
}

/* one 16-column tile of one part for rows m0 .. m0 + ROWS - 1: columns 0-7 and 8-15 in two ymm halves */
INLINE void tile_kernel(const fbq_part *p, int tile, int m0, const int ROWS, const int bits, int K, int k_pad,
                        const x_t *xf, const float *xs32, const float *t, int t_ld, float *y, int ldy) {
  const int g = p->group, n_pad = p->n_pad, n0 = tile * 16;
  const int G = (K + g - 1) / g;
  const int S = bits == 2 ? 8 : bits == 3 ? 5 : 4, pos = bits == 4 ? 3 : 4;
  const __m256i one = _mm256_set1_epi32(0x3F800000), fmask = _mm256_set1_epi32(((1 << bits) - 1) << (16 + pos));
  const int32_t *w = p->words + (size_t)tile * p->words_per_tile * 16;
  if (m0 == 0 && tile + PREFETCH_TILES < n_pad / 16) prefetch_tile(p, tile + PREFETCH_TILES, G);
  __m256 ylo[MAX_ROWS], yhi[MAX_ROWS];
  for (int mi = 0; mi < ROWS; mi++) ylo[mi] = yhi[mi] = _mm256_setzero_ps();
  for (int gi = 0; gi < G; gi++) {
    const int kg = gi * g, ke = kg + g < k_pad ? kg + g : k_pad;
    __m256 a0[MAX_ROWS][2], a1[MAX_ROWS][2];  /* two chains per half: FMA latency */
    for (int mi = 0; mi < ROWS; mi++) a0[mi][0] = a0[mi][1] = a1[mi][0] = a1[mi][1] = _mm256_setzero_ps();
    const int pairs = (ke - kg) / 2, full = pairs / S, rest = pairs % S;
    /* pair s of a word: code[k] at bit bits * s, code[k + 1] at 16 + bits * s, both to bit 16 + pos */
#define STEP2(s, A) { \
      const __m256 l0 = field_ps(w0, bits * (s), 16 + pos, fmask, one), h0 = field_ps(w0, 16 + bits * (s), 16 + pos, fmask, one); \
      const __m256 l1 = field_ps(w1, bits * (s), 16 + pos, fmask, one), h1 = field_ps(w1, 16 + bits * (s), 16 + pos, fmask, one); \
      for (int mi = 0; mi < ROWS; mi++) { \
        const float *xk = xf + (size_t)(m0 + mi) * k_pad + k0 + 2 * (s); \
        const __m256 xa = _mm256_broadcast_ss(xk), xc = _mm256_broadcast_ss(xk + 1); \
        A[mi][0] = _mm256_fmadd_ps(h0, xc, _mm256_fmadd_ps(l0, xa, A[mi][0])); \
        A[mi][1] = _mm256_fmadd_ps(h1, xc, _mm256_fmadd_ps(l1, xa, A[mi][1])); } }
    for (int q = 0; q < full; q++) {
      const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 16 * q));
      const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 16 * q + 8));
      const int k0 = kg + 2 * S * q;
      if (bits == 2) { STEP2(0, a0) STEP2(1, a1) STEP2(2, a0) STEP2(3, a1) STEP2(4, a0) STEP2(5, a1) STEP2(6, a0) STEP2(7, a1) }
      else if (bits == 3) { STEP2(0, a0) STEP2(1, a1) STEP2(2, a0) STEP2(3, a1) STEP2(4, a0) }
      else { STEP2(0, a0) STEP2(1, a1) STEP2(2, a0) STEP2(3, a1) }
    }
    if (rest) {  /* a partly filled last word */
      const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 16 * full));
      const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 16 * full + 8));
      const int k0 = kg + 2 * S * full;
      for (int s2 = 0; s2 < rest; s2++) STEP2(s2, a1)
    }
#undef STEP2
    w += (size_t)(full + (rest ? 1 : 0)) * 16;
    __m256 sa0, sa1, sb0, sb1;
    group_scales(p, tile, G, gi, bits, &sa0, &sa1, &sb0, &sb1);
    for (int mi = 0; mi < ROWS; mi++) {
      const __m256 xg = _mm256_set1_ps(group_sum(xs32 + (size_t)(m0 + mi) * (k_pad / 32), kg, ke));
      ylo[mi] = _mm256_fnmadd_ps(sb0, xg, _mm256_fmadd_ps(sa0, _mm256_add_ps(a0[mi][0], a1[mi][0]), ylo[mi]));
      yhi[mi] = _mm256_fnmadd_ps(sb1, xg, _mm256_fmadd_ps(sa1, _mm256_add_ps(a0[mi][1], a1[mi][1]), yhi[mi]));
    }
  }
  if (p->bt)
    for (int j = 0; j < p->rank; j++) {
      const uint16_t *bj = p->bt + ((size_t)tile * p->rank + j) * 16;
      const __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)bj));
      const __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bj + 8)));
      for (int mi = 0; mi < ROWS; mi++) {
        const __m256 tv = _mm256_set1_ps(t[(size_t)(m0 + mi) * t_ld + j]);
        ylo[mi] = _mm256_fmadd_ps(tv, b0, ylo[mi]);
        yhi[mi] = _mm256_fmadd_ps(tv, b1, yhi[mi]);
      }
    }
  if (p->bias) {
    const __m256 b0 = _mm256_loadu_ps(p->bias + n0), b1 = _mm256_loadu_ps(p->bias + n0 + 8);
    for (int mi = 0; mi < ROWS; mi++) { ylo[mi] = _mm256_add_ps(ylo[mi], b0); yhi[mi] = _mm256_add_ps(yhi[mi], b1); }
  }
  const int nn = p->n - n0 < 16 ? p->n - n0 : 16;
  for (int mi = 0; mi < ROWS; mi++) {
    float *out = y + (size_t)(m0 + mi) * ldy + p->y_off + n0;
    if (nn == 16) {
      _mm256_storeu_ps(out, ylo[mi]);
      _mm256_storeu_ps(out + 8, yhi[mi]);
    } else {
      float tmp[16];
      _mm256_storeu_ps(tmp, ylo[mi]);
      _mm256_storeu_ps(tmp + 8, yhi[mi]);
      memcpy(out, tmp, sizeof(float) * (size_t)nn);
    }
  }
}

/* Many rows (prefill) of one tile: each group's 16 x g weights are decoded once into an L1 buffer of fp32
 * (1 + code / L) and every row runs FMAs over it, two rows at a time (eight accumulator chains), instead of
 * decoding the words again for every two rows. Same arithmetic as tile_kernel. */
static void tile_many_rows(const fbq_part *p, int tile, int M, const int bits, int K, int k_pad, const x_t *xf,
                           const float *xs32, const float *t, int t_ld, float *y, int ldy) {
  const int g = p->group, n0 = tile * 16, G = (K + g - 1) / g;
  const int S = bits == 2 ? 8 : bits == 3 ? 5 : 4, pos = bits == 4 ? 3 : 4;
  const __m256i one = _mm256_set1_epi32(0x3F800000), fmask = _mm256_set1_epi32(((1 << bits) - 1) << (16 + pos));
  const int32_t *w = p->words + (size_t)tile * p->words_per_tile * 16;
  float wbuf[128 * 16] __attribute__((aligned(32)));  /* (k in the group, 16 columns); g <= 128 */
  const int nn = p->n - n0 < 16 ? p->n - n0 : 16;
  for (int m = 0; m < M; m++) memset(y + (size_t)m * ldy + p->y_off + n0, 0, sizeof(float) * (size_t)nn);
  for (int gi = 0; gi < G; gi++) {
    const int kg = gi * g, ke = kg + g < k_pad ? kg + g : k_pad, pairs = (ke - kg) / 2;
    for (int j = 0; j < pairs; j++) {
      const int q = j / S, sh = bits * (j % S);
      const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 16 * q));
      const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 16 * q + 8));
      float *row = wbuf + (size_t)2 * j * 16;
      _mm256_store_ps(row, field_ps(w0, sh, 16 + pos, fmask, one));
      _mm256_store_ps(row + 8, field_ps(w1, sh, 16 + pos, fmask, one));
      _mm256_store_ps(row + 16, field_ps(w0, 16 + sh, 16 + pos, fmask, one));
      _mm256_store_ps(row + 24, field_ps(w1, 16 + sh, 16 + pos, fmask, one));
    }
    w += (size_t)((pairs + S - 1) / S) * 16;
    __m256 sa[2], sb[2];
    group_scales(p, tile, G, gi, bits, &sa[0], &sa[1], &sb[0], &sb[1]);
    for (int m0 = 0; m0 < M; m0 += 4) {  /* four rows x two halves: eight FMA chains, six loads per eight FMAs */
      const int rows = M - m0 < 4 ? M - m0 : 4;
      __m256 acc[4][2];
      for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      const float *xr[4];
      for (int r = 0; r < 4; r++) xr[r] = xf + (size_t)(m0 + (r < rows ? r : 0)) * k_pad + kg;
      for (int k = 0; k < ke - kg; k++) {
        const __m256 lo = _mm256_load_ps(wbuf + (size_t)k * 16), hi = _mm256_load_ps(wbuf + (size_t)k * 16 + 8);
        for (int r = 0; r < 4; r++) {
          const __m256 xv = _mm256_broadcast_ss(xr[r] + k);
          acc[r][0] = _mm256_fmadd_ps(lo, xv, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(hi, xv, acc[r][1]);
        }
      }
      for (int r = 0; r < rows; r++) {
        float *out = y + (size_t)(m0 + r) * ldy + p->y_off + n0, tmp[16];
        const __m256 xg = _mm256_set1_ps(group_sum(xs32 + (size_t)(m0 + r) * (k_pad / 32), kg, ke));
        for (int h = 0; h < 2; h++) {
          const __m256 part = _mm256_fnmadd_ps(sb[h], xg, _mm256_mul_ps(sa[h], acc[r][h]));
          _mm256_storeu_ps(tmp + 8 * h, part);
        }
        for (int c = 0; c < nn; c++) out[c] += tmp[c];
      }
    }
  }
  const __m256 bias0 = p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps();
  const __m256 bias1 = p->bias ? _mm256_loadu_ps(p->bias + n0 + 8) : _mm256_setzero_ps();
  const uint16_t *bt = p->bt ? p->bt + (size_t)tile * p->rank * 16 : NULL;
  for (int m = 0; m < M; m++) {  /* branch and bias */
    __m256 v0 = bias0, v1 = bias1;
    for (int j = 0; j < p->rank; j++) {
      const __m256 tv = _mm256_set1_ps(t[(size_t)m * t_ld + j]);
      v0 = _mm256_fmadd_ps(tv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bt + (size_t)j * 16))), v0);
      v1 = _mm256_fmadd_ps(tv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bt + (size_t)j * 16 + 8))), v1);
    }
    float *out = y + (size_t)m * ldy + p->y_off + n0, tmp[16];
    _mm256_storeu_ps(tmp, v0);
    _mm256_storeu_ps(tmp + 8, v1);
    for (int c = 0; c < nn; c++) out[c] += tmp[c];
  }
}

INLINE float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#endif

/* t[j] = A[j] . x for one fp16 row of A */
static float dot_fp16(const uint16_t *ar, const float *xr, int K) {
  vf acc = V_ZERO();
  int k = 0;
  for (; k + VW <= K; k += VW) acc = V_FMA(V_LOADH(ar + k), V_LOAD(xr + k), acc);
  float s = V_SUM(acc);
  for (; k < K; k++) s += _cvtsh_ss(ar[k]) * xr[k];
  return s;
}

#define TILE_BITS(ROWS) \
  switch (p->bits) { \
    case 2: tile_kernel(p, tile, m0, ROWS, 2, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; \
    case 3: tile_kernel(p, tile, m0, ROWS, 3, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; \
    default: tile_kernel(p, tile, m0, ROWS, 4, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; }

static void tile_all_rows(const fbq_part *p, int tile, int M, int K, int k_pad, const x_t *xb, const float *xs32,
                          const float *t, int t_ld, float *y, int ldy) {
  int m0 = 0;
#ifdef FBQ_AVX512
  for (; m0 + 4 <= M; m0 += 4) TILE_BITS(4)
#endif
  for (; m0 + 2 <= M; m0 += 2) TILE_BITS(2)
  for (; m0 < M; m0++) TILE_BITS(1)
}

static uint16_t bf16_round(float f) {  /* round to nearest even; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static float bf16_value(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* What every tile of one matmul call reads besides the weights: x rounded to bf16, its sums per 32, and the
 * branch's t = A x (fp32), all in the caller's scratch. */
typedef struct {
  int M, K, k_pad, r_total, tiles;
  const x_t *xb;
  const float *xs32, *t;
} mm_input;

/* scratch bytes: M * (k_pad * X_BYTES + k_pad / 32 * 4 + sum(rank) * 4) */
static mm_input mm_layout(int M, int K, int n_parts, const fbq_part *parts, void *scratch) {
  const int k_pad = (K + 31) / 32 * 32;
  int r_total = 0, tiles = 0;
  for (int i = 0; i < n_parts; i++) { r_total += parts[i].rank; tiles += parts[i].n_pad / 16; }
  const float *xs32 = (const float *)((char *)scratch + (size_t)M * k_pad * X_BYTES);
  return (mm_input){M, K, k_pad, r_total, tiles, (const x_t *)scratch, xs32, xs32 + (size_t)M * (k_pad / 32)};
}

/* rows [m0, m1) of what every tile reads: x rounded, its sums per 32, t = A x */
static void mm_prepare_rows(const mm_input *in, const float *x, int ldx, int n_parts, const fbq_part *parts, int m0,
                            int m1) {
  const int K = in->K, k_pad = in->k_pad, r_total = in->r_total;
  x_t *xb = (x_t *)in->xb;
  float *xs32 = (float *)in->xs32, *t = (float *)in->t;
  for (int m = m0; m < m1; m++) {
    const float *xr = x + (size_t)m * ldx;
    x_t *xbr = xb + (size_t)m * k_pad;
#ifdef FBQ_AVX512
    for (int k = 0; k < K; k++) xbr[k] = bf16_round(xr[k]);
#define X_VALUE(v) bf16_value(v)
#else
    for (int k = 0; k < K; k++) xbr[k] = bf16_value(bf16_round(xr[k]));
#define X_VALUE(v) (v)
#endif
    for (int k = K; k < k_pad; k++) xbr[k] = 0;
    for (int j = 0; j < k_pad / 32; j++) {
      float s = 0.f;
      for (int k = 32 * j; k < 32 * j + 32; k++) s += X_VALUE(xbr[k]);
      xs32[(size_t)m * (k_pad / 32) + j] = s;
    }
#undef X_VALUE
    int r0 = 0;
    for (int i = 0; i < n_parts; i++) {
      for (int j = 0; j < parts[i].rank; j++) t[(size_t)m * r_total + r0 + j] = dot_fp16(parts[i].a + (size_t)j * K, xr, K);
      r0 += parts[i].rank;
    }
  }
}

static mm_input mm_prepare(int M, int K, const float *x, int ldx, int n_parts, const fbq_part *parts, void *scratch) {
  const mm_input in = mm_layout(M, K, n_parts, parts, scratch);
  mm_prepare_rows(&in, x, ldx, n_parts, parts, 0, M);
  return in;
}

/* tiles [t0, t1) of the parts (numbered across parts, in order), each for every row */
static void mm_tiles(const mm_input *in, int n_parts, const fbq_part *parts, float *y, int ldy, int t0, int t1) {
  int i = 0, tile = t0, r0 = 0;
  while (i < n_parts && tile >= parts[i].n_pad / 16) { tile -= parts[i].n_pad / 16; r0 += parts[i].rank; i++; }
  /* the first tiles this thread reads of each part in its range: tile_kernel prefetches only ahead
   * within a part */
  for (int pi = i, first = tile, left = t1 - t0; pi < n_parts && left > 0; pi++, first = 0) {
    const int G = (in->K + parts[pi].group - 1) / parts[pi].group, n = parts[pi].n_pad / 16;
    for (int d = 0; d < PREFETCH_TILES && first + d < n && d < left; d++) prefetch_tile(parts + pi, first + d, G);
    left -= n - first;
  }
#ifndef FBQ_AVX512
  if (in->M > MANY_ROWS) {  /* blocks of rows whose x stays in L2, each over this thread's tiles */
    const int i0 = i, tile0 = tile, r00 = r0;
    for (int mb = 0; mb < in->M; mb += ROW_BLOCK) {
      const int rb = in->M - mb < ROW_BLOCK ? in->M - mb : ROW_BLOCK;
      i = i0, tile = tile0, r0 = r00;
      for (int ti = t0; ti < t1; ti++) {
        tile_many_rows(parts + i, tile, rb, parts[i].bits, in->K, in->k_pad, in->xb + (size_t)mb * in->k_pad,
                       in->xs32 + (size_t)mb * (in->k_pad / 32), in->t + (size_t)mb * in->r_total + r0, in->r_total,
                       y + (size_t)mb * ldy, ldy);
        if (++tile == parts[i].n_pad / 16 && i + 1 < n_parts) { tile = 0; r0 += parts[i].rank; i++; }
      }
    }
    return;
  }
#endif
  for (int ti = t0; ti < t1; ti++) {
    tile_all_rows(parts + i, tile, in->M, in->K, in->k_pad, in->xb, in->xs32, in->t + r0, in->r_total, y, ldy);
    if (++tile == parts[i].n_pad / 16 && i + 1 < n_parts) { tile = 0; r0 += parts[i].rank; i++; }
  }
}

void fbq_cpu_matmul(int M, int K, const float *x, int ldx, float *y, int ldy, int n_parts, const fbq_part *parts,
                    int n_threads, void *scratch) {
  const mm_input in = mm_layout(M, K, n_parts, parts, scratch);
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (M >= 2 * nth) {  /* many rows (prefill): each thread prepares a share, all meet before the tiles */
      mm_prepare_rows(&in, x, ldx, n_parts, parts, (int)((long)M * tid / nth), (int)((long)M * (tid + 1) / nth));
#pragma omp barrier
    } else {
#pragma omp single
      mm_prepare_rows(&in, x, ldx, n_parts, parts, 0, M);
    }
    mm_tiles(&in, n_parts, parts, y, ldy, (int)((long)in.tiles * tid / nth), (int)((long)in.tiles * (tid + 1) / nth));
  }
}

/* ---- whole decoder layers for decode steps (one new token per row) ------------------------------------
 * Llama layers whose seven projections all run on the kernel above, in one call per step: RMSNorm,
 * q/k/v, RoPE (cos/sin given per row), KV-cache write, attention of each row over its own cached
 * positions 0..pos (GQA: kv head j serves query heads j*G .. j*G+G-1), o, RMSNorm, gate/up, SiLU * up,
 * down, residual adds. All fp32 except the projections' bf16 x (above) and the KV cache's type (fp32, fp16
 * or bf16: keys and values are rounded to it when written, read back as fp32). */

typedef struct {
  const float *ln1, *ln2;        /* RMSNorm weights (C) */
  const fbq_part *qkv, *o, *gu, *down;
  void *k_cache, *v_cache;       /* (slots, Hkv, max_len, D) contiguous, of fbq_dims.kv_type */
  float eps1, eps2;
  int32_t n_qkv, n_gu, pad_[2];
} fbq_layer;

/* KV cache element types (fbq_dims.kv_type): a narrower cache halves the bytes attention reads */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

typedef struct {
  int32_t C, H, Hkv, D, I, max_len, n_layers, kv_type;
} fbq_dims;

#ifdef FBQ_AVX512
#define V_LOADB(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32( \
    _mm256_loadu_si256((const __m256i *)(p))), 16))  /* VW bf16 -> fp32 */
#else
#define V_LOADB(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32( \
    _mm_loadu_si128((const __m128i *)(p))), 16))
#endif

/* VW cache values from element i of a cache of `type`, as fp32 */
INLINE vf kv_load(const void *cache, size_t i, const int type) {
  if (type == KV_F16) return V_LOADH((const uint16_t *)cache + i);
  if (type == KV_BF16) return V_LOADB((const uint16_t *)cache + i);
  return V_LOAD((const float *)cache + i);
}

/* D fp32 values into element i of a cache of `type`, rounded to nearest even */
static void kv_store(void *cache, size_t i, const float *src, int D, int type) {
  if (type == KV_F32) { memcpy((float *)cache + i, src, sizeof(float) * (size_t)D); return; }
  uint16_t *dst = (uint16_t *)cache + i;
  for (int d = 0; d < D; d++) dst[d] = type == KV_F16 ? _cvtss_sh(src[d], _MM_FROUND_TO_NEAREST_INT) : bf16_round(src[d]);
}

static inline vf v_exp(vf x) {  /* e^x, Cephes expf polynomial; ~1 ulp; x clamped to [-87.3, 88] */
  x = V_MAX(V_MIN(x, V_SET1(88.0f)), V_SET1(-87.3f));
  const vf n = V_ROUND(V_MUL(x, V_SET1(1.44269504088896341f)));
  vf r = V_FNMA(n, V_SET1(0.693359375f), x);
  r = V_FNMA(n, V_SET1(-2.12194440e-4f), r);
  vf p = V_SET1(1.9875691500e-4f);
  p = V_FMA(p, r, V_SET1(1.3981999507e-3f));
  p = V_FMA(p, r, V_SET1(8.3334519073e-3f));
  p = V_FMA(p, r, V_SET1(4.1665795894e-2f));
  p = V_FMA(p, r, V_SET1(1.6666665459e-1f));
  p = V_FMA(p, r, V_SET1(5.0000001201e-1f));
  p = V_FMA(p, V_MUL(r, r), V_ADD(r, V_SET1(1.0f)));
  return V_SCALE2(p, n);
}

static void rms_norm(const float *x, const float *w, float eps, int C, float *out) {
  vf acc = V_ZERO();
  int c = 0;
  for (; c + VW <= C; c += VW) { const vf v = V_LOAD(x + c); acc = V_FMA(v, v, acc); }
  float ss = V_SUM(acc);
  for (; c < C; c++) ss += x[c] * x[c];
  const float inv = 1.0f / sqrtf(ss / (float)C + eps);
  for (c = 0; c < C; c++) out[c] = w[c] * (x[c] * inv);
}

/* Attention of one row for one kv head over its keys/values l0 .. l1-1 (row-major (L, D) of the cache's type),
 * for GN <= ATT_G of the query heads sharing that kv head (q: (GN, D) fp32): each key and each value row is
 * read once for all GN heads. Leaves per head g: m[g] = the largest scaled score, z[g] = sum of
 * exp(score - m[g]), out (GN, D) = sum of exp(score - m[g]) * value (unnormalised: attend_merge divides).
 * An empty range gives m = -inf, z = 0, out = 0. `scores`: GN rows of `ld` floats (row g at g * ld). */
#define ATT_G 4                 /* query heads per pass over the keys and values */
#define ATT_MIN_KEYS 128        /* fewest keys worth a range of their own (key_ranges) */
#ifdef FBQ_AVX512
#define ATT_V 4                 /* value vectors per pass: ATT_G x ATT_V accumulators (16 of 32 zmm) */
#else
#define ATT_V 2                 /* 8 of 16 ymm */
#endif

INLINE void attend_values(const float *e, int ld, const void *values, int l0, int l1, int D, int d, float *out,
                          const int GN, const int NV, const int type) {
  vf acc[ATT_G][ATT_V];
  for (int g = 0; g < GN; g++)
    for (int v = 0; v < NV; v++) acc[g][v] = V_ZERO();
  for (int l = l0; l < l1; l++) {
    vf val[ATT_V];
    for (int v = 0; v < NV; v++) val[v] = kv_load(values, (size_t)l * D + d + v * VW, type);
    for (int g = 0; g < GN; g++) {
      const vf w = V_SET1(e[(size_t)g * ld + l]);
      for (int v = 0; v < NV; v++) acc[g][v] = V_FMA(w, val[v], acc[g][v]);
    }
  }
  for (int g = 0; g < GN; g++)
    for (int v = 0; v < NV; v++) V_STORE(out + (size_t)g * D + d + v * VW, acc[g][v]);
}

INLINE void attend_heads(const float *q, const void *keys, const void *values, int l0, int l1, int D, float *scores,
                         int ld, float *out, float *m, float *z, const int GN, const int type) {
  const float scale = 1.0f / sqrtf((float)D);
  for (int l = l0; l < l1; l++) {
    vf acc[ATT_G];
    for (int g = 0; g < GN; g++) acc[g] = V_ZERO();
    for (int d = 0; d < D; d += VW) {
      const vf k = kv_load(keys, (size_t)l * D + d, type);
      for (int g = 0; g < GN; g++) acc[g] = V_FMA(V_LOAD(q + (size_t)g * D + d), k, acc[g]);
    }
    for (int g = 0; g < GN; g++) scores[(size_t)g * ld + l] = V_SUM(acc[g]) * scale;
  }
  for (int g = 0; g < GN; g++) {
    float *s = scores + (size_t)g * ld, mx = -INFINITY;
    for (int l = l0; l < l1; l++) mx = s[l] > mx ? s[l] : mx;
    vf sum = V_ZERO();
    int l = l0;
    for (; l + VW <= l1; l += VW) {
      const vf e = v_exp(V_SUB(V_LOAD(s + l), V_SET1(mx)));
      V_STORE(s + l, e);
      sum = V_ADD(sum, e);
    }
    float total = V_SUM(sum);
    for (; l < l1; l++) { s[l] = expf(s[l] - mx); total += s[l]; }
    m[g] = mx;
    z[g] = total;
  }
  int d = 0;
  for (; d + ATT_V * VW <= D; d += ATT_V * VW) attend_values(scores, ld, values, l0, l1, D, d, out, GN, ATT_V, type);
  for (; d < D; d += VW) attend_values(scores, ld, values, l0, l1, D, d, out, GN, 1, type);
}

/* attend_heads for G query heads (any G: blocks of ATT_G), one specialised copy per head count and cache type */
static void attend_part(const float *q, const void *keys, const void *values, int l0, int l1, int G, int D,
                        float *scores, int ld, float *out, float *m, float *z, int type) {
  for (int g0 = 0; g0 < G; g0 += ATT_G) {
    const int gn = G - g0 < ATT_G ? G - g0 : ATT_G;
    const float *qg = q + (size_t)g0 * D;
    float *sg = scores + (size_t)g0 * ld, *og = out + (size_t)g0 * D, *mg = m + g0, *zg = z + g0;
#define ATT_CASE(T) switch (gn) { \
      case 1: attend_heads(qg, keys, values, l0, l1, D, sg, ld, og, mg, zg, 1, T); break; \
      case 2: attend_heads(qg, keys, values, l0, l1, D, sg, ld, og, mg, zg, 2, T); break; \
      case 3: attend_heads(qg, keys, values, l0, l1, D, sg, ld, og, mg, zg, 3, T); break; \
      default: attend_heads(qg, keys, values, l0, l1, D, sg, ld, og, mg, zg, 4, T); break; }
    if (type == KV_F16) ATT_CASE(KV_F16)
    else if (type == KV_BF16) ATT_CASE(KV_BF16)
    else ATT_CASE(KV_F32)
#undef ATT_CASE
  }
}

/* key ranges of a row with `len` keys in a team of `nth` threads: one per ATT_MIN_KEYS keys, at most one per
 * thread (a batch-1 step of 3 kv heads on 2 threads: 6 units instead of 3) */
static int key_ranges(int len, int nth) {
  if (nth <= 1) return 1;
  const int s = len / ATT_MIN_KEYS, most = nth < 64 ? nth : 64;
  return s < 1 ? 1 : s < most ? s : most;
}

/* out (G, D) = the attention of G heads from S partial results over disjoint key ranges (parts: S blocks of
 * G * (D + 2) floats: out (G, D), m (G), z (G)), rescaled to the largest m of each head */
static void attend_merge(const float *parts, int S, int G, int D, float *out) {
  const size_t stride = (size_t)G * (D + 2);
  for (int g = 0; g < G; g++) {
    float mx = -INFINITY, total = 0.f;
    for (int s = 0; s < S; s++) {
      const float ms = parts[s * stride + (size_t)G * D + g];
      mx = ms > mx ? ms : mx;
    }
    float w[64];  /* S <= 64 (cpu_native.py caps the team) */
    for (int s = 0; s < S; s++) {
      const float *ps = parts + s * stride;
      w[s] = ps[(size_t)G * D + g] == -INFINITY ? 0.f : expf(ps[(size_t)G * D + g] - mx);
      total += w[s] * ps[(size_t)G * D + G + g];
    }
    const float inv = 1.0f / total;
    for (int d = 0; d < D; d++) {
      float acc = 0.f;
      for (int s = 0; s < S; s++) acc += w[s] * parts[s * stride + (size_t)g * D + d];
      out[(size_t)g * D + d] = acc * inv;
    }
  }
}

/* ar = SiLU(gr) * ur over I values */
static void silu_mul(const float *gr, const float *ur, float *ar, int I) {
  int i = 0;
  for (; i + VW <= I; i += VW) {
    const vf g = V_LOAD(gr + i);
    V_STORE(ar + i, V_MUL(V_DIV(g, V_ADD(V_SET1(1.0f), v_exp(V_SUB(V_ZERO(), g)))), V_LOAD(ur + i)));
  }
  for (; i < I; i++) ar[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
}

/* A barrier for the team of one decode step: spin briefly (the phases between barriers are microseconds
 * apart), then yield the core, so that on a machine with as many threads as cores a team member waiting for
 * a descheduled partner gives its core back instead of spinning through its time slice. */
typedef struct {
  atomic_int arrived, generation;
} step_barrier;

#define BARRIER_SPINS 4000  /* ~10-20 us of pause instructions before yielding */

static void barrier_wait(step_barrier *b, int n) {
  if (n <= 1) return;
  const int gen = atomic_load_explicit(&b->generation, memory_order_acquire);
  if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == n - 1) {
    atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
    atomic_store_explicit(&b->generation, gen + 1, memory_order_release);
    return;
  }
  for (int spins = 0; atomic_load_explicit(&b->generation, memory_order_acquire) == gen; spins++) {
    if (spins < BARRIER_SPINS) _mm_pause();
    else sched_yield();
  }
}

/* one matmul inside the step's team: thread 0 prepares x (and t), all threads take a share of the tiles */
static void team_matmul(step_barrier *bar, int tid, int nth, mm_input *in, int M, int K, const float *x, int ldx,
                        int n_parts, const fbq_part *parts, void *scratch, float *y, int ldy) {
  if (tid == 0) *in = mm_prepare(M, K, x, ldx, n_parts, parts, scratch);
  barrier_wait(bar, nth);
  mm_tiles(in, n_parts, parts, y, ldy, (int)((long)in->tiles * tid / nth), (int)((long)in->tiles * (tid + 1) / nth));
  barrier_wait(bar, nth);
}

/* scratch floats: B * (C + Nqkv + H*D + 3*I + C) + H * B * max_len + H * B * n_threads * (D + 2), then bytes for
 * the matmuls */
void fbq_cpu_decode_layers(int B, const fbq_dims *dm, const fbq_layer *layers, float *x, const int32_t *slots,
                           const int32_t *pos, const float *cos, const float *sin_signed, int n_threads,
                           float *scratch, void *mm_scratch) {
  const int C = dm->C, H = dm->H, Hkv = dm->Hkv, D = dm->D, I = dm->I, G = H / Hkv, half = D / 2;
  const int Nq = H * D, Nkv = Hkv * D, Nqkv = Nq + 2 * Nkv;
  float *h = scratch, *qkv = h + (size_t)B * C, *att = qkv + (size_t)B * Nqkv, *gu = att + (size_t)B * Nq;
  float *act = gu + (size_t)B * 2 * I, *tmp = act + (size_t)B * I, *scores = tmp + (size_t)B * C;
  float *partials = scores + (size_t)H * B * dm->max_len;
  int longest = 0;
  for (int b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
  step_barrier bar = {0, 0};
  mm_input in;
  /* ONE team for the whole step (one OpenMP wake-up instead of five per layer); thread 0 runs the short
   * serial parts, every thread takes a share of each matmul's tiles and of the attention heads */
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int split = nth > 1 && longest >= 2 * ATT_MIN_KEYS;  /* some row's keys come in several ranges */
    for (int li = 0; li < dm->n_layers; li++) {
      const fbq_layer *L = layers + li;
      if (tid == 0)
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, L->ln1, L->eps1, C, h + (size_t)b * C);
      team_matmul(&bar, tid, nth, &in, B, C, h, C, L->n_qkv, L->qkv, mm_scratch, qkv, Nqkv);
      if (tid == 0)
        for (int b = 0; b < B; b++) {  /* RoPE on q and k, then the KV write */
          float *row = qkv + (size_t)b * Nqkv;
          const float *cb = cos + (size_t)b * D, *sb = sin_signed + (size_t)b * D;
          for (int hh = 0; hh < H + Hkv; hh++) {
            float *v = row + (size_t)hh * D, rot[512];
            for (int d = 0; d < D; d++) rot[d] = v[d] * cb[d] + v[d < half ? d + half : d - half] * sb[d];
            memcpy(v, rot, sizeof(float) * D);
          }
          const size_t base = (size_t)slots[b] * Hkv * dm->max_len;
          for (int j = 0; j < Hkv; j++) {
            const size_t at = (base + (size_t)j * dm->max_len + pos[b]) * D;
            kv_store(L->k_cache, at, row + Nq + (size_t)j * D, D, dm->kv_type);
            kv_store(L->v_cache, at, row + Nq + Nkv + (size_t)j * D, D, dm->kv_type);
          }
        }
      barrier_wait(&bar, nth);
      /* attention in units of (row, kv head, key range), dealt round robin; a row's ranges depend on its own
       * length and the team only, so a row gets the same numbers alone or in any batch */
      for (int b = 0, u = 0; b < B; b++) {
        const int len = pos[b] + 1, S = key_ranges(len, nth);
        for (int j = 0; j < Hkv; j++)
          for (int s = 0; s < S; s++, u++) {
            if (u % nth != tid) continue;
            const size_t off = ((size_t)slots[b] * Hkv + j) * dm->max_len * D * (dm->kv_type == KV_F32 ? 4 : 2);
            float *part = partials + (size_t)u * G * (D + 2);
            attend_part(qkv + (size_t)b * Nqkv + (size_t)j * G * D, (const char *)L->k_cache + off,
                        (const char *)L->v_cache + off, (int)((long)len * s / S), (int)((long)len * (s + 1) / S),
                        G, D, scores + ((size_t)b * Hkv + j) * G * dm->max_len, dm->max_len, part,
                        part + (size_t)G * D, part + (size_t)G * D + G, dm->kv_type);
            if (S == 1) attend_merge(part, 1, G, D, att + (size_t)b * Nq + (size_t)j * G * D);
          }
      }
      barrier_wait(&bar, nth);
      if (split) {  /* merge the ranges of each (row, kv head) that has several */
        for (int b = 0, u = 0; b < B; b++) {
          const int S = key_ranges(pos[b] + 1, nth);
          for (int j = 0; j < Hkv; j++, u += S)
            if (S > 1 && (b * Hkv + j) % nth == tid)
              attend_merge(partials + (size_t)u * G * (D + 2), S, G, D, att + (size_t)b * Nq + (size_t)j * G * D);
        }
        barrier_wait(&bar, nth);
      }
      team_matmul(&bar, tid, nth, &in, B, Nq, att, Nq, 1, L->o, mm_scratch, tmp, C);
      if (tid == 0) {
        for (size_t i = 0; i < (size_t)B * C; i++) x[i] += tmp[i];
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, L->ln2, L->eps2, C, h + (size_t)b * C);
      }
      team_matmul(&bar, tid, nth, &in, B, C, h, C, L->n_gu, L->gu, mm_scratch, gu, 2 * I);
      if (tid == 0)
        for (int b = 0; b < B; b++)  /* SiLU(gate) * up */
          silu_mul(gu + (size_t)b * 2 * I, gu + (size_t)b * 2 * I + I, act + (size_t)b * I, I);
      team_matmul(&bar, tid, nth, &in, B, I, act, I, 1, L->down, mm_scratch, tmp, C);
      if (tid == 0)
        for (size_t i = 0; i < (size_t)B * C; i++) x[i] += tmp[i];
    }
  }
}

/* ---- int8 weights (Q8_0: one scale per 32 inputs), e.g. an lm_head ----------------------------------------
 * y[m, n] = sum over blocks b of 32 inputs: d[n, b] * xs[m, b] * sum_k w[n, k] * xq[m, k], with x quantized per
 * block to int16 (xq = round(x / xs), xs = max |x| / 32767: 2^-16 of the block's largest |x|), products and
 * block sums exact in int32 (|w| <= 127: 32 x 127 x 32767 < 2^31). Tiles of 16 rows: for each k pair, 32 bytes
 * (row r's w[k], w[k + 1] at bytes 2r, 2r + 1); scales (n_pad / 16, K / 32, 16) fp32. K % 32 == 0. */
typedef struct {
  const int8_t *w;
  const float *d;
  int32_t n, n_pad, k, pad_;
} fbq_q8;

/* x rows as int16 per block of 32 (scratch: M * K int16, then M * K / 32 floats) */
static void q8_prepare_rows(const float *x, int ldx, int K, int m0, int m1, int16_t *xq, float *xs) {
  for (int m = m0; m < m1; m++)
    for (int b = 0; b < K / 32; b++) {
      const float *xb = x + (size_t)m * ldx + 32 * b;
      float amax = 0.f;
      for (int k = 0; k < 32; k++) amax = fabsf(xb[k]) > amax ? fabsf(xb[k]) : amax;
      const float s = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
      xs[(size_t)m * (K / 32) + b] = s;
      for (int k = 0; k < 32; k++) xq[(size_t)m * K + 32 * b + k] = (int16_t)lrintf(xb[k] * inv);
    }
}

/* rows m0 .. m0 + ROWS - 1 of one 16-row tile */
INLINE void q8_tile(const fbq_q8 *h, int tile, int m0, const int ROWS, const int16_t *xq, const float *xs, float *y,
                    int ldy) {
  const int K = h->k, nb = K / 32, n0 = tile * 16;
  const int8_t *w = h->w + (size_t)tile * K * 16;
  const float *d = h->d + (size_t)tile * nb * 16;
#ifdef FBQ_AVX512
  __m512 yacc[4];
  for (int r = 0; r < ROWS; r++) yacc[r] = _mm512_setzero_ps();
  for (int b = 0; b < nb; b++) {
    __m512i acc[4];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_si512();
    for (int j = 0; j < 16; j++) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + ((size_t)b * 16 + j) * 32)));
      for (int r = 0; r < ROWS; r++) {
        int32_t pair;
        memcpy(&pair, xq + (size_t)(m0 + r) * K + 32 * b + 2 * j, 4);
        acc[r] = _mm512_dpwssd_epi32(acc[r], wv, _mm512_set1_epi32(pair));
      }
    }
    const __m512 dv = _mm512_loadu_ps(d + (size_t)b * 16);
    for (int r = 0; r < ROWS; r++)
      yacc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]),
                                _mm512_mul_ps(dv, _mm512_set1_ps(xs[(size_t)(m0 + r) * nb + b])), yacc[r]);
  }
  const int nn = h->n - n0 < 16 ? h->n - n0 : 16;
  for (int r = 0; r < ROWS; r++)
    _mm512_mask_storeu_ps(y + (size_t)(m0 + r) * ldy + n0, (__mmask16)((1u << nn) - 1u), yacc[r]);
#else
  __m256 ylo[2], yhi[2];
  for (int r = 0; r < ROWS; r++) ylo[r] = yhi[r] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    __m256i lo[2], hi[2];
    for (int r = 0; r < ROWS; r++) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int j = 0; j < 16; j++) {
      const int8_t *wj = w + ((size_t)b * 16 + j) * 32;
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wj));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wj + 16)));
      for (int r = 0; r < ROWS; r++) {
        int32_t pair;
        memcpy(&pair, xq + (size_t)(m0 + r) * K + 32 * b + 2 * j, 4);
        const __m256i xp = _mm256_set1_epi32(pair);
        lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(w0, xp));
        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(w1, xp));
      }
    }
    const __m256 d0 = _mm256_loadu_ps(d + (size_t)b * 16), d1 = _mm256_loadu_ps(d + (size_t)b * 16 + 8);
    for (int r = 0; r < ROWS; r++) {
      const __m256 s = _mm256_set1_ps(xs[(size_t)(m0 + r) * nb + b]);
      ylo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[r]), _mm256_mul_ps(d0, s), ylo[r]);
      yhi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[r]), _mm256_mul_ps(d1, s), yhi[r]);
    }
  }
  const int nn = h->n - n0 < 16 ? h->n - n0 : 16;
  for (int r = 0; r < ROWS; r++) {
    float tmp[16];
    _mm256_storeu_ps(tmp, ylo[r]);
    _mm256_storeu_ps(tmp + 8, yhi[r]);
    memcpy(y + (size_t)(m0 + r) * ldy + n0, tmp, sizeof(float) * (size_t)nn);
  }
#endif
}

/* y (M, n) = x (M, K) @ W^T for int8 W; scratch bytes: M * K * 2 + M * K / 32 * 4 */
void fbq_q8_matmul(int M, const float *x, int ldx, float *y, int ldy, const fbq_q8 *h, int n_threads,
                   void *scratch) {
  const int K = h->k, tiles = h->n_pad / 16;
  int16_t *xq = (int16_t *)scratch;
  float *xs = (float *)(xq + (size_t)M * K);
  q8_prepare_rows(x, ldx, K, 0, M, xq, xs);
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
  for (int t = 0; t < tiles; t++) {
    int m0 = 0;
#ifdef FBQ_AVX512
    for (; m0 + 4 <= M; m0 += 4) q8_tile(h, t, m0, 4, xq, xs, y, ldy);
#endif
    for (; m0 + 2 <= M; m0 += 2) q8_tile(h, t, m0, 2, xq, xs, y, ldy);
    for (; m0 < M; m0++) q8_tile(h, t, m0, 1, xq, xs, y, ldy);
  }
}
