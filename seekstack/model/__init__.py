"""The DeepSeek-V3 network and nothing else: no files, no training, no serving."""

from seekstack.allocator import keep_freed_memory

keep_freed_memory()  # once per process, before the first forward (seekstack/allocator.py)
