/* A pre-norm transformer block's forward and backward as one call: the kernels of layer_norm.c, matmul.c,
 * attention.c, gelu.c and weight_gradient.c called in the order models/fused_block.py's BlockOnKernels calls them from
 * Python, on the same inputs, so the results are the same bits.
 *
 * Between two kernels called from Python, the allocations, checks and bindings run on caches the previous kernel has
 * just filled with its data, and the kernels' second thread waits (docs/performance.md, "A block's kernels called from
 * C"). Here the caller allocates every tensor the block keeps and its gradients once, and the block's twenty-odd
 * kernels run back to back. Temporaries (the forward's weight pairs, the first MLP layer's
 * output before GELU, the backward's intermediate gradients) live in memory allocated here: the small ones freed
 * before returning, the large ones (rows × features), each in a buffer of its own, kept for the next call
 * (scratch_take, below).
 *
 * Only where the products run in matmul.c (AVX-512 BF16 without AMX: with AMX oneDNN's products on the tiles are
 * faster, and they are not C functions this file could call).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_math.h"

/* The kernels called (defined in the library's other files). */
void vitlab_layer_norm_forward(const float *x, const uint16_t *addend, const float *addend_bias, float *total, const float *weight,
                               const float *bias, uint16_t *y, float *mean, float *rstd, int64_t rows, int64_t features, float eps,
                               int threads);
int vitlab_layer_norm_backward(const uint16_t *grad_y, const float *x, const float *weight, const float *mean, const float *rstd,
                               const float *grad_residual, float *grad_x, uint16_t *grad_x_bf16, float *grad_weight, float *grad_bias,
                               float *grad_column_sums, int64_t rows, int64_t features, int threads);
void vitlab_pack_linear_weight(const uint16_t *weight, uint32_t *forward_pairs, uint32_t *backward_pairs, int64_t outs, int64_t ins);
void vitlab_matmul_pairs(const uint16_t *a, const uint32_t *pairs, const uint16_t *bias, uint16_t *out, int64_t rows, int64_t depth,
                         int64_t width, int threads);
void vitlab_attention_forward(const uint16_t *qkv, uint16_t *out, uint16_t *weights, int64_t batch, int64_t tokens, int64_t heads,
                              int64_t head_size, const float *scales, int mask_diagonal, uint32_t drop_threshold, float drop_scale,
                              uint64_t drop_key, int threads);
void vitlab_attention_backward(const uint16_t *qkv, const uint16_t *out, const uint16_t *weights, const uint16_t *grad_out,
                               uint16_t *grad_qkv, float *grad_scale_sums, int64_t batch, int64_t tokens, int64_t heads,
                               int64_t head_size, const float *scales, uint32_t drop_threshold, float drop_scale, uint64_t drop_key,
                               int threads);
void vitlab_gelu_forward(const uint16_t *x, const float *bias, uint16_t *out, uint16_t *derivative, int64_t count, int64_t columns,
                         int threads);
int vitlab_gelu_backward(const uint16_t *grad_out, const uint16_t *derivative, uint16_t *grad_x, float *grad_bias, int64_t count,
                         int64_t columns, int threads);
int vitlab_weight_gradient(const uint16_t *grad_out, const uint16_t *input, float *grad_weight, float *grad_bias, int64_t rows,
                           int64_t outs, int64_t ins, int threads);
int vitlab_single_query_forward(const uint16_t *query, const uint16_t *key_value, const float *scales, int mask_first, uint16_t *out,
                                float *weights, int64_t batch, int64_t tokens, int64_t heads, int64_t head_size, int threads);
int vitlab_single_query_backward(const uint16_t *query, const uint16_t *key_value, const float *scales, const float *weights,
                                 const uint16_t *grad_out, uint16_t *grad_query, uint16_t *grad_key_value, float *grad_scale_sums,
                                 int64_t batch, int64_t tokens, int64_t heads, int64_t head_size, int threads);

#if defined(VITLAB_AVX512) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)

int vitlab_block_supported(void) { return 1; }

/* Sizes and settings of a block (models/fused_block.py's BlockLayout and the input's shape). */
typedef struct {
    int64_t batch, tokens, width, heads, hidden; /* hidden: the MLP's width */
    float attention_eps, mlp_eps;
    int32_t mask_diagonal;
    uint32_t drop_threshold; /* attention dropout inside the attention kernel (0: none) */
    float drop_scale;
    uint64_t drop_key;
    int32_t threads;
} BlockSizes;

/* A linear layer's fp32 weight (outs × ins) and bias (outs, or NULL), and where its backward pairs go (kept for the
 * input gradient). */
typedef struct {
    const float *weight, *bias;
    uint32_t *backward_pairs;
} LinearWeights;

/* The forward's inputs, the tensors it keeps (allocated by the caller) and its outputs. Shapes with R = batch · tokens
 * rows, D = width, M = hidden, H = heads, P = tokens rounded up to 16. */
