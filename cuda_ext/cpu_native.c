/* fbserve's CPU kernel for quantized linears: y = x @ dequant(Wq)^T + (x @ A^T) @ B^T + bias, for a few
 * rows of x (decode), reading 2/3/4-bit codes as stored (3 bits per weight for 3-bit, not a 4-bit
 * container) and the fp16 low-rank branch in the same pass. x86-64 with AVX-512 BF16 only; built and
 * loaded by cuda_ext/cpu_native.py, which also defines the tile layout below (`tile_words`).
 *
 * Tile layout (per 16 output columns, per quantization group, contiguous):
 *   lo words:  2/3-bit: g/16 rows; word (row q, column n) holds code[k0 + 2i] & 3 at bit 2i and
 *              code[k0 + 2i + 1] & 3 at bit 16 + 2i, i < 8, k0 = group start + 16 q.
 *              4-bit: g/8 rows; code[k0 + 2i] at bit 4i and code[k0 + 2i + 1] at bit 16 + 4i, i < 4.
 *   hi words:  3-bit only, g/32 rows; bit i = code[k0 + 2i] >> 2, bit 16 + i = code[k0 + 2i + 1] >> 2.
 * So one rotate and one ternary-logic op turn a word into 16 bf16 pairs (1 + code / L) for the
 * consecutive k pairs (k, k + 1), which vdpbf16ps multiplies with the bf16 pair (x[k], x[k + 1]).
 *
 * Arithmetic: x is rounded to bf16 (as torch's int4 CPU op does); the codes are exact in bf16; products
 * and sums are fp32.  Per group: acc = nt * X + sum(x * code) / L, X = sum(x) over the group (nt = 2
 * for 3-bit: the lo and hi terms each add X), so sum(x * (code - zero)) * scale = sa * acc - sb * X with
 * sa = L * scale and sb = scale * (L * nt + zero), both exact in fp32 (prepared in Python).  The branch:
 * t = A x in fp32 from the fp16 A, then y += B t from the fp16 B^T.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  const int32_t *words;   /* (n_pad / 16, words_per_tile, 16) */
  const float *sa, *sb;   /* (n_pad / 16, G, 16): per tile, contiguous */
  const uint16_t *a;      /* fp16 (r, K) or NULL */
  const uint16_t *bt;     /* fp16 (n_pad / 16, r, 16) or NULL: B^T per tile */
  const float *bias;      /* (n_pad) or NULL */
  int32_t n, n_pad, bits, group, rank, y_off, words_per_tile, pad_;
} fbq_part;

#define INLINE static inline __attribute__((always_inline))
#define MAX_ROWS 4
#define PREFETCH_TILES 4  /* software prefetch distance, in tiles (measured: bench/RESULTS.md) */

/* 16 bf16 pairs (1 + field / L) from a word rotated so the field sits at the mask's bits */
#define DECODE(w, rot, mask) _mm512_ternarylogic_epi32(_mm512_ror_epi32((w), (rot)), (mask), one, 0xEA)
#define XPAIR(mi, k) ({ uint32_t xp_; memcpy(&xp_, xb + (size_t)(m0 + (mi)) * k_pad + (k), 4); \
                        (__m512bh)_mm512_set1_epi32((int)xp_); })

INLINE float group_sum(const float *xs32, int kg, int ke) {
  float s = 0.f;
  for (int j = kg / 32; j < ke / 32; j++) s += xs32[j];
  return s;
}

/* ask for everything tile `tile` reads, into L2: the hardware prefetcher alone keeps up poorly */
static inline void prefetch_tile(const fbq_part *p, int tile, int G) {
  const char *w = (const char *)(p->words + (size_t)tile * p->words_per_tile * 16);
  for (int line = 0; line < p->words_per_tile; line++) _mm_prefetch(w + 64 * line, _MM_HINT_T1);
  for (int gi = 0; gi < G; gi++) {
    _mm_prefetch((const char *)(p->sa + ((size_t)tile * G + gi) * 16), _MM_HINT_T1);
    _mm_prefetch((const char *)(p->sb + ((size_t)tile * G + gi) * 16), _MM_HINT_T1);
  }
  if (p->bt) {
    const char *b = (const char *)(p->bt + (size_t)tile * p->rank * 16);
    for (int line = 0; line < (p->rank + 1) / 2; line++) _mm_prefetch(b + 64 * line, _MM_HINT_T1);
  }
}

