"""Public ops. Each has a plain-PyTorch reference (``*_ref``), a Triton kernel (``ospo_fast.kernels``) and, where
it pays, a C++ CPU kernel (``csrc/``); one public function per op picks the backend."""
