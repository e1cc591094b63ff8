"""Durable, streamed, per-rank checkpoints (engine.save_checkpoint / engine.load_checkpoint).

format.py specifies the files; the engine's thin methods call save.py and load.py."""
