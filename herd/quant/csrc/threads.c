/* The barrier of threads.h. */
#include "threads.h"

#include "common.h"

#define SPINS 1000

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
static void sleep_while(_Atomic int *word, int value) {
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void wake_all(_Atomic int *word) {
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
}
#else
#include <sched.h>
static void sleep_while(_Atomic int *word, int value) {
    (void)word;
    (void)value;
    sched_yield();
}
static void wake_all(_Atomic int *word) { (void)word; }
#endif

void barrier_wait(Barrier *b, int nt) {
    if (nt == 1) return;
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->arrived, 1) == nt - 1) {
        atomic_store(&b->arrived, 0);
        atomic_store(&b->phase, phase + 1);
        if (atomic_load(&b->sleepers)) wake_all(&b->phase);
        return;
    }
    for (int i = 0; atomic_load(&b->phase) == phase; i++) {
        if (i < SPINS) {
            cpu_relax();
        } else {
            atomic_fetch_add(&b->sleepers, 1);
            sleep_while(&b->phase, phase); /* returns at once if the phase has moved on */
            atomic_fetch_sub(&b->sleepers, 1);
        }
    }
}
