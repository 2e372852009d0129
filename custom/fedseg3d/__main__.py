"""``python -m fedseg3d`` is the ``fedseg3d`` command (for environments where the script is not on PATH)."""

from fedseg3d.cli import main

raise SystemExit(main())
