/* Threads: one OpenMP team per call, meeting at a spin-then-sleep barrier.
 *
 * herd sets OMP_WAIT_POLICY=passive (torch's threads must not spin while Python runs), so every
 * OpenMP fork or barrier puts a thread to sleep and wakes it with a system call: tens of
 * microseconds in a virtual machine, dozens of times per token. Instead a whole call runs in one
 * parallel region whose threads meet at this barrier: it spins for ~30 us (the usual wait, when the
 * threads' shares are even) and then sleeps on a futex, so that a thread descheduled by another
 * process does not keep its partner spinning for a whole time slice.
 */
#pragma once

#include <stdatomic.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif

typedef struct {
    _Atomic int arrived, phase, sleepers;
} Barrier;

/* Wait until all nt threads of the team have arrived. */
void barrier_wait(Barrier *b, int nt);
