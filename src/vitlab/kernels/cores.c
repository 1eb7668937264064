/* How far apart the two threads' cores are: the time a cache line takes to go from one to the other and back.
 *
 * On a machine whose two cores sometimes share an L3 and sometimes do not (the 2-core AMD EPYC: docs/performance.md,
 * "Buffers each core keeps"), memory one core wrote is slow for the other to write or read when they share none,
 * and training steps slow down with it. The benchmark reports this probe beside each row, so that a run's figures say
 * which kind of machine they come from.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include <omp.h>

#define SPINS_PER_CLOCK_CHECK 1024
#define TIME_LIMIT_SECONDS 1.0 /* e.g. both threads on one CPU: they would take turns by the scheduler's time slices */

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* Wait until `turn` reads `wanted` or `gave_up` is set (by this thread once the time limit has passed, or by the other
 * thread); returns whether it arrived. */
static int wait_for_turn(_Atomic int64_t *turn, int64_t wanted, _Atomic int *gave_up, double deadline) {
    for (int64_t spins = 1;; spins++) {
        if (atomic_load_explicit(turn, memory_order_acquire) == wanted)
            return 1;
        if (spins % SPINS_PER_CLOCK_CHECK == 0) {
            if (atomic_load_explicit(gave_up, memory_order_relaxed))
                return 0;
            if (seconds_now() > deadline) {
                atomic_store_explicit(gave_up, 1, memory_order_relaxed);
                return 0;
            }
        }
    }
}

/* Nanoseconds per round trip of one cache line between OpenMP threads 0 and 1 (each waits for the other's write,
 * then writes), over `round_trips` of them; -1 when fewer than two threads run, round_trips < 1, or the trips took
 * longer than the time limit. Each call has its own counter: calls from several threads at once do not meet. */
double vitlab_core_round_trip_ns(int64_t round_trips) {
    if (round_trips < 1)
        return -1.0;
    _Alignas(64) _Atomic int64_t turn = 0;
    _Atomic int gave_up = 0;
    double started = 0.0, finished = 0.0;
    int team = 0;
#pragma omp parallel num_threads(2)
    {
        int thread = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads(); /* (its implicit barrier: every thread sees `team`) */
        if (team == 2) {
            double deadline = seconds_now() + TIME_LIMIT_SECONDS;
            if (thread == 0)
                started = seconds_now();
            for (int64_t trip = 0; trip < round_trips; trip++) {
                int64_t mine = 2 * trip + thread; /* thread 0 moves on even turns, thread 1 on odd ones */
                if (!wait_for_turn(&turn, mine, &gave_up, deadline))
                    break;
                atomic_store_explicit(&turn, mine + 1, memory_order_release);
            }
            if (thread == 0 && wait_for_turn(&turn, 2 * round_trips, &gave_up, deadline)) /* thread 1's last write */
                finished = seconds_now();
        }
    }
    if (team != 2 || atomic_load(&gave_up))
        return -1.0;
    return (finished - started) / (double)round_trips * 1e9;
}
