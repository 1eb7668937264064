/* How far apart the two threads' cores are: the time a cache line takes to go from one to the other and back.
 *
 * The 2-core AMD EPYC machine's cores sometimes share an L3 (round trip 50–60 ns) and sometimes do not (320–390 ns);
 * which one a run gets changes from minute to minute. Where they share none, memory one core wrote is slow for the
 * other to write or read, and training steps ran up to 14% slower (docs/performance.md, "Buffers each core keeps").
 * The benchmark reports this probe beside each row, so that a run's figures say which machine they come from.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include <omp.h>

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* Nanoseconds per round trip of one cache line between OpenMP threads 0 and 1 (each waits for the other's write,
 * then writes), over `round_trips` of them; -1 when fewer than two threads run. */
double vitlab_core_round_trip_ns(int64_t round_trips) {
    static _Atomic int64_t turn __attribute__((aligned(64)));
    double started = 0.0, finished = 0.0;
    int team = 0;
    atomic_store(&turn, 0);
#pragma omp parallel num_threads(2)
    {
        int thread = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads(); /* (its implicit barrier: every thread sees `team`) */
        if (team == 2) {
            if (thread == 0)
                started = seconds_now();
            for (int64_t trip = 0; trip < round_trips; trip++) {
                int64_t mine = 2 * trip + thread; /* thread 0 moves on even turns, thread 1 on odd ones */
                while (atomic_load_explicit(&turn, memory_order_acquire) != mine)
                    ;
                atomic_store_explicit(&turn, mine + 1, memory_order_release);
            }
            if (thread == 0) {
                while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * round_trips) /* thread 1's last write */
                    ;
                finished = seconds_now();
            }
        }
    }
    return team == 2 && round_trips > 0 ? (finished - started) / (double)round_trips * 1e9 : -1.0;
}
