"""bluelm-cli: chat with BlueLM-7B from a terminal.

Kept free of heavy imports so that `bluelm --help` and `bluelm --version` start instantly.
"""

import logging as _logging

__version__ = "0.1.0"

# With torchao installed (the `torchao` extra, for --quantize), transformers imports it whenever it loads its
# quantizers, and torchao logs a warning per optional CUDA extension built for other cards, and torch one about
# an enum torchao registers: lines on stderr of every command that no user can act on. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
