// Work dealt out to PyTorch's thread pool in chunks from a shared counter, rather than in one
// fixed share per thread as at::parallel_for deals it.
//
// Why: served, the engine shares its cores with Triton's frontend and the clients. With fixed
// shares, a thread that loses its core for a moment holds up the whole parallel region (and so
// the decode step, a few hundred regions) until it gets the core back; with chunks, the other
// threads take over its share. Chunks also even out items of unequal cost (decode attention
// over contexts of different lengths). Which thread computes an item never changes its result.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace parallel {

// Items per chunk: about `chunks_per_thread` chunks for each thread, at least `min_chunk`.
inline int64_t ChunkSize(int64_t count, int64_t chunks_per_thread, int64_t min_chunk = 1) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(min_chunk, count / (threads * chunks_per_thread));
}

class Chunks {
 public:
  Chunks(int64_t count, int64_t chunk) : count_(count), chunk_(std::max<int64_t>(1, chunk)) {}

  // The next untaken chunk [begin, end); false once every item is taken.
  bool Next(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= count_) return false;
    end = std::min(count_, begin + chunk_);
    return true;
  }

 private:
  const int64_t count_, chunk_;
  std::atomic<int64_t> next_{0};
};

// Runs worker(chunks) once on each thread of the pool (for per-thread setup, such as scratch
// buffers); each worker takes chunks until none are left.
template <typename Worker>
void OnEachThread(int64_t count, int64_t chunk, Worker worker) {
  if (count <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  Chunks chunks(count, chunk);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (count + chunk - 1) / chunk);
  at::parallel_for(0, std::max<int64_t>(1, threads), 1,
                   [&](int64_t, int64_t) { worker(chunks); });
}

// body(begin, end) for every chunk of [0, count).
template <typename Body>
void ForEachChunk(int64_t count, int64_t chunk, Body body) {
  OnEachThread(count, chunk, [&](Chunks& chunks) {
    int64_t begin = 0, end = 0;
    while (chunks.Next(begin, end)) body(begin, end);
  });
}

}  // namespace parallel
