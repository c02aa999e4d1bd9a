"""Where settings come from and where files go: flags > environment > config file > checkpoint >
default, and the user folders (BLUELM_HOME, sessions, history).

May import: core.
"""