typedef struct {
    const float *tokens;      /* (R, D) fp32 */
    const uint16_t *addend;   /* (R, D) bf16 or NULL: the previous block's deferred MLP output */
    const float *addend_bias; /* (D) or NULL */
    const float *scales;      /* (H) */
    const float *attention_norm_weight, *attention_norm_bias, *mlp_norm_weight, *mlp_norm_bias; /* (D) each */
    LinearWeights qkv, projection, first, last; /* qkv: 3D × D; projection: D × D (bias added by the mlp norm's kernel); first: M × D (bias added by GELU); last: D × M */
    float *stream;                 /* (R, D) fp32: tokens + addend (+ its bias); NULL without an addend */
    uint16_t *normalised;          /* (R, D) bf16 */
    float *attention_mean, *attention_rstd; /* (R) */
    uint16_t *qkv_out;             /* (R, 3D) bf16 */
    uint16_t *mixed;               /* (R, D) bf16: attention's output */
    uint16_t *weights;             /* (batch, H, tokens, P) bf16: the attention weights kept */
    float *after_attention;        /* (R, D) fp32 */
    uint16_t *mlp_input;           /* (R, D) bf16 */
    float *mlp_mean, *mlp_rstd;    /* (R) */
    uint16_t *activated, *slope;   /* (R, M) bf16: GELU and its derivative */
    uint16_t *out;                 /* (R, D) bf16: the MLP's output, with the last bias unless that is NULL */
} BlockForward;

/* Temporaries kept from call to call in SCRATCH_SLOTS slots, matched by exact size: the requests of one size take that
 * size's idle slots in table order, so a block's temporaries get the same memory in every call (temporaries of equal
 * size share slots in turn, as the forward's and the backward's do).
 *
 * The kernels split their rows between the threads in halves, the first half to thread 0 (the products in tiles of a
 * few rows, so their split falls within a few rows of the others'). A buffer kept for the same temporaries is then
 * written half by half by the same threads in every call. With malloc's memory, the temporaries came back at other
 * addresses from call to call, and memory one thread had written was next written by the other. Where the two cores
 * share no L3 that is slow (docs/performance.md, "Buffers each core keeps"). vitlab_block_release_scratch frees the
 * idle slots; a size no longer asked for gives its idle slot up when the table is full. */
#define SCRATCH_SLOTS 32
static struct {
    void *memory;
    size_t bytes;
    int busy;
    uint64_t last_used; /* scratch_clock when last taken or given back */
} scratch_slots[SCRATCH_SLOTS];
static uint64_t scratch_clock;
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;

/* Free every idle slot's memory (the caller holds scratch_lock); returns the bytes freed. */
static int64_t release_idle_slots(void) {
    int64_t freed = 0;
    for (int s = 0; s < SCRATCH_SLOTS; s++)
        if (scratch_slots[s].memory != NULL && !scratch_slots[s].busy) {
            free(scratch_slots[s].memory);
            freed += (int64_t)scratch_slots[s].bytes;
            scratch_slots[s].memory = NULL, scratch_slots[s].bytes = 0;
        }
    return freed;
}

/* `bytes` of memory: the first idle slot of that exact size, else malloc's; if malloc fails, once more after freeing
 * the idle slots (NULL if it fails again). */
static void *scratch_take(size_t bytes) {
    void *memory = NULL;
    pthread_mutex_lock(&scratch_lock);
    for (int s = 0; s < SCRATCH_SLOTS && memory == NULL; s++)
        if (scratch_slots[s].memory != NULL && !scratch_slots[s].busy && scratch_slots[s].bytes == bytes) {
            scratch_slots[s].busy = 1, scratch_slots[s].last_used = ++scratch_clock;
            memory = scratch_slots[s].memory;
        }
    pthread_mutex_unlock(&scratch_lock);
    if (memory == NULL)
        memory = malloc(bytes);
    if (memory == NULL) {
        pthread_mutex_lock(&scratch_lock);
        release_idle_slots();
        pthread_mutex_unlock(&scratch_lock);
        memory = malloc(bytes);
    }
    return memory;
}

/* Back to its slot (idle); else into an empty slot; else into the slot of the least recently used idle buffer of
 * another size, which is freed (a size no longer asked for); else (every slot busy or of this size) freed. NULL:
 * nothing. */
