/* y = x W^T for int8 weights with one fp32 scale per output channel (picochat/int8.py builds and calls this).

   x (rows, in) fp32 and y (rows, out) fp32, contiguous; scale (out,) fp32; w: the int8 weights in tiles of 64
   output channels, (ceil(out / 64), in, 64), tile b holding W[64 b + j, k] at [b, k, j], the last tile zero-padded.

   Decoding reads every weight once per step, so a step costs what it takes to stream the weights from memory: int8
   is a quarter of fp32's bytes. The layout is chosen for that: each tile is one contiguous stretch (80 KB at
   in = 1280), which the hardware prefetcher streams at full speed, where 64 separate rows of W would each be too
   short for it to ramp up (measured in dev/LOG.md). Each thread takes whole tiles. For one tile and one row of x
   the 64 sums sit in registers: every k adds x[k] times 64 weights (int8 converted to fp32, fused multiply-add in
   fp32, so the activations keep their full precision). Further rows of x read the tile again from cache. */
#include <stdint.h>

/* rows m0 .. m0 + R - 1 of x against one tile: the tile's weights are converted to fp32 once per k for all R rows
   (R sums of 64 in registers: 4 R vector accumulators) */
#define TILE_ROWS(R)                                                                                       \
    static void tile_rows##R(const float *restrict x, const int8_t *restrict tile, float acc[R][64], long in) { \
        for (long k = 0; k < in; k++) {                                                                    \
            float wf[64];                                                                                  \
            _Pragma("omp simd") for (int j = 0; j < 64; j++) wf[j] = tile[k * 64 + j];                     \
            for (int r = 0; r < R; r++) {                                                                  \
                float v = x[r * in + k];                                                                   \
                _Pragma("omp simd") for (int j = 0; j < 64; j++) acc[r][j] += v * wf[j];                   \
            }                                                                                              \
        }                                                                                                  \
    }
TILE_ROWS(1)
TILE_ROWS(4)

void int8_linear(const float *restrict x, const int8_t *restrict w, const float *restrict scale,
                 float *restrict y, long rows, long out, long in, int threads) {
    long tiles = (out + 63) / 64;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < tiles; b++) {
        const int8_t *tile = w + b * in * 64;
        long width = out - 64 * b < 64 ? out - 64 * b : 64;
        for (long m = 0; m < rows;) {
            float acc[4][64] = {{0}};
            long r = rows - m >= 4 ? 4 : 1;
            if (r == 4)
                tile_rows4(x + m * in, tile, acc, in);
            else
                tile_rows1(x + m * in, tile, acc, in);
            for (long i = 0; i < r; i++)
                for (long j = 0; j < width; j++) y[(m + i) * out + 64 * b + j] = acc[i][j] * scale[64 * b + j];
            m += r;
        }
    }
}
