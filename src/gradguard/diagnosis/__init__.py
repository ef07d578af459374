"""diagnose: name the layer, the cause and the fix, predict it from theory, and measure which fix works."""