static void scratch_give(void *memory, size_t bytes) {
    if (memory == NULL)
        return;
    pthread_mutex_lock(&scratch_lock);
    int slot = -1;
    for (int s = 0; s < SCRATCH_SLOTS && slot < 0; s++)
        if (scratch_slots[s].memory == memory)
            slot = s;
    for (int s = 0; s < SCRATCH_SLOTS && slot < 0; s++)
        if (scratch_slots[s].memory == NULL)
            slot = s;
    void *evicted = NULL;
    if (slot < 0) {
        for (int s = 0; s < SCRATCH_SLOTS; s++)
            if (!scratch_slots[s].busy && scratch_slots[s].bytes != bytes
                && (slot < 0 || scratch_slots[s].last_used < scratch_slots[slot].last_used))
                slot = s;
        if (slot >= 0)
            evicted = scratch_slots[slot].memory;
    }
    if (slot >= 0)
        scratch_slots[slot].memory = memory, scratch_slots[slot].bytes = bytes, scratch_slots[slot].busy = 0,
        scratch_slots[slot].last_used = ++scratch_clock;
    pthread_mutex_unlock(&scratch_lock);
    free(evicted);
    if (slot < 0)
        free(memory);
}

/* The bytes the slots hold (busy or idle): all of them for `size` 0, else those of buffers of exactly `size` bytes. */
int64_t vitlab_block_scratch_bytes(int64_t size) {
    int64_t total = 0;
    pthread_mutex_lock(&scratch_lock);
    for (int s = 0; s < SCRATCH_SLOTS; s++)
        if (scratch_slots[s].memory != NULL && (size == 0 || (int64_t)scratch_slots[s].bytes == size))
            total += (int64_t)scratch_slots[s].bytes;
    pthread_mutex_unlock(&scratch_lock);
    return total;
}

/* Fill the idle slots' memory with `byte` (tests: a temporary read before it is written then shows); returns the bytes
 * filled. */
int64_t vitlab_block_fill_scratch(int byte) {
    int64_t filled = 0;
    pthread_mutex_lock(&scratch_lock);
    for (int s = 0; s < SCRATCH_SLOTS; s++)
        if (scratch_slots[s].memory != NULL && !scratch_slots[s].busy) {
            memset(scratch_slots[s].memory, byte, scratch_slots[s].bytes);
            filled += (int64_t)scratch_slots[s].bytes;
        }
    pthread_mutex_unlock(&scratch_lock);
    return filled;
}

/* Free the idle slots' memory (a call in progress keeps its own); returns the bytes freed. */
int64_t vitlab_block_release_scratch(void) {
    pthread_mutex_lock(&scratch_lock);
    int64_t freed = release_idle_slots();
    pthread_mutex_unlock(&scratch_lock);
    return freed;
}

/* Round to bf16 as PyTorch's conversion does: to nearest even, the same bits for every number. A NaN becomes 0xFFFF, as
 * its vectorised conversion writes (its scalar loop for a tail writes 0x7FC0): a NaN either way, its payload may differ. */
static inline uint16_t torch_bf16(float value) { return value != value ? 0xFFFFu : float_to_bf16(value); }

/* A layer's fp32 weight (outs × ins) → its bf16 copy → the matmul kernel's pairs (forward into `forward_pairs`,
 * backward into the layer's own), and, where `bias_bf16` is not NULL, its bias (if any) in bf16 there (the product
 * adds it; the projection's and the first MLP layer's biases are added in fp32 by the next kernel instead). 0, or 1 if
 * memory ran out. */
static int pack_layer(LinearWeights layer, int64_t outs, int64_t ins, uint32_t *forward_pairs, uint16_t *bias_bf16) {
    uint16_t *weight = malloc(sizeof(uint16_t) * (size_t)(outs * ins));
    if (weight == NULL)
        return 1;
    for (int64_t i = 0; i < outs * ins; i++)
        weight[i] = torch_bf16(layer.weight[i]);
    vitlab_pack_linear_weight(weight, forward_pairs, layer.backward_pairs, outs, ins);
    free(weight);
    if (layer.bias != NULL && bias_bf16 != NULL)
        for (int64_t o = 0; o < outs; o++)
            bias_bf16[o] = torch_bf16(layer.bias[o]);
    return 0;
}

