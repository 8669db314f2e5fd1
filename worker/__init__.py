"""The GPU side: model load, VRAM budget, scheduler, generation, result writing."""
