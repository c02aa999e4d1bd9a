"""What the tests and `bench --random-weights` share: tiny BlueLM checkpoints in the published on-disk
layouts, and a scripted fake backend. Never imported by chat, ask or --help.

May import: core, config, modeling.
"""