/* BlockOnKernels.forward. Returns 0, or 1 (outputs partly written) if memory for the temporaries ran out. */
int vitlab_block_forward(const BlockSizes *sizes, const BlockForward *block) {
    int64_t rows = sizes->batch * sizes->tokens, width = sizes->width, hidden = sizes->hidden;
    int threads = sizes->threads;
    /* pairs for the four forward products, one buffer: qkv (D/2 × 3D), projection (D/2 × D), first (D/2 × M), last (M/2 × D) */
    int64_t qkv_pairs = width / 2 * 3 * width, projection_pairs = width / 2 * width, first_pairs = width / 2 * hidden;
    uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)(qkv_pairs + projection_pairs + 2 * first_pairs));
    uint16_t *biases = malloc(sizeof(uint16_t) * (size_t)(3 * width + width)); /* qkv's, the last layer's: bf16 */
    uint16_t *hidden_out = scratch_take(sizeof(uint16_t) * (size_t)(rows * hidden)); /* the first layer's product, before GELU */
    uint16_t *projected = scratch_take(sizeof(uint16_t) * (size_t)(rows * width)); /* the projection's product, before its bias */
    int failed = pairs == NULL || biases == NULL || hidden_out == NULL || projected == NULL;
    uint32_t *qkv_forward = pairs, *projection_forward = qkv_forward + qkv_pairs, *first_forward = projection_forward + projection_pairs,
             *last_forward = first_forward + first_pairs;
    uint16_t *qkv_bias = biases, *last_bias = biases + 3 * width;
    failed = failed || pack_layer(block->qkv, 3 * width, width, qkv_forward, qkv_bias);
    failed = failed || pack_layer(block->projection, width, width, projection_forward, NULL);
    failed = failed || pack_layer(block->first, hidden, width, first_forward, NULL);
    failed = failed || pack_layer(block->last, width, hidden, last_forward, last_bias);
    if (!failed) {
        const float *stream = block->addend == NULL ? block->tokens : block->stream;
        vitlab_layer_norm_forward(block->tokens, block->addend, block->addend_bias, block->addend == NULL ? NULL : block->stream,
                                  block->attention_norm_weight, block->attention_norm_bias, block->normalised, block->attention_mean,
                                  block->attention_rstd, rows, width, sizes->attention_eps, threads);
        vitlab_matmul_pairs(block->normalised, qkv_forward, block->qkv.bias == NULL ? NULL : qkv_bias, block->qkv_out, rows, width,
                            3 * width, threads);
        vitlab_attention_forward(block->qkv_out, block->mixed, block->weights, sizes->batch, sizes->tokens, sizes->heads,
                                 width / sizes->heads, block->scales, sizes->mask_diagonal, sizes->drop_threshold, sizes->drop_scale,
                                 sizes->drop_key, threads);
        vitlab_matmul_pairs(block->mixed, projection_forward, NULL, projected, rows, width, width, threads);
        vitlab_layer_norm_forward(stream, projected, block->projection.bias, block->after_attention, block->mlp_norm_weight,
                                  block->mlp_norm_bias, block->mlp_input, block->mlp_mean, block->mlp_rstd, rows, width, sizes->mlp_eps,
                                  threads);
        vitlab_matmul_pairs(block->mlp_input, first_forward, NULL, hidden_out, rows, width, hidden, threads);
        vitlab_gelu_forward(hidden_out, block->first.bias, block->activated, block->slope, rows * hidden, hidden, threads);
        vitlab_matmul_pairs(block->activated, last_forward, block->last.bias == NULL ? NULL : last_bias, block->out, rows, hidden, width,
                            threads);
    }
    free(pairs);
    free(biases);
    scratch_give(hidden_out, sizeof(uint16_t) * (size_t)(rows * hidden));
    scratch_give(projected, sizeof(uint16_t) * (size_t)(rows * width));
    return failed;
}

/* The backward's inputs (what the forward kept, the output gradients) and its gradients (allocated by the caller; a
 * NULL gradient pointer is one not wanted where the comment says it may be). */
typedef struct {
    const float *tokens;             /* (R, D) fp32: without an addend, the first norm's input (else NULL) */
    const float *stream;             /* (R, D) fp32: with an addend, tokens + addend (+ bias) (else NULL) */
    const uint16_t *normalised, *qkv, *mixed, *weights, *mlp_input, *activated, *slope; /* as in BlockForward */
    const float *attention_norm_weight, *attention_mean, *attention_rstd, *mlp_norm_weight, *mlp_mean, *mlp_rstd;
    const float *after_attention, *scales;
    const uint32_t *qkv_pairs, *projection_pairs, *first_pairs, *last_pairs; /* the backward pairs the forward packed */
    const float *grad_after_attention; /* (R, D) fp32 or NULL: no gradient reached the stream after attention */
    const uint16_t *grad_out;          /* (R, D) bf16: the MLP output's gradient */
    float *grad_tokens;                /* (R, D) fp32 */
    uint16_t *grad_addend;             /* (R, D) bf16, with an addend (else NULL) */
    float *grad_addend_bias;           /* (D), or NULL: none wanted */
    float *grad_attention_norm_weight, *grad_attention_norm_bias, *grad_mlp_norm_weight, *grad_mlp_norm_bias; /* (D) */
    float *grad_qkv_weight, *grad_qkv_bias;               /* (3D × D), (3D) or NULL: the layer has no bias */
    float *grad_projection_weight, *grad_projection_bias; /* (D × D), (D) */
    float *grad_first_weight, *grad_first_bias;           /* (M × D), (M) */
    float *grad_last_weight, *grad_last_bias;             /* (D × M), (D) or NULL: the layer has none (deferred) */
    float *grad_scale_sums;                               /* (batch, H) */
} BlockBackward;

