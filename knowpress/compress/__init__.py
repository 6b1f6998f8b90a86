"""Compression families: quant/ (weight quantization); more families register alongside."""
