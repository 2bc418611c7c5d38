/* edgekiln's QEMU TCG plugin: counts executed guest instructions and records the running count each
 * time execution reaches a marker address. Built with the host compiler as a shared object by
 * edgekiln.codegen.mcu.toolchain; see ek_qemu_plugin_v1.h for the API it uses.
 *
 * Arguments (-plugin libekcount.so,arg=marker=0x...,arg=out=PATH):
 *   marker=ADDR  guest address of the harness's empty marker function (hex or decimal, Thumb bit
 *                ignored); its count is recorded every time its first instruction executes.
 *   out=PATH     write the results there (default: qemu_plugin_outs, i.e. the -d plugin log).
 * Output, at exit:  "ek_count total N" then one "ek_count mark N" line per marker hit, in order.
 *
 * Counting is one inline 64-bit add of the block's instruction count when a translation block
 * starts (no callback per instruction), so the count is exact at block boundaries. The marker is a
 * function entry, reached only by a call, so it always starts a block: the count recorded there
 * includes the marker's own block, the same on every hit, and the difference between two hits is
 * exactly the instructions executed between them. The guest has one vCPU and no interrupts.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ek_qemu_plugin_v1.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t executed;
static uint64_t marker_addr;
static int have_marker;
static uint64_t *marks;
static size_t n_marks, cap_marks;
static char out_path[4096];

static void on_marker(unsigned int vcpu_index, void *userdata) {
    (void)vcpu_index;
    (void)userdata;
    if (n_marks == cap_marks) {
        size_t cap = cap_marks ? 2 * cap_marks : 1024;
        uint64_t *grown = realloc(marks, cap * sizeof *marks);
        if (grown == NULL) {
            return; /* the driver sees too few marks and reports it */
        }
        marks = grown;
        cap_marks = cap;
    }
    marks[n_marks++] = executed;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    size_t n = qemu_plugin_tb_n_insns(tb);
    size_t i;
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed, n);
    if (!have_marker) {
        return;
    }
    for (i = 0; i < n; ++i) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        if (qemu_plugin_insn_vaddr(insn) == marker_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
    }
}

static void write_results(qemu_plugin_id_t id, void *userdata) {
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    char line[64];
    size_t i;
    (void)id;
    (void)userdata;
    snprintf(line, sizeof line, "ek_count total %" PRIu64 "\n", executed);
    if (f != NULL) {
        fputs(line, f);
        for (i = 0; i < n_marks; ++i) {
            fprintf(f, "ek_count mark %" PRIu64 "\n", marks[i]);
        }
        fclose(f);
    } else {
        qemu_plugin_outs(line);
        for (i = 0; i < n_marks; ++i) {
            snprintf(line, sizeof line, "ek_count mark %" PRIu64 "\n", marks[i]);
            qemu_plugin_outs(line);
        }
    }
    free(marks);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    int i;
    (void)info;
    for (i = 0; i < argc; ++i) {
        if (strncmp(argv[i], "marker=", 7) == 0) {
            marker_addr = strtoull(argv[i] + 7, NULL, 0) & ~(uint64_t)1; /* drop the Thumb bit */
            have_marker = 1;
        } else if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        } else {
            fprintf(stderr, "ek_count: unknown argument %s (want marker=ADDR or out=PATH)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_results, NULL);
    return 0;
}
