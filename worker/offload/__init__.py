"""Small-VRAM mode: decoder layers streamed from host memory, planned by pure arithmetic."""
