"""``python -m kvshift_lens.zoo``: see :mod:`kvshift_lens.zoo.build`."""

import sys

from kvshift_lens.zoo.build import main

sys.exit(main())
