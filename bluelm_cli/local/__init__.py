"""The local model: loading a checkpoint (hub id or folder), the engine that answers prompt ids with a KV
cache kept across turns, and the CUDA fast path. Implements core.Backend.

May import: core, config, modeling. Never a terminal library: the engine streams text deltas, faces render.
"""