/* BlockOnKernels.backward, every gradient wanted. Returns 0, or 1 (gradients partly written) if memory ran out. */
int vitlab_block_backward(const BlockSizes *sizes, const BlockBackward *block) {
    int64_t rows = sizes->batch * sizes->tokens, width = sizes->width, hidden = sizes->hidden;
    int threads = sizes->threads;
    /* Intermediate gradients, bf16 (but the stream's), each in a buffer of its own (see scratch_take): grad_activated and
     * grad_hidden (R × M each), grad_mlp_input (R × D, then grad_normalised's: the same rows), grad_projected and
     * grad_mixed (R × D each), grad_qkv (R × 3D) and grad_stream (R × D fp32). */
    uint16_t *grad_activated = scratch_take(sizeof(uint16_t) * (size_t)(rows * hidden)),
             *grad_hidden = scratch_take(sizeof(uint16_t) * (size_t)(rows * hidden)),
             *grad_mlp_input = scratch_take(sizeof(uint16_t) * (size_t)(rows * width)),
             *grad_projected = scratch_take(sizeof(uint16_t) * (size_t)(rows * width)),
             *grad_mixed = scratch_take(sizeof(uint16_t) * (size_t)(rows * width)),
             *grad_qkv = scratch_take(sizeof(uint16_t) * (size_t)(rows * 3 * width));
    float *grad_stream = scratch_take(sizeof(float) * (size_t)(rows * width));
    int failed = grad_activated == NULL || grad_hidden == NULL || grad_mlp_input == NULL || grad_projected == NULL || grad_mixed == NULL
                 || grad_qkv == NULL || grad_stream == NULL;
    if (!failed) {
        uint16_t *grad_normalised = grad_mlp_input; /* reused, below */
        /* the MLP's last layer, GELU, its first layer */
        vitlab_matmul_pairs(block->grad_out, block->last_pairs, NULL, grad_activated, rows, width, hidden, threads);
        failed = failed || vitlab_weight_gradient(block->grad_out, block->activated, block->grad_last_weight, block->grad_last_bias, rows,
                                                  width, hidden, threads);
        failed = failed || vitlab_gelu_backward(grad_activated, block->slope, grad_hidden, block->grad_first_bias, rows * hidden, hidden,
                                                threads);
        vitlab_matmul_pairs(grad_hidden, block->first_pairs, NULL, grad_mlp_input, rows, hidden, width, threads);
        failed = failed || vitlab_weight_gradient(grad_hidden, block->mlp_input, block->grad_first_weight, NULL, rows, hidden, width,
                                                  threads);
        /* the residual add with the MLP's norm: the stream's gradient (fp32) and the projection's (bf16, the same values) */
        failed = failed || vitlab_layer_norm_backward(grad_mlp_input, block->after_attention, block->mlp_norm_weight, block->mlp_mean,
                                                      block->mlp_rstd, block->grad_after_attention, grad_stream, grad_projected,
                                                      block->grad_mlp_norm_weight, block->grad_mlp_norm_bias,
                                                      block->grad_projection_bias, rows, width, threads);
        /* the projection, attention, the QKV projection */
        vitlab_matmul_pairs(grad_projected, block->projection_pairs, NULL, grad_mixed, rows, width, width, threads);
        failed = failed || vitlab_weight_gradient(grad_projected, block->mixed, block->grad_projection_weight, NULL, rows, width, width,
                                                  threads);
        vitlab_attention_backward(block->qkv, block->mixed, block->weights, grad_mixed, grad_qkv, block->grad_scale_sums, sizes->batch,
                                  sizes->tokens, sizes->heads, width / sizes->heads, block->scales, sizes->drop_threshold,
                                  sizes->drop_scale, sizes->drop_key, threads);
        vitlab_matmul_pairs(grad_qkv, block->qkv_pairs, NULL, grad_normalised, rows, 3 * width, width, threads);
        failed = failed || vitlab_weight_gradient(grad_qkv, block->normalised, block->grad_qkv_weight, block->grad_qkv_bias, rows,
                                                  3 * width, width, threads);
        /* the first norm: with an addend its residual form (the addend's gradient in bf16 and its bias's sums) */
        const float *norm_input = block->stream != NULL ? block->stream : block->tokens;
        failed = failed || vitlab_layer_norm_backward(grad_normalised, norm_input, block->attention_norm_weight, block->attention_mean,
                                                      block->attention_rstd, grad_stream, block->grad_tokens, block->grad_addend,
                                                      block->grad_attention_norm_weight, block->grad_attention_norm_bias,
                                                      block->grad_addend_bias, rows, width, threads);
    }
    scratch_give(grad_activated, sizeof(uint16_t) * (size_t)(rows * hidden));
    scratch_give(grad_hidden, sizeof(uint16_t) * (size_t)(rows * hidden));
    scratch_give(grad_mlp_input, sizeof(uint16_t) * (size_t)(rows * width));
    scratch_give(grad_projected, sizeof(uint16_t) * (size_t)(rows * width));
    scratch_give(grad_mixed, sizeof(uint16_t) * (size_t)(rows * width));
    scratch_give(grad_qkv, sizeof(uint16_t) * (size_t)(rows * 3 * width));
    scratch_give(grad_stream, sizeof(float) * (size_t)(rows * width));
    return failed;
}

