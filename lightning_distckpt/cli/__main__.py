import sys

from lightning_distckpt.cli.main import main

sys.exit(main())
