"""Placement parts: where a layer's K/V live and which of them are fetched for attention."""
