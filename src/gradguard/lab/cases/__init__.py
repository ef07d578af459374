"""The built-in cases, one module per source (or group of sources); importing this registers them all."""
