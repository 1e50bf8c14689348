/* The kernels' thread pool: loops whose iterations any thread may run, finished when every iteration
 * is done, not when every thread has arrived.
 *
 * Why not OpenMP: an OpenMP loop ends in a barrier that waits for every thread of the team. On a busy
 * machine (more runnable threads than cores) a descheduled team member holds every other thread at
 * each barrier until the scheduler runs it again, and a deployed network has a hundred such loops per
 * image: measured on this project's 2-core machine with one other busy process, OpenMP made a ResNet-18
 * image 7x slower. Here iterations are claimed one at a time from a shared counter, so the threads
 * that run take the work of those that do not, and a loop is done when its last iteration is.
 *
 * Claiming: one 64-bit ticket holds (job generation << 32 | next iteration). A thread claims a few
 * iterations at a time (about 32 claims per thread per loop) by compare-and-swap, which fails once the
 * job has changed, so a thread that wakes up late never runs an iteration of a job that is over. Idle
 * workers spin briefly, then sleep on a condition variable.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "internal.h"

#define MAX_WORKERS 255
#define SPIN 20000 /* polls of the ticket before a worker sleeps (tens of microseconds) */

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  _Atomic uint64_t ticket;     /* generation << 32 | next iteration */
  _Atomic long done;           /* iterations finished in this generation */
  _Atomic(msgc_task_fn) fn;
  _Atomic(void *) ctx;
  _Atomic long n;
  _Atomic long step;           /* iterations per claim */
  _Atomic int limit;           /* workers taking part in this generation */
  _Atomic int sleepers;
  int workers;
  pthread_t threads[MAX_WORKERS];
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t grow = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER; /* one loop at a time; another caller runs alone */
static __thread int in_pool = 0; /* a pool thread (or a running loop) never starts a nested loop */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* claim and run iterations of generation gen until none is left or the job changed: `step` at a time
   (a claim moves a cache line between cores; a few dozen claims per thread keep the balance) */
static void work(uint32_t gen) {
  const msgc_task_fn fn = atomic_load(&pool.fn);
  void *ctx = atomic_load(&pool.ctx);
  const long n = atomic_load(&pool.n), step = atomic_load(&pool.step);
  uint64_t t = atomic_load(&pool.ticket);
  for (;;) {
    const long i = (long)(t & 0xffffffffu);
    if ((uint32_t)(t >> 32) != gen || i >= n) return;
    const long k = n - i < step ? n - i : step;
    if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + (uint64_t)k)) continue;
    for (long j = i; j < i + k; j++) fn(ctx, j);
    atomic_fetch_add(&pool.done, k);
    t = atomic_load(&pool.ticket);
  }
}

static void *worker(void *arg) {
  const int index = (int)(intptr_t)arg;
  in_pool = 1;
  uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
  for (;;) {
    uint32_t gen = seen;
    for (int k = 0; k < SPIN && gen == seen; k++) {
      cpu_relax();
      gen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
    }
    if (gen == seen) {
      pthread_mutex_lock(&pool.mu);
      atomic_fetch_add(&pool.sleepers, 1);
      while ((gen = (uint32_t)(atomic_load(&pool.ticket) >> 32)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.mu);
    }
    seen = gen;
    if (index < atomic_load(&pool.limit)) work(gen);
  }
  return 0;
}

static void after_fork(void) { /* the child has no workers */
  pool.workers = 0;
  atomic_store(&pool.sleepers, 0);
}

static int ensure_workers(int want) {
  if (want > MAX_WORKERS) want = MAX_WORKERS;
  if (pool.workers >= want) return want;
  pthread_mutex_lock(&grow);
  static int registered = 0;
  if (!registered) {
    pthread_atfork(0, 0, after_fork);
    registered = 1;
  }
  while (pool.workers < want) {
    if (pthread_create(&pool.threads[pool.workers], 0, worker, (void *)(intptr_t)pool.workers) != 0) break;
    pthread_detach(pool.threads[pool.workers]);
    pool.workers++;
  }
  pthread_mutex_unlock(&grow);
  return pool.workers;
}

void msgc_parallel(msgc_task_fn fn, void *ctx, long n, int nthreads) {
  if (n <= 0) return;
  if (nthreads <= 1 || n == 1 || in_pool) {
    for (long i = 0; i < n; i++) fn(ctx, i);
    return;
  }
  const int helpers = ensure_workers(nthreads - 1);
  if (helpers == 0 || pthread_mutex_trylock(&busy) != 0) {
    for (long i = 0; i < n; i++) fn(ctx, i);
    return;
  }
  in_pool = 1;
  atomic_store(&pool.fn, fn);
  atomic_store(&pool.ctx, ctx);
  atomic_store(&pool.n, n);
  const long step = n / (32L * (helpers + 1));
  atomic_store(&pool.step, step > 1 ? step : 1);
  atomic_store(&pool.limit, helpers);
  atomic_store(&pool.done, 0);
  const uint32_t gen = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
  atomic_store(&pool.ticket, (uint64_t)gen << 32);
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
  }
  work(gen);
  for (long k = 0; atomic_load(&pool.done) < n; k++) { /* a claimed iteration still running elsewhere */
    if (k < 4000) cpu_relax();
    else sched_yield();
  }
  in_pool = 0;
  pthread_mutex_unlock(&busy);
}