/* one 16-column tile of one part for rows m0 .. m0 + ROWS - 1 */
INLINE void tile_kernel(const fbq_part *p, int tile, int m0, const int ROWS, const int bits, int K, int k_pad,
                        const uint16_t *xb, const float *xs32, const float *t, int t_ld, float *y, int ldy) {
  const int g = p->group, n_pad = p->n_pad, n0 = tile * 16;
  const int G = (K + g - 1) / g;
  const __m512i one = _mm512_set1_epi32(0x3F803F80);
  const __m512i m2 = _mm512_set1_epi32(0x00300030), m4 = _mm512_set1_epi32(0x00780078);
  const __m512i m1 = _mm512_set1_epi32(0x00400040);
  const int32_t *w = p->words + (size_t)tile * p->words_per_tile * 16;
  if (m0 == 0 && tile + PREFETCH_TILES < n_pad / 16) prefetch_tile(p, tile + PREFETCH_TILES, G);
  __m512 yacc[MAX_ROWS];
  for (int mi = 0; mi < ROWS; mi++) yacc[mi] = _mm512_setzero_ps();
  for (int gi = 0; gi < G; gi++) {
    const int kg = gi * g, ke = kg + g < k_pad ? kg + g : k_pad;
    __m512 a0[MAX_ROWS], a1[MAX_ROWS], a2[MAX_ROWS], a3[MAX_ROWS];  /* 4 chains: vdpbf16ps latency */
    for (int mi = 0; mi < ROWS; mi++) a0[mi] = a1[mi] = a2[mi] = a3[mi] = _mm512_setzero_ps();
    if (bits == 3) {
      const int nhi = (ke - kg) / 32;
      const int32_t *hw = w + (size_t)((ke - kg) / 16) * 16;
      for (int q = 0; q < nhi; q++) {
        const __m512i lo0 = _mm512_loadu_si512(w + 32 * q), lo1 = _mm512_loadu_si512(w + 32 * q + 16);
        const __m512i hi = _mm512_loadu_si512(hw + 16 * q);
        const int k0 = kg + 32 * q;
#define STEP3(i, A, B) { const __m512i cl = DECODE((i) < 8 ? lo0 : lo1, (2 * ((i) & 7) - 4) & 31, m2); \
        const __m512i ch = DECODE(hi, ((i) - 6) & 31, m1); \
        for (int mi = 0; mi < ROWS; mi++) { const __m512bh xv = XPAIR(mi, k0 + 2 * (i)); \
          A[mi] = _mm512_dpbf16_ps(A[mi], (__m512bh)cl, xv); B[mi] = _mm512_dpbf16_ps(B[mi], (__m512bh)ch, xv); } }
        STEP3(0, a0, a1) STEP3(1, a2, a3) STEP3(2, a0, a1) STEP3(3, a2, a3)
        STEP3(4, a0, a1) STEP3(5, a2, a3) STEP3(6, a0, a1) STEP3(7, a2, a3)
        STEP3(8, a0, a1) STEP3(9, a2, a3) STEP3(10, a0, a1) STEP3(11, a2, a3)
        STEP3(12, a0, a1) STEP3(13, a2, a3) STEP3(14, a0, a1) STEP3(15, a2, a3)
      }
      w += (size_t)((ke - kg) / 16 + nhi) * 16;
    } else if (bits == 2) {
      const int nlo = (ke - kg) / 16;
      for (int q = 0; q < nlo; q++) {
        const __m512i lo = _mm512_loadu_si512(w + 16 * q);
        const int k0 = kg + 16 * q;
#define STEP2(i, A) { const __m512i cl = DECODE(lo, (2 * (i) - 4) & 31, m2); \
        for (int mi = 0; mi < ROWS; mi++) A[mi] = _mm512_dpbf16_ps(A[mi], (__m512bh)cl, XPAIR(mi, k0 + 2 * (i))); }
        STEP2(0, a0) STEP2(1, a1) STEP2(2, a2) STEP2(3, a3) STEP2(4, a0) STEP2(5, a1) STEP2(6, a2) STEP2(7, a3)
      }
      w += (size_t)nlo * 16;
    } else {
      const int nlo = (ke - kg) / 8;
      for (int q = 0; q < nlo; q++) {
        const __m512i lo = _mm512_loadu_si512(w + 16 * q);
        const int k0 = kg + 8 * q;
#define STEP4(i, A) { const __m512i cl = DECODE(lo, (4 * (i) - 3) & 31, m4); \
        for (int mi = 0; mi < ROWS; mi++) A[mi] = _mm512_dpbf16_ps(A[mi], (__m512bh)cl, XPAIR(mi, k0 + 2 * (i))); }
        STEP4(0, a0) STEP4(1, a1) STEP4(2, a2) STEP4(3, a3)
      }
      w += (size_t)nlo * 16;
    }
    const __m512 sa = _mm512_loadu_ps(p->sa + ((size_t)tile * G + gi) * 16);
    const __m512 sb = _mm512_loadu_ps(p->sb + ((size_t)tile * G + gi) * 16);
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

