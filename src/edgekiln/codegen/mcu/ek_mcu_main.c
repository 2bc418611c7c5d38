/* Measurement harness (edgekiln.codegen.mcu): runs the generated model library on the inputs
 * embedded in ek_mcu_data.h, compares each output with the embedded expected output, writes the
 * outputs to the host through semihosting, and reports the stack high-water mark of the inference.
 *
 * The empty function ek_mcu_mark() is called just before and just after each inference (and, in the
 * per-step build, after each step of the model's invoke function): the QEMU counting plugin is given
 * its address and records the executed-instruction count at every call.
 *
 * Exit status: 0 all outputs as expected (or none embedded), 3 some differ, 5 the stack overflowed,
 * 6 the output file could not be written; 4 comes from the fault handler.
 */
#include <stdint.h>
#include <stdio.h>

#include "ek_mcu_data.h"

#define EK_STACK_PAINT 0xDEADBEEFu

extern uint32_t __stack_bottom[];

__attribute__((noinline, noipa)) void ek_mcu_mark(void) {
    __asm__ volatile("" ::: "memory");
}

static int8_t ek_output[EK_MCU_OUTPUT_SIZE];

static inline uint32_t ek_stack_pointer(void) {
    uint32_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

int main(void) {
    volatile uint32_t *word;
    uint32_t sp = ek_stack_pointer();
    uint32_t stack_bytes = 0;
    long mismatched = 0;
    int status = 0;
    int n, i;
    FILE *out = fopen(EK_MCU_OUTPUT_FILE, "wb");
    if (out == NULL) {
        printf("ek_mcu: cannot open %s on the host\n", EK_MCU_OUTPUT_FILE);
        return 6;
    }
    for (n = 0; n < EK_MCU_N_INPUTS; ++n) {
        if (n == 0) {
            /* Paint everything below this frame; the scan after the inference finds the deepest word it changed. */
            sp = ek_stack_pointer();
            for (word = __stack_bottom; (uint32_t)word < sp; ++word) {
                *word = EK_STACK_PAINT;
            }
        }
        ek_mcu_mark();
        EK_MCU_INVOKE(ek_mcu_inputs[n], ek_output);
        ek_mcu_mark();
        if (n == 0) {
            for (word = __stack_bottom; (uint32_t)word < sp && *word == EK_STACK_PAINT; ++word) {
            }
            stack_bytes = sp - (uint32_t)word;
            if (word == __stack_bottom) {
                status = 5;
            }
        }
#if EK_MCU_HAS_EXPECTED
        for (i = 0; i < EK_MCU_OUTPUT_SIZE; ++i) {
            if (ek_output[i] != ek_mcu_expected[n][i]) {
                ++mismatched;
                break;
            }
        }
#endif
        if (fwrite(ek_output, 1, sizeof ek_output, out) != sizeof ek_output) {
            status = 6;
        }
    }
    (void)i;
    fclose(out);
    if (mismatched && status == 0) {
        status = 3;
    }
    printf("ek_mcu inferences=%d mismatched=%ld stack_bytes=%lu arena_bytes=%d status=%d\n", EK_MCU_N_INPUTS,
           mismatched, (unsigned long)stack_bytes, EK_MCU_ARENA_BYTES, status);
    return status;
}
