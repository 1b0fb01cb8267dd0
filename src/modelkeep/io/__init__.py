"""Moving bytes between files and memory (layer 2).

``buffers``: byte views of tensors' own memory and allocation; ``reads``: byte ranges of a file
into destination buffers (preadv readers, or copies from a mapping when the file is cached);
``writes``: streaming tensors' bytes to a file while hashing them; ``tensors``: the format-aware
helper that reads header entries into tensors of any dtype, device or layout.
"""
