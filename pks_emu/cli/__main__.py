"""``python -m pks_emu.cli``: the ``pks-emu`` command."""
import sys

from . import main

sys.exit(main())
