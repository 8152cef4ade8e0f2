"""Triton kernels, one file per op. Imported lazily by biogen.ops (importing triton is slow).

On a CPU they run only under ``TRITON_INTERPRET=1`` (the test suite does this at tiny shapes).
"""
