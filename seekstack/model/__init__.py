"""The DeepSeek-V3 network and nothing else: no files, no training, no serving."""
