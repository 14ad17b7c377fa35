"""Codecs: how one token's K/V is stored (quantized, packed) and read back."""
