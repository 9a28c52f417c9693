"""`python -m app.lora list|load|unload|test`: see app/lora/cli.py."""

import sys

from app.lora.cli import main

sys.exit(main())
