"""CUDA kernels run on CPU threads, for tests without a GPU (emulate.py)."""
