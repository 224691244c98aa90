"""`python -m advdef` runs the CLI (and is what torchrun launches)."""

from advdef.cli import main

main()
