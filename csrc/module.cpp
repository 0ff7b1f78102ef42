// The Python module behind `ospo_fast._C`. Each op file in csrc/ registers its own operators in the
// `ospo_fast_C` torch.library namespace (TORCH_LIBRARY_FRAGMENT), so this file only makes the shared
// object importable; the ops are then reached as torch.ops.ospo_fast_C.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ospo_fast compiled CPU (and optional CUDA) kernels; ops live in torch.ops.ospo_fast_C";
}
