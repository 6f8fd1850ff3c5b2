"""GPU kernels (Triton). Import a kernel module only where Triton is installed; on CPU they run
under ``TRITON_INTERPRET=1`` for correctness checks on small shapes."""
