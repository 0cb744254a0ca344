"""Shipped specs (presets) as data files, registered through the `register_presets` hook."""
