"""Helpers that run the real product: a ComfyUI server subprocess and a headless Chromium."""
