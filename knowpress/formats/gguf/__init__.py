"""GGUF export (llama.cpp's file format): the ``gguf`` folder format (``format.py``), the
file's tensors (``tensors.py``: codes carried, re-quantized or quantized; ``kquant.py``:
Q4_K blocks), its tokenizer metadata (``vocab.py``), the writer (``writer.py``) and the
reader that rebuilds a PyTorch Llama from the file (``reader.py``). Needs the ``gguf``
package (the ``export`` extra); only ``format.py`` is imported with ``knowpress.formats``."""
