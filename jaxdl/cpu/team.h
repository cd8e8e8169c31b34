// How jaxdl's kernels (gemm.cc, adam.cc) share their work with a second core.
//
// A call splits its work into units that any thread may take; the calling thread takes
// units too, and alone can finish them all, so it never waits on a helper that has not
// started. Helpers are XLA's intra-op thread pool's threads. On some virtual machines a
// pool thread that has slept takes 30-50 µs to wake (measured: 28-48 µs after 0.1-2 ms
// idle, 1 µs after 20 µs), which is a sixth of a training step's GEMM. So a helper that
// has run out of units spins for a while (kSpin) on a mailbox, where the next call of any
// of these kernels posts its work, and takes it at once. One helper spins at a time.
//
// The mailbox is one per process, shared by the kernels' libraries: jaxdl.kernels
// allocates it and hands it to each library (jaxdl_team_attach) as it loads it. Without
// one, helpers are scheduled on the pool as usual and return when the units run out.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxdl_team {

struct Job {  // a call's work: run(arg) takes units until none are left
  void (*run)(void*);
  void* arg;  // owned: run deletes it
};

struct Mailbox {
  std::atomic<int> state;  // one of the states below
  Job job;
  std::atomic<int> running;    // calls running now
  std::atomic<int64_t> calm;   // helpers wait only after this time (ns)
};

enum : int { kIdle = 0, kWaiting = 1, kPosting = 2, kPosted = 3 };

constexpr int64_t kSpin = 200000;  // ns a helper waits for the next call
// ns without waiting helpers after two calls overlapped: calls of several devices at once
// (a sweep's shards) need every pool thread, and a waiting helper holds one (measured:
// a sweep over two devices 0.89x as fast as before with waiting helpers, 1.05-1.07x
// without).
constexpr int64_t kCalm = 100000000;

inline Mailbox* mailbox = nullptr;

inline int64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Marks a call as running for its lifetime; notes when calls overlap.
class Running {
 public:
  Running() {
    if (mailbox != nullptr && mailbox->running.fetch_add(1, std::memory_order_acq_rel) > 0) {
      mailbox->calm.store(Now() + kCalm, std::memory_order_relaxed);
    }
  }
  ~Running() {
    if (mailbox != nullptr) mailbox->running.fetch_sub(1, std::memory_order_acq_rel);
  }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
};

// Hands `job` to the waiting helper, if one waits.
inline bool Post(const Job& job) {
  Mailbox* box = mailbox;
  int expected = kWaiting;
  if (box == nullptr ||
      !box->state.compare_exchange_strong(expected, kPosting, std::memory_order_acq_rel)) {
    return false;
  }
  box->job = job;
  box->state.store(kPosted, std::memory_order_release);
  return true;
}

// Runs `job`; then, if `wait`, waits up to kSpin for another call's job, and so on.
inline void Help(Job job, bool wait) {
  for (;;) {
    job.run(job.arg);
    Mailbox* box = mailbox;
    int expected = kIdle;
    if (!wait || box == nullptr || Now() < box->calm.load(std::memory_order_relaxed) ||
        !box->state.compare_exchange_strong(expected, kWaiting, std::memory_order_acq_rel)) {
      return;  // another helper waits already
    }
    const int64_t deadline = Now() + kSpin;
    for (;;) {
      const int s = box->state.load(std::memory_order_acquire);
      if (s == kPosted) break;
      if (s == kWaiting && Now() > deadline) {
        int waiting = kWaiting;  // a call may be posting: then take its job
        if (box->state.compare_exchange_strong(waiting, kIdle, std::memory_order_acq_rel)) {
          return;
        }
        continue;
      }
      Pause();
    }
    job = box->job;
    box->state.store(kIdle, std::memory_order_release);
  }
}

// Starts `helpers` helpers on `work`, each running Drain(*work): the waiting helper
// first, then pool tasks, which wait for the next job afterwards if `wait`. Only calls
// that come in runs of several per step should pass `wait`: a waiting helper holds a
// pool thread, which XLA's own parallel work then lacks (with XLA's GEMMs, a fused Adam
// update whose helper waited made an epoch 7% slower).
template <class W, void (*Drain)(W&)>
void Share(xla::ffi::ThreadPool& pool, const std::shared_ptr<W>& work, size_t helpers,
           bool wait) {
  for (size_t t = 0; t < helpers; ++t) {
    const Job job{[](void* p) {
                    auto* w = static_cast<std::shared_ptr<W>*>(p);
                    Drain(**w);
                    delete w;
                  },
                  new std::shared_ptr<W>(work)};
    if (!Post(job)) pool.Schedule([job, wait] { Help(job, wait); });
  }
}

// The whole of a call: helpers started on `work`, the calling thread taking units too,
// then waiting until all `work->*units` are done (`work->done` counts them); marked
// as running meanwhile.
template <class W, void (*Drain)(W&), size_t W::*units>
void Run(xla::ffi::ThreadPool& pool, const std::shared_ptr<W>& work, size_t helpers, bool wait) {
  const Running running;
  Share<W, Drain>(pool, work, helpers, wait);
  Drain(*work);
  while (work->done.load(std::memory_order_acquire) < (*work).*units) std::this_thread::yield();
}

// Takes units (`work.next`) until none are left, running Unit on each and counting it in
// `work.done`: the Drain of kernels whose units are independent chunks (adam.cc,
// bernoulli.cc).
template <class W, void (*Unit)(W&, size_t), size_t W::*units>
void DrainUnits(W& work) {
  for (size_t u; (u = work.next.fetch_add(1, std::memory_order_relaxed)) < work.*units;) {
    Unit(work, u);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

}  // namespace jaxdl_team

// Gives this library the process's mailbox (jaxdl.kernels calls it once per library).
extern "C" void jaxdl_team_attach(void* mailbox) {
  jaxdl_team::mailbox = static_cast<jaxdl_team::Mailbox*>(mailbox);
}
