"""`python -m cpwb ...` and `accelerate launch -m cpwb train ...`: the `cpwb` command."""
import sys

from cpwb.app.cli import main

sys.exit(main())
