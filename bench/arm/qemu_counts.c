/*
 * A QEMU user-mode plugin that counts what a guest program executes: every instruction, and
 * the loads and stores among them (by mnemonic: a load/store-pair or a vector load counts
 * once). bench/arm_proxy.py runs mulmd and llama.cpp, both built for aarch64, under it and
 * takes the difference between two token counts, so load and prefill cancel out.
 *
 *   qemu-aarch64 -plugin ./qemu_counts.so,out=FILE PROGRAM ARGS...
 *
 * At exit it writes one line to FILE: "insns N loads L stores S".
 *
 * Written against the plugin API of QEMU 7.2 (Debian 12's qemu-user: plugin API version 1).
 * The few declarations it needs are stated here rather than taken from qemu-plugin.h, which no
 * Debian 12 package ships. Counts are added per translated block as it runs (one callback per
 * block, not per instruction), with atomic adds: a guest's threads run on host threads at once.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };
typedef void (*vcpu_udata_cb)(unsigned int vcpu_index, void *userdata);
typedef void (*tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*udata_cb)(qemu_plugin_id_t id, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb cb);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, vcpu_udata_cb cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static _Atomic uint64_t insns, loads, stores;
static char out_path[4096];

/* A block's three counts, packed into the callback's user-data pointer (no allocation per
 * block): instructions in bits 0-31, loads in 32-47, stores in 48-63. A block holds at most
 * 512 instructions, far below each field's limit. */
static void on_block(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    uintptr_t packed = (uintptr_t)userdata;
    atomic_fetch_add_explicit(&insns, packed & 0xffffffffu, memory_order_relaxed);
    atomic_fetch_add_explicit(&loads, (packed >> 32) & 0xffffu, memory_order_relaxed);
    atomic_fetch_add_explicit(&stores, packed >> 48, memory_order_relaxed);
}

/* aarch64 mnemonics: every load starts "ld" (ldr, ldp, ldur, ld1, ldxr, ldar...), every store
 * "st" (str, stp, stur, st1, stxr, stlr...). Prefetches (prfm) touch no register and count as
 * neither. */
static void classify(const char *disas, uint64_t *l, uint64_t *s)
{
    while (*disas == ' ' || *disas == '\t')
        disas++;
    if (strncmp(disas, "ld", 2) == 0)
        (*l)++;
    else if (strncmp(disas, "st", 2) == 0)
        (*s)++;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t l = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        char *disas = qemu_plugin_insn_disas(qemu_plugin_tb_get_insn(tb, i));
        if (disas) {
            classify(disas, &l, &s);
            free(disas);
        }
    }
    uintptr_t packed = (uintptr_t)n | (uintptr_t)l << 32 | (uintptr_t)s << 48;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block, QEMU_PLUGIN_CB_NO_REGS, (void *)packed);
}

static void write_counts(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    FILE *f = fopen(out_path, "w");
    if (!f) {
        fprintf(stderr, "qemu_counts: cannot write %s\n", out_path);
        return;
    }
    fprintf(f, "insns %llu loads %llu stores %llu\n", (unsigned long long)atomic_load(&insns),
            (unsigned long long)atomic_load(&loads), (unsigned long long)atomic_load(&stores));
    fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const struct qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0 && strlen(argv[i] + 4) < sizeof out_path)
            strcpy(out_path, argv[i] + 4);
    }
    if (!out_path[0]) {
        fprintf(stderr, "qemu_counts: give the output file: -plugin qemu_counts.so,out=FILE\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_counts, NULL);
    return 0;
}
