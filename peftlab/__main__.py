"""`python -m peftlab ...` (and `torchrun -m peftlab train ...`) runs the CLI."""
import sys

from .cli import main

sys.exit(main())
