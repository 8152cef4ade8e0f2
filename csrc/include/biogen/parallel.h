// How many OpenMP threads a kernel call uses, and how it partitions its work.
//
// Determinism: every kernel partitions its work by the shape alone (task sizes, split counts and the
// order partial sums are added in never depend on the thread count or on which thread finishes
// first), so a result is bit-identical for any thread count and any load on the machine.
//
// Oversubscription: libgomp was initialised by torch (OMP_WAIT_POLICY / GOMP_SPINCOUNT are read
// only then), so its threads spin at every barrier before sleeping. When other processes compete
// for the cores, a parallel region ends only once every one of its threads has been scheduled
// again, and the others spin meanwhile: a region costs up to a scheduler time slice whatever its
// work. Kernels therefore open at most one region per pass, hand out work dynamically (a
// descheduled thread's share is taken by the running ones), skip barriers they do not need, and
// run small calls on the calling thread alone, as torch's at::parallel_for does below its grain.
#pragma once
#include <algorithm>
#include <cstdint>

namespace biogen {

// Work (in units of `grain`) below which one more thread is not worth a parallel region.
// grain: elements for streaming kernels, flops for compute-bound ones.
inline int threads_for(int max_threads, double work, double grain) {
  if (max_threads <= 1 || !(work > 0)) return 1;
  const double want = work / grain;
  return want >= max_threads ? max_threads : std::max(1, (int)want);
}

// torch's at::internal::GRAIN_SIZE for elementwise work; about 1 MFLOP (~50 us on one core) for
// compute-bound kernels.
constexpr double kGrainElements = 32768.0;
constexpr double kGrainFlops = 1.0e6;

}  // namespace biogen
