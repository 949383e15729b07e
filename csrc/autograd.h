// The ops' C++ autograd (autograd.cpp): which node a call builds.
#pragma once

namespace fastbn {

// While one is alive on this thread, batch_norm_train / batch_norm_eval build a plain
// autograd Node (about 30 heap allocations fewer per call than the torch::autograd::
// Function's node) instead of the Function's. The eager entry points (eager.cpp) set it
// when torch's compiled autograd is off: it can lift the Function's node into its graphs,
// not the plain one. Every other caller (torch.ops from Python, torch.compile's tracing,
// opcheck, forward AD, torch.func) gets the Function.
class PlainAutogradNodes {
 public:
  explicit PlainAutogradNodes(bool enabled);
  ~PlainAutogradNodes();
  PlainAutogradNodes(const PlainAutogradNodes&) = delete;
  PlainAutogradNodes& operator=(const PlainAutogradNodes&) = delete;

  static bool enabled();

 private:
  bool previous_;
};

}  // namespace fastbn
