"""The fedseg3d benchmark: does federation pay, and what does it cost (``python -m benchmarks.run --help``)."""