#define TILE_BITS(ROWS) \
  switch (p->bits) { \
    case 2: tile_kernel(p, tile, m0, ROWS, 2, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; \
    case 3: tile_kernel(p, tile, m0, ROWS, 3, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; \
    default: tile_kernel(p, tile, m0, ROWS, 4, K, k_pad, xb, xs32, t, t_ld, y, ldy); break; }

static void tile_all_rows(const fbq_part *p, int tile, int M, int K, int k_pad, const uint16_t *xb, const float *xs32,
                          const float *t, int t_ld, float *y, int ldy) {
  int m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) TILE_BITS(4)
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

/* scratch bytes the Python side provides: M * (k_pad * 2 + k_pad / 32 * 4 + sum(rank) * 4) */
void fbq_cpu_matmul(int M, int K, const float *x, int ldx, float *y, int ldy, int n_parts, const fbq_part *parts,
                    int n_threads, void *scratch) {
  const int k_pad = (K + 31) / 32 * 32;
  int r_total = 0, tiles = 0;
  for (int i = 0; i < n_parts; i++) { r_total += parts[i].rank; tiles += parts[i].n_pad / 16; }
  uint16_t *xb = (uint16_t *)scratch;
  float *xs32 = (float *)(xb + (size_t)M * k_pad);
  float *t = xs32 + (size_t)M * (k_pad / 32);
  for (int m = 0; m < M; m++) {
    const float *xr = x + (size_t)m * ldx;
    uint16_t *xbr = xb + (size_t)m * k_pad;
    for (int k = 0; k < K; k++) xbr[k] = bf16_round(xr[k]);
    for (int k = K; k < k_pad; k++) xbr[k] = 0;
    for (int j = 0; j < k_pad / 32; j++) {
      float s = 0.f;
      for (int k = 32 * j; k < 32 * j + 32; k++) s += bf16_value(xbr[k]);
      xs32[(size_t)m * (k_pad / 32) + j] = s;
    }
    int r0 = 0;
    for (int i = 0; i < n_parts; i++) {
      for (int j = 0; j < parts[i].rank; j++) {
        const uint16_t *ar = parts[i].a + (size_t)j * K;
        __m512 acc = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16)
          acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ar + k))),
                                _mm512_loadu_ps(xr + k), acc);
        float s = _mm512_reduce_add_ps(acc);
        for (; k < K; k++) s += _cvtsh_ss(ar[k]) * xr[k];
        t[(size_t)m * r_total + r0 + j] = s;
      }
      r0 += parts[i].rank;
    }
  }
  for (int i = 0; i < n_parts; i++) {
    const int G = (K + parts[i].group - 1) / parts[i].group;
    for (int tile = 0; tile < PREFETCH_TILES && tile < parts[i].n_pad / 16; tile++) prefetch_tile(parts + i, tile, G);
  }
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
  for (int ti = 0; ti < tiles; ti++) {
    int i = 0, tile = ti, r0 = 0;
    while (tile >= parts[i].n_pad / 16) { tile -= parts[i].n_pad / 16; r0 += parts[i].rank; i++; }
    tile_all_rows(parts + i, tile, M, K, k_pad, xb, xs32, t + r0, r_total, y, ldy);
  }
}
