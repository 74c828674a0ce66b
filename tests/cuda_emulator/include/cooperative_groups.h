// The one cooperative-groups feature the kernels use: the grid group of a cooperative launch and its sync
// (a barrier over every thread of the grid, see cuda_runtime.h).
#pragma once

#include "cuda_runtime.h"

namespace cooperative_groups {

class grid_group {
 public:
  // aborts outside a cooperative launch, where a GPU would deadlock or fault
  void sync() const { cuda_emulator::sync_grid(); }
};

inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups
