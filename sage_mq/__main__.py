"""``python -m sage_mq`` is the ``sage`` command."""

from sage_mq.cli import main

main()
