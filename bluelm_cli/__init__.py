"""bluelm-cli: chat with BlueLM-7B from a terminal.

Kept free of heavy imports so that `bluelm --help` and `bluelm --version` start instantly.
"""

__version__ = "0.1.0"