/* The last block under CLS pooling, computing the first token alone (FirstTokenBlockOnKernels): the first norm over
 * every token, the first token's query against every token's keys and values (single_query.c), then the projection,
 * norm and MLP of that token. Shapes as in BlockForward, with B = batch rows for the first token's tensors. */
typedef struct {
    const float *tokens;
    const uint16_t *addend;
    const float *addend_bias, *scales;
    const float *attention_norm_weight, *attention_norm_bias, *mlp_norm_weight, *mlp_norm_bias;
    LinearWeights query, key_value, projection, first, last; /* query: the QKV weight's first D rows; key_value: the other 2D */
    float *stream;                          /* (R, D) fp32, with an addend (else NULL) */
    uint16_t *normalised;                   /* (R, D) bf16 */
    float *attention_mean, *attention_rstd; /* (R) */
    uint16_t *query_input;                  /* (B, D) bf16: normalised's first token */
    uint16_t *query_out, *key_value_out;    /* (B, D), (R, 2D) bf16 */
    uint16_t *mixed;                        /* (B, D) bf16 */
    float *weights;                         /* (B, H, tokens) fp32 */
    float *first_token;                     /* (B, D) fp32: the first token's stream plus the projection */
    uint16_t *mlp_input;                    /* (B, D) bf16 */
    float *mlp_mean, *mlp_rstd;             /* (B) */
    uint16_t *activated, *slope;            /* (B, M) bf16 */
    float *result;                          /* (B, D) fp32: first + the MLP's output */
} FirstTokenForward;

/* FirstTokenBlockOnKernels.forward. Returns 0, or 1 (outputs partly written) if memory ran out. */
int vitlab_first_token_block_forward(const BlockSizes *sizes, const FirstTokenForward *block) {
    int64_t batch = sizes->batch, tokens = sizes->tokens, rows = batch * tokens, width = sizes->width, hidden = sizes->hidden;
    int threads = sizes->threads;
    int64_t square = width / 2 * width, first_pairs = width / 2 * hidden, wider = hidden > width ? hidden : width;
    uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)(square + 2 * square + square + 2 * first_pairs));
    uint16_t *biases = malloc(sizeof(uint16_t) * (size_t)(5 * width));  /* query's, key_value's, projection's, last's: bf16 */
    uint16_t *scratch = malloc(sizeof(uint16_t) * (size_t)(batch * wider)); /* the projection, the first layer's and the last's products */
    int failed = pairs == NULL || biases == NULL || scratch == NULL;
    uint32_t *query_forward = pairs, *key_value_forward = query_forward + square, *projection_forward = key_value_forward + 2 * square,
             *first_forward = projection_forward + square, *last_forward = first_forward + first_pairs;
    uint16_t *query_bias = biases, *key_value_bias = biases + width, *projection_bias = biases + 3 * width, *last_bias = biases + 4 * width;
    failed = failed || pack_layer(block->query, width, width, query_forward, query_bias);
    failed = failed || pack_layer(block->key_value, 2 * width, width, key_value_forward, key_value_bias);
    failed = failed || pack_layer(block->projection, width, width, projection_forward, projection_bias);
    failed = failed || pack_layer(block->first, hidden, width, first_forward, NULL);
    failed = failed || pack_layer(block->last, width, hidden, last_forward, last_bias);
    if (!failed) {
        vitlab_layer_norm_forward(block->tokens, block->addend, block->addend_bias, block->addend == NULL ? NULL : block->stream,
                                  block->attention_norm_weight, block->attention_norm_bias, block->normalised, block->attention_mean,
                                  block->attention_rstd, rows, width, sizes->attention_eps, threads);
        for (int64_t b = 0; b < batch; b++)
            memcpy(block->query_input + b * width, block->normalised + b * tokens * width, sizeof(uint16_t) * (size_t)width);
        vitlab_matmul_pairs(block->query_input, query_forward, block->query.bias == NULL ? NULL : query_bias, block->query_out, batch,
                            width, width, threads);
        vitlab_matmul_pairs(block->normalised, key_value_forward, block->key_value.bias == NULL ? NULL : key_value_bias,
                            block->key_value_out, rows, width, 2 * width, threads);
        failed = vitlab_single_query_forward(block->query_out, block->key_value_out, block->scales, sizes->mask_diagonal, block->mixed,
                                             block->weights, batch, tokens, sizes->heads, width / sizes->heads, threads);
    }
    if (!failed) {
        uint16_t *projected = scratch; /* (B, D) */
        vitlab_matmul_pairs(block->mixed, projection_forward, block->projection.bias == NULL ? NULL : projection_bias, projected, batch,
                            width, width, threads);
        const float *stream = block->addend == NULL ? block->tokens : block->stream;
        for (int64_t b = 0; b < batch; b++) /* the first token's stream plus the projection, in fp32 (PyTorch's add) */
            for (int64_t d = 0; d < width; d++)
                block->first_token[b * width + d] = stream[b * tokens * width + d] + bf16_to_float(projected[b * width + d]);
        vitlab_layer_norm_forward(block->first_token, NULL, NULL, NULL, block->mlp_norm_weight, block->mlp_norm_bias, block->mlp_input,
                                  block->mlp_mean, block->mlp_rstd, batch, width, sizes->mlp_eps, threads);
        vitlab_matmul_pairs(block->mlp_input, first_forward, NULL, scratch, batch, width, hidden, threads);
        vitlab_gelu_forward(scratch, block->first.bias, block->activated, block->slope, batch * hidden, hidden, threads);
        vitlab_matmul_pairs(block->activated, last_forward, block->last.bias == NULL ? NULL : last_bias, scratch, batch, hidden, width,
                            threads);
        for (int64_t i = 0; i < batch * width; i++) /* first + the MLP's output, in fp32 */
            block->result[i] = block->first_token[i] + bf16_to_float(scratch[i]);
    }
    free(pairs);
    free(biases);
    free(scratch);
    return failed;
}

