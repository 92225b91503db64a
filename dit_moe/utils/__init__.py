"""Leaf helpers every layer uses (atomic writes, .npy headers, host memory, launch environment, errors);
nothing here imports the rest of dit_moe."""
