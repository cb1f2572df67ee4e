"""``python -m metafunc`` (and ``torchrun -m metafunc``) runs the ``metafunc`` command."""

from metafunc.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