typedef struct {
    const float *tokens, *stream; /* as in BlockBackward */
    const uint16_t *query_input, *normalised, *query, *key_value, *mixed, *mlp_input, *activated, *slope;
    const float *weights, *first_token, *scales;
    const float *attention_norm_weight, *attention_mean, *attention_rstd, *mlp_norm_weight, *mlp_mean, *mlp_rstd;
    const uint32_t *query_pairs, *key_value_pairs, *projection_pairs, *first_pairs, *last_pairs;
    const float *grad_result;     /* (B, D) fp32 */
    float *grad_tokens;           /* (R, D) fp32 */
    uint16_t *grad_addend;        /* (R, D) bf16, with an addend (else NULL) */
    float *grad_addend_bias;      /* (D) or NULL */
    float *grad_attention_norm_weight, *grad_attention_norm_bias, *grad_mlp_norm_weight, *grad_mlp_norm_bias;
    float *grad_qkv_weight, *grad_qkv_bias;               /* (3D × D): the query's D rows first; (3D) or NULL */
    float *grad_projection_weight, *grad_projection_bias; /* (D × D), (D) or NULL */
    float *grad_first_weight, *grad_first_bias;           /* (M × D), (M) or NULL */
    float *grad_last_weight, *grad_last_bias;             /* (D × M), (D) or NULL */
    float *grad_scale_sums;                               /* (B, H) */
} FirstTokenBackward;

