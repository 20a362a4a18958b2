"""`python -m napo.cli`: the `napo` command."""

from napo.cli import main

main()
