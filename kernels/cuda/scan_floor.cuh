// Arithmetic floor of the d_state-16 scan (scan_floor.cu), for benchmarks/gpu_check.py. Not used by models.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Queues `blocks` x vmamba_scan_floor_threads() threads on `stream`, each running `steps` scan steps of 16 states
// (decay, drive, state update, output sum) on registers, with `poly_states` of the 16 exponentials as an FMA-pipe
// polynomial (0, 2, 3, 4, 5, 6, 8 or 16) and the rest on ex2.approx; writes one float a thread to `out`.
// State elements processed: blocks * threads * steps * 16. Null on success, else a static message.
__attribute__((visibility("default"))) const char* vmamba_scan_floor(int poly_states, int blocks, int steps,
                                                                     float* out, void* stream);
__attribute__((visibility("default"))) int vmamba_scan_floor_threads(void);

// y = 2^x by the floor kernel's FMA-pipe polynomial (x clamped to >= -126), for its accuracy test.
__attribute__((visibility("default"))) const char* vmamba_exp2_poly(const float* x, float* y, int64_t n,
                                                                    void* stream);

#ifdef __cplusplus
}
#endif
