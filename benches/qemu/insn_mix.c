/* A qemu TCG plugin (plugin API version 1, qemu 7.2 as Debian 12 ships it): counts the guest
 * instructions a program executes, and among them the vector FMAs (fmla), the scalar FMAs
 * (fmadd, fmsub, ...), the loads (ld*) and the stores (st*). Printed at exit. Count one thread:
 * the inline adds are not atomic across vCPUs. Only the few API functions used are declared,
 * with the signatures of include/qemu/qemu-plugin.h. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t,
                                           void (*)(qemu_plugin_id_t, struct qemu_plugin_tb *));
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op,
                                              void *, uint64_t);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *, enum qemu_plugin_op,
                                                void *, uint64_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *),
                                    void *);
void qemu_plugin_outs(const char *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t all, vfma, sfma, loads, stores;

static void translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &all, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        char *d = qemu_plugin_insn_disas(insn);
        uint64_t *counter = NULL;
        if (strncmp(d, "fmla", 4) == 0 || strncmp(d, "fmls", 4) == 0)
            counter = &vfma;
        else if (strncmp(d, "fmadd", 5) == 0 || strncmp(d, "fmsub", 5) == 0 ||
                 strncmp(d, "fnmadd", 6) == 0 || strncmp(d, "fnmsub", 6) == 0)
            counter = &sfma;
        else if (strncmp(d, "ld", 2) == 0)
            counter = &loads;
        else if (strncmp(d, "st", 2) == 0)
            counter = &stores;
        if (counter)
            qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, counter,
                                                       1);
        free(d); /* glib's g_free is free */
    }
}

static void report(qemu_plugin_id_t id, void *unused) {
    char line[256];
    snprintf(line, sizeof line,
             "guest instructions %llu, vector FMAs %llu, scalar FMAs %llu, loads %llu, "
             "stores %llu\n",
             (unsigned long long)all, (unsigned long long)vfma, (unsigned long long)sfma,
             (unsigned long long)loads, (unsigned long long)stores);
    qemu_plugin_outs(line);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const void *info, int argc,
                                                               char **argv) {
    qemu_plugin_register_vcpu_tb_trans_cb(id, translate);
    qemu_plugin_register_atexit_cb(id, report, NULL);
    return 0;
}
