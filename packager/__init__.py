"""edgepack's host side: quantize, segment and bundle models for a board.

Uses llama.cpp (through llama-cpp-python) for every heavy step and gguf-py to read GGUF files.
"""
