// A known amount of work for the check of the counting plugin (scripts/cross-test): ITERATIONS
// passes of one load, one store and two other instructions, then exit(0). No C library, so
// nothing else runs that a count could include.
    .global _start
_start:
    ldr x0, =ITERATIONS
    sub sp, sp, #16
    str xzr, [sp]
1:  ldr x1, [sp]
    str x1, [sp]
    subs x0, x0, #1
    b.ne 1b
    mov x0, #0
    mov x8, #93         // exit
    svc #0