/* FirstTokenBlockOnKernels.backward, every weight's gradient wanted. Returns 0, or 1 if memory ran out. */
int vitlab_first_token_block_backward(const BlockSizes *sizes, const FirstTokenBackward *block) {
    int64_t batch = sizes->batch, tokens = sizes->tokens, rows = batch * tokens, width = sizes->width, hidden = sizes->hidden;
    int threads = sizes->threads;
    uint16_t *grad_result = malloc(sizeof(uint16_t) * (size_t)(batch * width)), /* then grad_first's bf16 */
             *grad_activated = malloc(sizeof(uint16_t) * (size_t)(batch * hidden)),
             *grad_hidden = malloc(sizeof(uint16_t) * (size_t)(batch * hidden)),
             *grad_small = malloc(sizeof(uint16_t) * (size_t)(4 * batch * width)), /* mlp_input's, mixed's, query's, query input's */
             *grad_key_value = scratch_take(sizeof(uint16_t) * (size_t)(rows * 2 * width)),
             *grad_normalised = scratch_take(sizeof(uint16_t) * (size_t)(rows * width));
    float *grad_first = malloc(sizeof(float) * (size_t)(batch * width)), *grad_stream = scratch_take(sizeof(float) * (size_t)(rows * width));
    if (grad_stream != NULL) /* zeros, each thread's rows by that thread (the norm's backward reads them so split; the
                              * first token's rows, set below by the calling thread, are the exception) */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t row = 0; row < rows; row++)
            memset(grad_stream + row * width, 0, sizeof(float) * (size_t)width);
    int failed = grad_result == NULL || grad_activated == NULL || grad_hidden == NULL || grad_small == NULL || grad_key_value == NULL
                 || grad_normalised == NULL || grad_first == NULL || grad_stream == NULL;
    if (!failed) {
        uint16_t *grad_mlp_input = grad_small, *grad_mixed = grad_small + batch * width, *grad_query = grad_small + 2 * batch * width,
                 *grad_query_input = grad_small + 3 * batch * width;
        for (int64_t i = 0; i < batch * width; i++)
            grad_result[i] = torch_bf16(block->grad_result[i]);
        /* the MLP */
        vitlab_matmul_pairs(grad_result, block->last_pairs, NULL, grad_activated, batch, width, hidden, threads);
        failed = failed || vitlab_weight_gradient(grad_result, block->activated, block->grad_last_weight, block->grad_last_bias, batch,
                                                  width, hidden, threads);
        failed = failed || vitlab_gelu_backward(grad_activated, block->slope, grad_hidden, block->grad_first_bias, batch * hidden, hidden,
                                                threads);
        vitlab_matmul_pairs(grad_hidden, block->first_pairs, NULL, grad_mlp_input, batch, hidden, width, threads);
        failed = failed || vitlab_weight_gradient(grad_hidden, block->mlp_input, block->grad_first_weight, NULL, batch, hidden, width,
                                                  threads);
        /* the MLP's norm; the first token reaches the result and the norm (autograd adds the two, in fp32) */
        failed = failed || vitlab_layer_norm_backward(grad_mlp_input, block->first_token, block->mlp_norm_weight, block->mlp_mean,
                                                      block->mlp_rstd, NULL, grad_first, NULL, block->grad_mlp_norm_weight,
                                                      block->grad_mlp_norm_bias, NULL, batch, width, threads);
        for (int64_t i = 0; i < batch * width; i++) {
            grad_first[i] = block->grad_result[i] + grad_first[i];
            grad_result[i] = torch_bf16(grad_first[i]); /* the projection's output gradient, in bf16 */
        }
        /* the projection, the single query's attention, the query and key-value products */
        vitlab_matmul_pairs(grad_result, block->projection_pairs, NULL, grad_mixed, batch, width, width, threads);
        failed = failed || vitlab_weight_gradient(grad_result, block->mixed, block->grad_projection_weight, block->grad_projection_bias,
                                                  batch, width, width, threads);
        failed = failed || vitlab_single_query_backward(block->query, block->key_value, block->scales, block->weights, grad_mixed,
                                                        grad_query, grad_key_value, block->grad_scale_sums, batch, tokens, sizes->heads,
                                                        width / sizes->heads, threads);
        vitlab_matmul_pairs(grad_query, block->query_pairs, NULL, grad_query_input, batch, width, width, threads);
        failed = failed || vitlab_weight_gradient(grad_query, block->query_input, block->grad_qkv_weight, block->grad_qkv_bias, batch,
                                                  width, width, threads);
        vitlab_matmul_pairs(grad_key_value, block->key_value_pairs, NULL, grad_normalised, rows, 2 * width, width, threads);
        failed = failed || vitlab_weight_gradient(grad_key_value, block->normalised, block->grad_qkv_weight + width * width,
                                                  block->grad_qkv_bias == NULL ? NULL : block->grad_qkv_bias + width, rows, 2 * width,
                                                  width, threads);
        /* the first token's row also made the query (bf16 + bf16, as PyTorch adds them); only its stream reached the result */
        for (int64_t b = 0; b < batch; b++)
            for (int64_t d = 0; d < width; d++) {
                uint16_t *target = grad_normalised + b * tokens * width + d;
                *target = torch_bf16(bf16_to_float(*target) + bf16_to_float(grad_query_input[b * width + d]));
                grad_stream[b * tokens * width + d] = grad_first[b * width + d];
            }
        const float *norm_input = block->stream != NULL ? block->stream : block->tokens;
        failed = failed || vitlab_layer_norm_backward(grad_normalised, norm_input, block->attention_norm_weight, block->attention_mean,
                                                      block->attention_rstd, grad_stream, block->grad_tokens, block->grad_addend,
                                                      block->grad_attention_norm_weight, block->grad_attention_norm_bias,
                                                      block->grad_addend_bias, rows, width, threads);
    }
    free(grad_result);
    free(grad_activated);
    free(grad_hidden);
    free(grad_small);
    scratch_give(grad_key_value, sizeof(uint16_t) * (size_t)(rows * 2 * width));
    scratch_give(grad_normalised, sizeof(uint16_t) * (size_t)(rows * width));
    free(grad_first);
    scratch_give(grad_stream, sizeof(float) * (size_t)(rows * width));
    return failed;
}

#else

int vitlab_block_supported(void) { return 0; }
int64_t vitlab_block_scratch_bytes(int64_t size) {
    (void)size;
    return 0;
}
int64_t vitlab_block_release_scratch(void) { return 0; }
int64_t vitlab_block_fill_scratch(int byte) {
    (void)byte;
    return 0;
}
int vitlab_block_forward(const void *sizes, const void *block) {
    (void)sizes, (void)block;
    abort(); /* callers check vitlab_block_supported() first */
}
int vitlab_block_backward(const void *sizes, const void *block) {
    (void)sizes, (void)block;
    abort();
}
int vitlab_first_token_block_forward(const void *sizes, const void *block) {
    (void)sizes, (void)block;
    abort();
}
int vitlab_first_token_block_backward(const void *sizes, const void *block) {
    (void)sizes, (void)block;
    abort();
}

#endif
