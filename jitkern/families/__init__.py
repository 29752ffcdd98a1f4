"""The built-in kernel families. Importing this package registers them all (the warm-up set).

Family modules declare only (no torch import), so the CLI can list and compile them quickly."""

from . import selftest  # noqa: F401
from . import mamba2  # noqa: F401
from . import spec_dec_attention  # noqa: F401
