"""NumPy twins of every kernel and single-process stacked-matrix references of
every distributed algorithm.  Plain NumPy, written for clarity, not speed."""
