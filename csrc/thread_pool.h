// The CPU engine's threads: persistent workers that sleep between calls.
//
// Why not OpenMP: a spinning OpenMP team (libgomp's default wait policy, shared with torch in
// one process) costs a scheduler time slice per parallel region when the cores are
// oversubscribed: the spinning workers are descheduled, and the region's closing barrier waits
// for them to run again (measured on the shared 2-core build machine at load 8: 20-40 ms per
// region, 1 ms of work). Workers here block on a condition variable, so a woken one runs at
// once, and the caller works too. Tasks are handed out one at a time (dynamic scheduling).
#pragma once

#include <cstdint>
#include <type_traits>

namespace ctrak {

// Threads a call with num_threads <= 0 uses: $OMP_NUM_THREADS when set (the usual knob), else
// the CPUs this process may run on.
int default_threads();

// fn(ctx, task, worker) for every task in [0, n_tasks), on min(threads, n_tasks) threads: the
// caller is worker 0, pool workers are 1, 2, ... Returns when every task has finished. fn must
// not throw. Calls from several threads run one after the other. Safe across fork(): a child
// starts a new pool on first use.
void parallel_for(int64_t n_tasks, int threads, void (*fn)(void*, int64_t, int), void* ctx);

template <class F>
void parallel_for(int64_t n_tasks, int threads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  parallel_for(
      n_tasks, threads,
      [](void* c, int64_t task, int worker) { (*static_cast<Fn*>(c))(task, worker); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace ctrak
