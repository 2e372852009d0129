"""Update compression in plain numpy (no ``nvflare``): lossy codecs and model fingerprints.

The FLARE filters (``fedseg3d.filters``) and server components (``fedseg3d.server``) wrap these; everything here is
unit-testable on its own.
"""
