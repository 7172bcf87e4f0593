// The fused one-token LoRA node (native/llama-lora-fused-decode.patch) on graphs built with ggml's C API, for a
// CPU other than the one running the suite (tests/test_cpu_paths.py cross-compiles it for aarch64 and runs it
// under qemu). Each case is res + s * B (A x) with A, B of a given type; it prints one JSON line a case: how many
// products ran fused and the largest error against a float64 reference over the values the tensors hold (an f16
// weight's rounded values, x as given). Whether an error is small enough, and whether a case should fuse, is the
// test's to judge.
#include "ggml.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double rnd(unsigned * s) {  // uniform in [-1, 1), the same on every CPU
    *s = *s * 1103515245u + 12345u;
    return ((*s >> 8) & 0xFFFF) / 32768.0 - 1.0;
}

static struct ggml_tensor * filled(struct ggml_context * ctx, enum ggml_type type, int cols, int rows, double * vals,
                                   unsigned * seed) {
    struct ggml_tensor * t = ggml_new_tensor_2d(ctx, type, cols, rows);
    for (int i = 0; i < rows*cols; ++i) {
        const float v = (float) rnd(seed);
        if (type == GGML_TYPE_F16) {
            ((ggml_fp16_t *) t->data)[i] = ggml_fp32_to_fp16(v);
            vals[i] = ggml_fp16_to_fp32(((ggml_fp16_t *) t->data)[i]);
        } else {
            ((float *) t->data)[i] = v;
            vals[i] = v;
        }
    }
    return t;
}

static void run_case(enum ggml_type a_type, enum ggml_type b_type, int r, float scale, int u_first, int inplace,
                     int n_tok, int threads) {
    const int d_in = 40, d_out = 23;
    struct ggml_init_params ip = { 16u << 20, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    unsigned seed = 7u*r + 13u*threads + 101u*n_tok;
    double * a = malloc(sizeof(double)*r*d_in), * b = malloc(sizeof(double)*d_out*r);
    double * x = malloc(sizeof(double)*n_tok*d_in), * res = malloc(sizeof(double)*n_tok*d_out);
    struct ggml_tensor * A = filled(ctx, a_type, d_in, r, a, &seed);
    struct ggml_tensor * B = filled(ctx, b_type, r, d_out, b, &seed);
    struct ggml_tensor * X = filled(ctx, GGML_TYPE_F32, d_in, n_tok, x, &seed);
    struct ggml_tensor * R = filled(ctx, GGML_TYPE_F32, d_out, n_tok, res, &seed);
    struct ggml_tensor * u = ggml_mul_mat(ctx, B, ggml_mul_mat(ctx, A, X));
    if (scale != 0.0f) {
        u = ggml_scale(ctx, u, scale);
    }
    struct ggml_tensor * out = inplace ? (u_first ? ggml_add_inplace(ctx, u, R) : ggml_add_inplace(ctx, R, u))
                                       : (u_first ? ggml_add(ctx, u, R) : ggml_add(ctx, R, u));
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    const int before = ggml_cpu_lora_fused_nodes();
    const int rc = ggml_graph_compute_with_ctx(ctx, gf, threads);
    const int fused = ggml_cpu_lora_fused_nodes() - before;
    double err = 0.0, mag = 0.0;
    for (int k = 0; k < n_tok; ++k) {
        for (int j = 0; j < d_out; ++j) {
            double v = 0.0;
            for (int i = 0; i < r; ++i) {
                double t = 0.0;
                for (int e = 0; e < d_in; ++e) {
                    t += a[i*d_in + e]*x[k*d_in + e];
                }
                v += b[j*r + i]*t;
            }
            const double want = res[k*d_out + j] + (scale != 0.0f ? scale : 1.0)*v;
            err = fmax(err, fabs(((float *) out->data)[k*d_out + j] - want));
            mag = fmax(mag, fabs(want));
        }
    }
    printf("{\"a\": \"%s\", \"b\": \"%s\", \"r\": %d, \"scale\": %g, \"u_first\": %d, \"inplace\": %d, \"n_tok\": %d, "
           "\"threads\": %d, \"rc\": %d, \"fused\": %d, \"err\": %.3g, \"mag\": %.3g, \"out\": [", ggml_type_name(a_type),
           ggml_type_name(b_type), r, scale, u_first, inplace, n_tok, threads, rc, fused, err, mag);
    for (int i = 0; i < n_tok*d_out; ++i) {
        printf(i ? ", %.9g" : "%.9g", ((float *) out->data)[i]);
    }
    printf("]}\n");
    free(a); free(b); free(x); free(res);
    ggml_free(ctx);
}

int main(void) {
    const enum ggml_type F32 = GGML_TYPE_F32, F16 = GGML_TYPE_F16;
    for (int threads = 1; threads <= 3; ++threads) {
        run_case(F32, F32, 11,  0.0f,  0, 0, 1, threads);  // a rank with a scalar tail, no scale node
        run_case(F32, F32, 40,  0.37f, 1, 0, 1, threads);  // a scale node, the add's other order, a longer rank
        run_case(F32, F32, 16,  1.7f,  0, 1, 1, threads);  // the output written over res
        run_case(F16, F32, 32,  1.7f,  0, 0, 1, threads);  // f16 A: fused on x86 only
        run_case(F32, F16, 24,  0.37f, 1, 0, 1, threads);  // f16 B: fused on x86 only
        run_case(F32, F32, 16,  0.0f,  0, 0, 3, threads);  // three tokens: never fused
    }
    return 0;
}
