/* Minimal Cortex-M startup for the measurement harness (edgekiln.codegen.mcu): vector table, reset
 * handler (FPU on, .data copied, .bss zeroed, semihosting handles opened), fault handler. Linked with
 * newlib's semihosting syscalls (--specs=nano.specs --specs=rdimon.specs -nostartfiles).
 *
 * NOTE: newlib's own rdimon-crt0 is not used: it has no vector table (an M-profile core fetches its
 * initial stack pointer and reset address from address 0; on mps2-an386 a program linked with it
 * locks up at PC 0) and it takes the stack from the debugger's SYS_HEAPINFO answer, while the
 * harness needs the stack at known addresses to paint it.
 */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[], __stack_top[];
extern void initialise_monitor_handles(void);
extern int main(void);

void ek_reset_handler(void);
void ek_fault_handler(void);

/* Semihosting call: operation in r0, argument in r1, BKPT 0xAB (M-profile). */
static int32_t ek_semihost(int32_t op, const void *arg) {
    register int32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

__attribute__((used, section(".vectors"))) static void (*const ek_vectors[16])(void) = {
    (void (*)(void))(uintptr_t)__stack_top, /* initial main stack pointer */
    ek_reset_handler,
    ek_fault_handler, /* NMI */
    ek_fault_handler, /* HardFault */
    ek_fault_handler, /* MemManage */
    ek_fault_handler, /* BusFault */
    ek_fault_handler, /* UsageFault */
    0, 0, 0, 0,
    ek_fault_handler, /* SVCall */
    ek_fault_handler, /* DebugMonitor */
    0,
    ek_fault_handler, /* PendSV */
    ek_fault_handler, /* SysTick */
};

void ek_fault_handler(void) {
    /* SYS_WRITE0, then SYS_EXIT_EXTENDED {ADP_Stopped_ApplicationExit, 4}: QEMU exits with status 4
     * (any other reason code exits with 1). */
    static const uint32_t exit_block[2] = {0x20026u, 4u};
    ek_semihost(0x04, "ek_mcu: fault (HardFault, bus or usage fault)\n");
    ek_semihost(0x20, exit_block);
    for (;;) {
    }
}

void ek_reset_handler(void) {
    volatile uint32_t *const cpacr = (volatile uint32_t *)0xE000ED88u;
    uint32_t *src = __data_load;
    uint32_t *dst;
    /* Full access to the FPU (coprocessors 10 and 11) before any code may use it. */
    *cpacr |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    for (dst = __data_start; dst < __data_end; ++dst) {
        *dst = *src++;
    }
    for (dst = __bss_start; dst < __bss_end; ++dst) {
        *dst = 0;
    }
    initialise_monitor_handles();
    exit(main());
}
