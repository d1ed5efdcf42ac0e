"""CUDA fast paths: kernels.py launches the .cu sources beside it; paths.py holds the
Function classes (each a subclass of the reference op it implements) that call them."""
