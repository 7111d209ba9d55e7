#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

namespace ctrak {
namespace {

class Pool {
 public:
  void run(int64_t n, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
    std::lock_guard<std::mutex> serial(serial_);
    const int helpers = static_cast<int>(std::min<int64_t>(threads, n)) - 1;
    while (static_cast<int>(spawned_) < helpers) {
      // The new worker must wait for the generation this call is about to start, not for the
      // one after it: hand it the current one (only run() changes it, under serial_).
      const int w = ++spawned_;
      const uint64_t seen = generation_;
      std::thread([this, w, seen] { loop(w, seen); }).detach();  // lives as long as the process
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = fn, ctx_ = ctx, n_ = n, helpers_ = helpers, pending_ = helpers;
      next_.store(0, std::memory_order_relaxed);
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
  }

 private:
  void work(int worker) {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) fn_(ctx_, t, worker);
  }

  void loop(int worker, uint64_t seen) {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (worker > helpers_) continue;  // not needed for this call
      lk.unlock();
      work(worker);
      lk.lock();
      // A call waits for all its helpers, so none can miss the generation it is part of.
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex serial_;  // one call at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  void (*fn_)(void*, int64_t, int) = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int helpers_ = 0, pending_ = 0;
  unsigned spawned_ = 0;
  std::atomic<int64_t> next_{0};
};

std::atomic<Pool*> g_pool{nullptr};

// fork() copies only the calling thread: the child must not use the parent's workers (absent)
// or mutexes (possibly held). It forgets the pool (leaked on purpose) and makes a new one.
void forget_pool_in_child() { g_pool.store(nullptr); }

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, &forget_pool_in_child); });
  Pool* fresh = new Pool;
  if (!g_pool.compare_exchange_strong(p, fresh)) {
    delete fresh;
    return *p;
  }
  return *fresh;
}

}  // namespace

int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);  // "4" or "4,2" (nested levels): the first level
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t n_tasks, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
  if (n_tasks <= 0) return;
  if (threads <= 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    return;
  }
  pool().run(n_tasks, threads, fn, ctx);
}

}  // namespace ctrak
