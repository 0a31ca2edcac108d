/* test_null_args.c -- every public entry point called with NULL (or missing) pointers, the way a
 * careless FFI caller would: fallible calls return an error status with a "fn: arg: expected
 * ..., got ..." message, getters and destructors return their neutral value; nothing crashes
 * (run under the sanitizer suite as well). */
#include "moe.h"

#include <stdio.h>
#include <string.h>
#include "check.h"

/* E: a fallible call that must fail with a message naming what was expected */
#define E(x)                                                                                  \
    do {                                                                                      \
        moe_clear_error();                                                                    \
        int st_ = (int)(x);                                                                   \
        checks++;                                                                             \
        if (st_ == MOE_OK || !strstr(moe_last_error(), "expected")) {                         \
            failures++;                                                                       \
            fprintf(stderr, "%s:%d: %s -> %s '%s'\n", __FILE__, __LINE__, #x,                 \
                    moe_status_name(st_), moe_last_error());                                  \
        }                                                                                     \
    } while (0)
/* G: a getter on a NULL handle: only has to return */
#define G(x) ((void)(x))
#define V(x) x

int main(void) {
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    int64_t sh[2] = {2, 2};
    moe_tensor *t = NULL, *o = NULL;
    moe_tensor_new(&t, MOE_F32, 2, sh, cpu);
    G(moe_dtype_from_name(NULL));
    E(moe_encode(MOE_F32, 1, NULL)); E(moe_decode(MOE_F32, 1, NULL));
    E(moe_cuda_device_info(0, NULL, 0));
    E(moe_tensor_new(NULL, MOE_F32, 2, sh, cpu)); E(moe_tensor_new(&o, MOE_F32, 2, NULL, cpu));
    V(moe_tensor_free(NULL)); G(moe_tensor_dtype(NULL)); G(moe_tensor_ndim(NULL)); G((int)moe_tensor_dim(NULL,0));
    G((int)moe_tensor_stride(NULL,0)); G((int)moe_tensor_numel(NULL)); G((int)moe_tensor_offset(NULL)); G((int)moe_tensor_nbytes(NULL));
    (void)moe_tensor_device(NULL); G(moe_tensor_is_contiguous(NULL)); G(moe_tensor_data(NULL) != 0);
    E(moe_tensor_copy(NULL, t)); E(moe_tensor_copy(t, NULL));
    E(moe_tensor_copy_from_host(NULL, NULL, 0)); E(moe_tensor_copy_from_host(t, NULL, 16));
    E(moe_tensor_copy_to_host(NULL, NULL, 0)); E(moe_tensor_copy_to_host(t, NULL, 16));
    E(moe_tensor_to_device(NULL, t, cpu)); E(moe_tensor_to_device(&o, NULL, cpu));
    E(moe_tensor_contiguous(NULL, t)); E(moe_tensor_contiguous(&o, NULL));
    E(moe_tensor_cast(NULL, t, 0)); E(moe_tensor_cast(&o, NULL, 0));
    E(moe_tensor_cast_into(NULL, t)); E(moe_tensor_cast_into(t, NULL));
    E(moe_tensor_fill(NULL, 0));
    E(moe_tensor_read_f64(NULL, NULL, 0)); E(moe_tensor_read_f64(t, NULL, 4));
    E(moe_tensor_write_f64(NULL, NULL, 0)); E(moe_tensor_write_f64(t, NULL, 4));
    E(moe_tensor_narrow(NULL, t, 0, 0, 1)); E(moe_tensor_narrow(&o, NULL, 0, 0, 1));
    E(moe_tensor_select(NULL, t, 0, 0)); E(moe_tensor_select(&o, NULL, 0, 0));
    E(moe_tensor_transpose(NULL, t, 0, 1)); E(moe_tensor_transpose(&o, NULL, 0, 1));
    E(moe_tensor_reshape(NULL, t, 1, sh)); E(moe_tensor_reshape(&o, NULL, 1, sh)); E(moe_tensor_reshape(&o, t, 1, NULL));
    E(moe_tensor_rand_uniform(NULL, 1, 0, 1)); E(moe_tensor_rand_normal(NULL, 1, 0, 1)); E(moe_tensor_arange(NULL, 0, 1));
    E(moe_mem_stats(NULL));
    E(moe_npy_read(NULL, &o)); E(moe_npy_read("/nonexist", NULL)); E(moe_npy_write(NULL, t)); E(moe_npy_write("/nonexistent-moelab-dir/x.npy", NULL));
    E(moe_npy_parse(NULL, 10, &o)); E(moe_npy_parse("abc", 3, NULL));
    E(moe_st_open(NULL, NULL)); E(moe_st_open("/nonexist", NULL)); E(moe_st_open_memory(NULL, 10, NULL));
    { moe_st_file *f = NULL; E(moe_st_open_memory(NULL, 10, &f)); E(moe_st_open(NULL, &f)); }
    V(moe_st_close(NULL)); G(moe_st_count(NULL)); G(moe_st_name(NULL, 0) != 0); G(moe_st_find(NULL, "x")); E(moe_st_get(NULL, 0, &o));
    G(moe_st_meta_count(NULL)); G(moe_st_meta_key(NULL, 0) != 0); G(moe_st_meta_value(NULL, 0) != 0);
    E(moe_st_write(NULL, 0, NULL, NULL, 0, NULL, NULL)); E(moe_st_write("/nonexistent-moelab-dir/x.st", 1, NULL, NULL, 0, NULL, NULL));
    { const char *nm[1] = {"a"}; const moe_tensor *ts[1] = {NULL}; E(moe_st_write("/nonexistent-moelab-dir/x.st", 1, nm, ts, 0, NULL, NULL));
      const char *nn[1] = {NULL}; const moe_tensor *tt[1] = {t}; E(moe_st_write("/nonexistent-moelab-dir/x.st", 1, nn, tt, 0, NULL, NULL));
      E(moe_st_write("/nonexistent-moelab-dir/x.st", 1, nm, tt, 1, NULL, NULL)); }
    E(moe_tensor_new_pinned(NULL, 0, 1, sh)); E(moe_tensor_new_pinned(&o, 0, 1, NULL));
    { moe_event *ev = NULL; E(moe_tensor_copy_to_host_async(NULL, t, &ev)); E(moe_tensor_copy_to_host_async(t, NULL, &ev)); E(moe_tensor_copy_to_host_async(t, t, NULL)); }
    V(moe_event_free(NULL));
    E(moe_graph_end(NULL)); E(moe_graph_replay(NULL)); V(moe_graph_free(NULL)); E(moe_graph_time(NULL, 0, 1, NULL));
    E(moe_matmul_nt(NULL, t, &o)); E(moe_matmul_nt(t, NULL, &o)); E(moe_matmul_nt(t, t, NULL));
    E(moe_rmsnorm(NULL, NULL, 0, &o)); E(moe_rmsnorm(t, NULL, 0, NULL));
    E(moe_axpby(1, NULL, 1, t)); E(moe_axpby(1, t, 1, NULL));
    G(moe_quant_mode_from_name(NULL));
    { moe_qtensor *q = NULL; E(moe_quantize(NULL, 0, NULL, &q)); E(moe_quantize(t, 0, NULL, NULL)); E(moe_dequantize(NULL, 0, &o)); E(moe_dequantize(NULL, 0, NULL));
      E(moe_qtensor_from_parts(NULL, 0, t, NULL, NULL, NULL)); E(moe_qtensor_from_parts(&q, 0, NULL, NULL, NULL, NULL)); E(moe_qtensor_from_parts(&q, 1, t, NULL, NULL, NULL)); }
    V(moe_qtensor_free(NULL)); G(moe_qtensor_mode(NULL)); G(moe_qtensor_ndim(NULL)); G((int)moe_qtensor_dim(NULL, 0)); (void)moe_qtensor_device(NULL);
    G(moe_qtensor_block_rows(NULL)); G(moe_qtensor_block_cols(NULL)); G(moe_qtensor_data(NULL) != 0); G(moe_qtensor_scales(NULL) != 0); G(moe_qtensor_global_scale(NULL) != 0);
    G(moe_route_method_from_name(NULL));
    { moe_route_cfg c = moe_route_cfg_default(); moe_tensor *i = NULL, *w = NULL; E(moe_route(NULL, t, NULL, &i, &w, NULL)); E(moe_route(&c, NULL, NULL, &i, &w, NULL)); E(moe_route(&c, t, NULL, NULL, &w, NULL)); E(moe_route(&c, t, NULL, &i, NULL, NULL)); }
    G(moe_activation_from_name(NULL));
    { moe_experts *ex = NULL; E(moe_experts_new(NULL, NULL, t, t, NULL, NULL, cpu)); E(moe_experts_new(&ex, NULL, NULL, t, NULL, NULL, cpu)); E(moe_experts_new(&ex, NULL, t, NULL, NULL, NULL, cpu));
      E(moe_experts_new_quant(NULL, NULL, 1, t, t, NULL, NULL, NULL, NULL, cpu)); E(moe_experts_new_quant(&ex, NULL, 1, NULL, NULL, NULL, NULL, NULL, NULL, cpu)); E(moe_experts_new_quant(&ex, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, cpu)); }
    G(moe_experts_quant(NULL)); V(moe_experts_free(NULL)); G((int)moe_experts_num(NULL)); G((int)moe_experts_hidden(NULL)); G((int)moe_experts_intermediate(NULL)); G(moe_experts_activation(NULL)); (void)moe_experts_device(NULL); G((int)moe_experts_nbytes(NULL));
    { moe_workspace *ws = NULL; E(moe_workspace_new(NULL, cpu, 1, 1, NULL)); E(moe_workspace_new(&ws, cpu, 1, 1, NULL)); }
    V(moe_workspace_free(NULL)); G((int)moe_workspace_max_tokens(NULL)); G(moe_workspace_top_k(NULL)); G((int)moe_workspace_nbytes(NULL)); E(moe_workspace_check(NULL, NULL));
    { moe_fused_cfg c = moe_fused_cfg_default(); E(moe_fused_moe(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &o, NULL, NULL, NULL)); E(moe_fused_moe(&c, NULL, t, NULL, NULL, NULL, NULL, NULL, &o, NULL, NULL, NULL)); }
    { moe_trace *tr = NULL; E(moe_trace_new(NULL, 1, 1, 4, 0)); moe_trace_new(&tr, 1, 1, 4, 0);
      V(moe_trace_free(NULL)); G((int)moe_trace_tokens(NULL)); G((int)moe_trace_layers(NULL)); G((int)moe_trace_top_k(NULL)); G((int)moe_trace_num_experts(NULL));
      E(moe_trace_set_num_experts(NULL, 4)); G(moe_trace_has_weights(NULL)); G(moe_trace_has_token_ids(NULL)); E(moe_trace_reserve(NULL, 1)); E(moe_trace_resize(NULL, 1));
      G(moe_trace_ids(NULL) != 0); G(moe_trace_weights(NULL) != 0); G(moe_trace_token_ids(NULL) != 0); G(moe_trace_ids_mut(NULL) != 0); G(moe_trace_weights_mut(NULL) != 0); G(moe_trace_token_ids_mut(NULL) != 0);
      E(moe_trace_append(NULL, 1, t, NULL, NULL)); 
      E(moe_trace_set_layer(NULL, 0, 1, 0, t, NULL)); E(moe_trace_set_layer(tr, 0, 0, 0, NULL, NULL)); E(moe_trace_set_layer(tr, 0, 1, 0, NULL, NULL));
      E(moe_trace_append_host(NULL, 1, NULL, NULL, NULL)); E(moe_trace_append_host(tr, 1, NULL, NULL, NULL));
      E(moe_trace_append_trace(NULL, tr, 0, 0)); E(moe_trace_append_trace(tr, NULL, 0, 0));
      E(moe_trace_set_meta(NULL, "a", "b")); E(moe_trace_set_meta(tr, NULL, "b")); 
      G(moe_trace_get_meta(NULL, "a") != 0); G(moe_trace_get_meta(tr, NULL) != 0); G(moe_trace_meta_count(NULL)); G(moe_trace_meta_key(NULL, 0) != 0); G(moe_trace_meta_value(NULL, 0) != 0);
      E(moe_trace_save(NULL, "/nonexistent-moelab-dir/t")); E(moe_trace_save(tr, NULL)); E(moe_trace_save_range(NULL, "/nonexistent-moelab-dir/t", 0, 0)); E(moe_trace_save_range(tr, NULL, 0, 0));
      { moe_trace *t2 = NULL; E(moe_trace_load(NULL, &t2)); } E(moe_trace_load("/nonexistent-moelab-dir/none", NULL));
      moe_trace_cmp *cm = NULL; E(moe_trace_compare(NULL, tr, NULL, &cm)); E(moe_trace_compare(tr, NULL, NULL, &cm)); E(moe_trace_compare(tr, tr, NULL, NULL));
      V(moe_trace_cmp_free(NULL)); moe_trace_summary *su = NULL; E(moe_trace_stats(NULL, NULL, &su)); E(moe_trace_stats(tr, NULL, NULL)); V(moe_trace_summary_free(NULL));
      moe_trace_free(tr); }
    E(moe_synchronize((moe_device){7, 0}));
    CHECK(o == NULL);
    moe_tensor_free(t);
    printf("test_null_args: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
