"""`python -m rayimgcls` runs the CLI."""

from rayimgcls.cli import main

main()
