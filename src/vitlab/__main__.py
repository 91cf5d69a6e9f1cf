"""``python -m vitlab``: the ``vitlab`` command (torchrun launches it this way)."""

from .cli import main

main()
